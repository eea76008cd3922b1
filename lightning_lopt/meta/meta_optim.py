"""The meta-optimizer of μLO
(docs/reference/pes.md#meta-optimizer): AdamW, a warmup + cosine schedule, an update-norm clip.

optax's ``chain(adamw(schedule), clip_by_global_norm(1.0))`` clips the AdamW *update* (which already
includes −lr), not the raw meta-gradient; :func:`clipped_step` does the same around any
``torch.optim`` optimizer.

Example::

    schedule = WarmupCosine(peak=3e-3, end=1e-3, warmup_steps=100, decay_steps=4900)
    opt = default_meta_optimizer(lopt.parameters())
    for group in opt.param_groups:
        group["lr"] = schedule(step)
    clipped_step(opt, max_norm=1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class WarmupCosine:
    """optax.warmup_cosine_decay_schedule: linear ``init → peak`` over ``warmup_steps``, cosine to
    ``end`` until ``decay_steps`` (which *includes* the warmup), then constant at ``end``.

    μLO: ``WarmupCosine(3e-3, 1e-3, 100, 4900)`` for 5000 meta-steps.
    """

    peak: float = 3e-3
    end: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int = 4900
    init: float = 3e-10

    def __post_init__(self) -> None:
        if not (self.peak > 0 and self.end >= 0 and self.init >= 0):
            raise ValueError(f"schedule: learning rates must be positive, got {self}")
        if self.warmup_steps < 0 or self.decay_steps < self.warmup_steps:
            raise ValueError(f"schedule: need 0 <= warmup_steps <= decay_steps, got {self}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.init + (self.peak - self.init) * step / self.warmup_steps
        if step >= self.decay_steps:
            return self.end
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.end + (self.peak - self.end) * 0.5 * (1 + math.cos(math.pi * progress))


def default_meta_optimizer(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """AdamW with optax's defaults and μLO's weight decay 1e-4 (the lr is set by the schedule)."""
    return torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)


@torch.no_grad()
def clipped_step(
    optimizer: torch.optim.Optimizer, max_norm: float | None, step: Callable[[], object] | None = None
) -> float:
    """Take ``optimizer``'s step, then scale the whole update to global norm ≤ ``max_norm``.

    ``step`` performs the step (default ``optimizer.step``; Lightning passes its wrapped optimizer's).
    Returns the update's norm before clipping.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    before = [p.detach().clone() for p in params]
    (step or optimizer.step)()
    updates = [p - b for p, b in zip(params, before)]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u) for u in updates]))) if updates else 0.0
    if max_norm is not None and norm > max_norm:
        scale = max_norm / norm
        for p, b, u in zip(params, before, updates):
            p.copy_(b + u * scale)
    return norm
