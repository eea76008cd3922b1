"""The per-step context every learned-optimizer step function receives.

Example::

    from lightning_lopt.optim.functional import StepContext
    ctx = StepContext(scales=[1.0, 1 / 128, 1.0], loss=torch.tensor(2.3), num_steps=1000)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class StepContext(NamedTuple):
    """What a step needs besides θ, the parameters, the gradients and the optimizer state.

    Attributes:
        scales: one μP update scale s_p per tensor
            (docs/reference/mup.md#parametrisation-and-update-scales: ``1 / fan_in`` for hidden
            matrices, 1 otherwise). Standard-parametrization optimizers pass all ones.
        loss: the minibatch loss at the current parameters (a 0-d tensor), or ``None``. Celo and
            VeLO need it (their scheduler reads loss statistics); small_fc_lopt ignores it.
        num_steps: the training horizon T. Celo and VeLO use it for the progress features and the
            loss-EMA half-lives (docs/reference/celo.md#loss-buffer); small_fc_lopt ignores it. An ``int``, or a 0-d
            tensor so that particles vmapped together may each have their own horizon.
        spectral: ``None``, or per tensor ``None`` or a target c: Celo2's step replaces that matrix
            tensor's direction u by ``c · u / ‖u‖_eff`` per matrix slice before the scale, where
            ``‖u‖_eff = ‖u uᵀ‖_F / ‖u‖_F`` (:func:`~lightning_lopt.optim.functional.celo2.spectral_normalize`;
            ``MuCelo2``'s spectral hidden-matrix steps, docs/celo2.md). Other rules ignore it.
    """

    scales: Sequence[float]
    loss: Tensor | None
    num_steps: int | Tensor
    spectral: Sequence[float | None] | None = None


def check_lists(params: Sequence[Tensor], grads: Sequence[Tensor], ctx: StepContext) -> None:
    """Raise ``ValueError`` if the per-tensor lists disagree in length (a shape-level check only)."""
    if not (len(params) == len(grads) == len(ctx.scales)):
        raise ValueError(
            f"params, grads and ctx.scales must have one entry per tensor; got {len(params)}, "
            f"{len(grads)} and {len(ctx.scales)}"
        )
    if ctx.spectral is not None and len(ctx.spectral) != len(params):
        raise ValueError(
            f"ctx.spectral must have one entry per tensor; got {len(ctx.spectral)} for {len(params)} tensors"
        )


def require_loss(ctx: StepContext, who: str) -> Tensor:
    """The loss of ``ctx``; a learned optimizer with a loss-driven scheduler cannot step without it."""
    if ctx.loss is None:
        raise ValueError(
            f"{who} needs the training loss: pass StepContext(loss=...) (its learned scheduler reads "
            "loss statistics, docs/reference/celo.md#loss-buffer)"
        )
    return torch.as_tensor(ctx.loss)
