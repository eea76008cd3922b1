"""Persistent evolution strategies (PES), exactly as μLO and Celo ran it (docs/reference/pes.md#the-estimator).

For each antithetic pair i with perturbation ε_i ~ N(0, σ²I) the + and − particles unroll θ ± ε_i
for one truncation window of T steps. With Δ_t the difference of their normalised losses, mask_t
(reset steps excluded), done_t (the step on which an episode ended) and F_t = OR_{s ≤ t} done_s:

- D = Σ_t mask_t, a_i = Σ_t Δ_t·mask_t·(1 − F_t) / D, b_i = Σ_t Δ_t·mask_t·F_t / D; the step on
  which done fires counts in b_i, i.e. it is credited to the new ε only (an upstream quirk);
- A_i ← A_i + ε_i (the running sum of perturbations of the current episode);
- g_i = (a_i·A_i + b_i·ε_i) / (2σ²), and the estimate is mean_i g_i;
- after the window A_i ← ε_i where the episode ended inside it, else A_i is kept.

Everything here is pure: the caller owns the accumulators and the unrolls.

Example::

    eps = sample_perturbations(dim, num_pairs=8, std=0.01, generators=gens)
    ...   # unroll θ + eps and θ − eps, collect losses [T, 2N], masks [T, N], dones [T, N]
    grad, accum = pes_gradient(loss_pos - loss_neg, masks, dones, eps, accum, std=0.01)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_lopt.checks import check_positive_int


@dataclass(frozen=True)
class PES:
    """PES settings (μLO's defaults).

    Args:
        num_pairs: antithetic pairs per task (and per width): 2·num_pairs particles.
        std: σ of the Gaussian perturbations of θ.
        trunc_length: inner steps per truncation window (one meta-step).
    """

    num_pairs: int = 8
    std: float = 0.01
    trunc_length: int = 50

    def __post_init__(self) -> None:
        check_positive_int("num_pairs", self.num_pairs)
        check_positive_int("trunc_length", self.trunc_length)
        if not (isinstance(self.std, (int, float)) and self.std > 0):
            raise ValueError(f"std must be a positive number, got {self.std!r}")


def sample_perturbations(
    dim: int, std: float, generators: Sequence[torch.Generator], mask: Tensor | None = None
) -> Tensor:
    """ε ``[len(generators), dim]``, one row per pair from its own generator; ``mask`` zeroes frozen coordinates."""
    rows = [torch.randn(dim, generator=g, device=g.device) for g in generators]
    eps = torch.stack(rows) * std
    return eps if mask is None else eps * mask


def pes_gradient(
    delta: Tensor, mask: Tensor, done: Tensor, eps: Tensor, accum: Tensor, std: float
) -> tuple[Tensor, Tensor]:
    """The PES estimate for one window and the accumulators for the next.

    Args:
        delta: ``[T, N]`` loss(θ + ε) − loss(θ − ε) per step and pair (normalised losses).
        mask: ``[T, N]`` 1 on training steps, 0 on reset steps.
        done: ``[T, N]`` 1 on the step that ended an episode.
        eps: ``[N, D]`` this window's perturbations.
        accum: ``[N, D]`` the perturbations summed since each pair's episode began (before this window).
        std: σ.

    Returns:
        ``(grad [D], accum [N, D])``: the mean over pairs of g_i, and the accumulators after the window.
    """
    mask = mask.to(delta.dtype)
    after_reset = (torch.cumsum(done.to(torch.int64), dim=0) > 0).to(delta.dtype)  # F_t
    count = mask.sum(dim=0).clamp(min=1.0)  # D; a window with no training step contributes 0
    weighted = delta * mask
    old = (weighted * (1 - after_reset)).sum(dim=0) / count  # a_i
    new = (weighted * after_reset).sum(dim=0) / count  # b_i
    accum = accum + eps
    per_pair = (old[:, None] * accum + new[:, None] * eps) / (2 * std**2)
    ended = after_reset[-1].bool()
    next_accum = torch.where(ended[:, None], eps, accum)
    return per_pair.mean(dim=0), next_accum


#: What PES differentiates per inner step: ``"loss"`` (μLO's and Celo's choice, the normalised loss) or
#: ``"log"`` (its logarithm, floored at :data:`LOG_FLOOR`), which weighs a relative improvement the same
#: at every loss level, so the late, low-loss steps of long episodes are not drowned out by early ones.
META_OBJECTIVES = ("loss", "log")
#: The floor of the ``"log"`` objective: a cross-entropy of 1e-3 is a solved batch, and reset steps
#: (loss 0, masked out) stay finite.
LOG_FLOOR = 1e-3


def meta_objective(losses: Tensor, kind: str) -> Tensor:
    """The per-step meta-objective of normalised ``losses`` (``[T, 2N]``) whose ± difference PES uses.

    Example::

        delta = meta_objective(losses, "log")[:, :n] - meta_objective(losses, "log")[:, n:]
    """
    if kind == "loss":
        return losses
    if kind == "log":
        return torch.log(losses.clamp(min=LOG_FLOOR))
    raise ValueError(f"meta_objective must be one of {META_OBJECTIVES}, got {kind!r}")


def window_meta_loss(loss_pos: Tensor, loss_neg: Tensor, mask: Tensor) -> Tensor:
    """The logged meta-loss: mean over pairs of the masked window means of the + and − losses."""
    mask = mask.to(loss_pos.dtype)
    count = mask.sum(dim=0).clamp(min=1.0)
    mean_pos = (loss_pos * mask).sum(dim=0) / count
    mean_neg = (loss_neg * mask).sum(dim=0) / count
    return ((mean_pos + mean_neg) / 2).mean()
