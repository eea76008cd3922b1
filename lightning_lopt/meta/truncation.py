"""Episode lengths for the inner problems (docs/reference/pes.md#episode-lengths).

``LogUniformLengthSchedule``: L = int(exp(U[ln min, ln max])), drawn per particle pair at the start
and at every episode end. With a ``split_length`` it draws from one of two such ranges instead, so a
recipe can show the rule states far past the usual horizon without starving the early steps:
episodes are drawn per episode but PES windows accrue per inner step, so a few long episodes take
most of the windows. The first episode also starts at a random inner step in ``[0, offset)``
(``random_initial_iteration_offset``), which de-synchronises the pairs; the learned optimizer's own
iteration counter still starts at 0.

Example::

    schedule = LogUniformLengthSchedule(100, 1000)
    lengths = schedule.sample(8, generator)          # int64 [8], each in [100, 1000]
    mixed = LogUniformLengthSchedule(100, 10000, split_length=2000, long_probability=0.12)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_lopt.checks import check_positive_int


@dataclass(frozen=True)
class LogUniformLengthSchedule:
    """Log-uniform episode lengths in ``[min_length, max_length]``, or from two log-uniform ranges.

    With ``split_length`` set, an episode is log-uniform in ``[split_length, max_length]`` with
    probability ``long_probability``, else in ``[min_length, split_length]``. The share of inner steps
    (and so of PES windows) in long episodes is ``p E[L_long] / (p E[L_long] + (1 - p) E[L_short])``,
    with ``E[L] = (hi - lo) / ln(hi / lo)`` for a log-uniform range: for 100 / 2,000 / 10,000,
    ``long_probability`` 0.12 gives about half (one range over [100, 10,000] gives about 80%).

    Args:
        min_length: shortest episode (100 in μLO and Celo).
        max_length: longest episode, the meta-training horizon (1000 in μLO, 2000 in Celo).
        split_length: ``None`` (one range), or the longest short and shortest long episode.
        long_probability: chance that an episode is drawn from the long range (needs ``split_length``).
    """

    min_length: int = 100
    max_length: int = 1000
    split_length: int | None = None
    long_probability: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int("min_length", self.min_length)
        check_positive_int("max_length", self.max_length)
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})")
        if self.split_length is None:
            if self.long_probability != 0.0:
                raise ValueError("long_probability needs a split_length (the start of the long range)")
            return
        check_positive_int("split_length", self.split_length)
        if not self.min_length <= self.split_length <= self.max_length:
            raise ValueError(
                f"split_length ({self.split_length}) must lie in [min_length, max_length] = "
                f"[{self.min_length}, {self.max_length}]"
            )
        if not 0.0 <= self.long_probability <= 1.0:
            raise ValueError(f"long_probability must be in [0, 1], got {self.long_probability}")

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` lengths (int64, on the generator's device)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
        if self.split_length is None:
            return _log_uniform(u, self.min_length, self.max_length)
        long = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device) < self.long_probability
        short_len = _log_uniform(u, self.min_length, self.split_length)
        long_len = _log_uniform(u, self.split_length, self.max_length)
        return torch.where(long, long_len, short_len)


def _log_uniform(u: Tensor, low: int, high: int) -> Tensor:
    """``int(exp(ln low + u (ln high - ln low)))`` clamped to ``[low, high]``, for ``u`` in [0, 1)."""
    log_len = math.log(low) + u * (math.log(high) - math.log(low))
    return log_len.exp().long().clamp(low, high)


def initial_offsets(n: int, max_offset: int, generator: torch.Generator) -> Tensor:
    """Starting inner steps in ``[0, max_offset)`` (all zero when ``max_offset`` is 0)."""
    if max_offset <= 0:
        return torch.zeros(n, dtype=torch.long, device=generator.device)
    return torch.randint(0, max_offset, (n,), generator=generator, device=generator.device)
