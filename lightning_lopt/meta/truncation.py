"""Episode lengths for the inner problems (docs/reference/pes.md#episode-lengths).

``LogUniformLengthSchedule``: L = int(exp(U[ln min, ln max])), drawn per particle pair at the start
and at every episode end. The first episode also starts at a random inner step in ``[0, offset)``
(``random_initial_iteration_offset``), which de-synchronises the pairs; the learned optimizer's own
iteration counter still starts at 0.

Example::

    schedule = LogUniformLengthSchedule(100, 1000)
    lengths = schedule.sample(8, generator)          # int64 [8], each in [100, 1000]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_lopt.checks import check_positive_int


@dataclass(frozen=True)
class LogUniformLengthSchedule:
    """Log-uniform episode lengths in ``[min_length, max_length]``.

    Args:
        min_length: shortest episode (100 in μLO and Celo).
        max_length: longest episode, the meta-training horizon (1000 in μLO, 2000 in Celo).
    """

    min_length: int = 100
    max_length: int = 1000

    def __post_init__(self) -> None:
        check_positive_int("min_length", self.min_length)
        check_positive_int("max_length", self.max_length)
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})")

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` lengths (int64, on the generator's device)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
        log_len = math.log(self.min_length) + u * (math.log(self.max_length) - math.log(self.min_length))
        return log_len.exp().long().clamp(self.min_length, self.max_length)


def initial_offsets(n: int, max_offset: int, generator: torch.Generator) -> Tensor:
    """Starting inner steps in ``[0, max_offset)`` (all zero when ``max_offset`` is 0)."""
    if max_offset <= 0:
        return torch.zeros(n, dtype=torch.long, device=generator.device)
    return torch.randint(0, max_offset, (n,), generator=generator, device=generator.device)
