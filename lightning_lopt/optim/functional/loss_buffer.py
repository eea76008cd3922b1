"""Loss statistics for the Celo / VeLO schedulers: ``BufferLossAccumulators`` (docs/reference/celo.md#loss-buffer).

Ten EMAs of the raw training loss with half-lives ``logspace(1, log10 T, 10)``, their running minima
and a count. The 9 features compare each bias-corrected EMA with its running minimum, normalised by
the next-longer EMA's excess over that minimum; they are 0 for the first two updates.

A non-finite loss must not poison the statistics: :func:`update` takes a ``finite`` flag (a 0-d
bool tensor) and keeps the old buffer where it is false, with ``torch.where`` so that no Python
branch depends on a tensor value.

Example::

    buf = init(dtype=torch.float32, device="cpu")
    d = decays(1000, torch.float32, "cpu")
    buf = update(buf, torch.tensor(2.3), torch.tensor(True), d)
    feats = features(buf, d)   # shape (9,)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lopt.optim.functional.context import StepContext, require_loss

NUM_EMAS = 10
_RUNNING_MIN_INIT = 999999999999.0  # the reference's initial running minimum


def init(dtype: torch.dtype, device: torch.device | str) -> dict[str, Tensor]:
    """An empty buffer: means 0, running minima 1e12, count 0."""
    return {
        "loss_means": torch.zeros(NUM_EMAS, dtype=dtype, device=device),
        "loss_running_min": torch.full((NUM_EMAS,), _RUNNING_MIN_INIT, dtype=dtype, device=device),
        "loss_count": torch.zeros((), dtype=torch.int64, device=device),
    }


def decays(num_steps: int | Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """exp(−1/h) for the half-lives h = logspace(1, log10 T, 10) of a horizon T."""
    log_t = torch.log10(torch.as_tensor(num_steps, device=device).to(dtype))
    frac = torch.linspace(0.0, 1.0, NUM_EMAS, dtype=dtype, device=device)
    halflife = 10.0 ** (1.0 + frac * (log_t - 1.0))
    return torch.exp(-1.0 / halflife)


def update(buf: dict[str, Tensor], loss: Tensor, finite: Tensor, decay: Tensor) -> dict[str, Tensor]:
    """Add one loss; the whole buffer is left unchanged where ``finite`` is false.

    The loss is first clipped to at most 2·|max bias-corrected EMA| (to 2·|loss| on the first
    update, a no-op for a non-negative loss).
    """
    means, count = buf["loss_means"], buf["loss_count"]
    loss = loss.to(means.dtype)
    correction = 1 - decay ** (count + 1).to(means.dtype)
    approx_max = torch.where(count == 0, loss, (means / correction).amax())
    clipped = torch.minimum(approx_max.abs() * 2, loss)
    new_means = means * decay + clipped * (1 - decay)
    new_min = torch.minimum(buf["loss_running_min"], new_means / correction)
    return {
        "loss_means": torch.where(finite, new_means, means),
        "loss_running_min": torch.where(finite, new_min, buf["loss_running_min"]),
        "loss_count": torch.where(finite, count + 1, count),
    }


def features(buf: dict[str, Tensor], decay: Tensor) -> Tensor:
    """The 9 loss features in [−1, 1]; zero while fewer than three losses have been seen."""
    count = buf["loss_count"]
    corrected = buf["loss_means"] / (1 - decay ** count.to(decay.dtype))
    running_min = buf["loss_running_min"][:-1]
    denom = torch.clamp(corrected[1:] - running_min, min=1e-8)
    feats = torch.clamp((corrected[:-1] - running_min) / denom - 1.0, -1.0, 1.0)
    # where, not feats * 0: with no loss seen yet (count 0) `corrected` is 0/0.
    return torch.where(count <= 2, torch.zeros_like(feats), feats)


def observe(state: dict[str, Tensor], ctx: StepContext, who: str) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Feed ``ctx.loss`` to the buffer held in ``state``: ``(finite, next_buffer, features)``."""
    loss = require_loss(ctx, who)
    means = state["loss_means"]
    finite = torch.isfinite(loss)
    decay = decays(ctx.num_steps, means.dtype, means.device)
    buf = update(state, loss, finite, decay)
    return finite, buf, features(buf, decay)
