"""The loss a learned-optimizer step uses: checked, on the step's device, and averaged under DDP.

Celo and VeLO feed loss statistics to their learned scheduler, so their step needs the loss as a
scalar, identical on every DDP rank. small_fc_lopt never reads it; its optimizers keep a scalar one
for inspection (``last_loss``) and accept anything else a closure may return.

Example::

    loss, warned = resolve_loss(closure_loss, owner="Celo", needs_loss=True,
                                device=p.device, dtype=torch.float32, warned_nonfinite=False)
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def resolve_loss(
    candidate: Any,
    *,
    owner: str,
    needs_loss: bool,
    device: torch.device,
    dtype: torch.dtype,
    warned_nonfinite: bool,
) -> tuple[Tensor | None, bool]:
    """``(loss, warned_nonfinite)``: the step's loss and whether a non-finite loss has been reported.

    Raises ``ValueError`` naming the fix when a rule that reads the loss gets none, or a non-scalar.
    A non-finite loss is reported once (a ``RuntimeWarning``); the rules leave their loss statistics
    unchanged for that step.
    """
    if not needs_loss:
        # Keep a scalar loss for inspection and accept anything else (e.g. ``(loss, logits)``).
        if isinstance(candidate, (int, float)) or (isinstance(candidate, Tensor) and candidate.numel() == 1):
            return torch.as_tensor(candidate).detach().reshape(()).to(dtype), warned_nonfinite
        return None, warned_nonfinite
    if candidate is None:
        raise ValueError(
            f"{owner} needs the training loss at every step (its learned scheduler reads loss "
            "statistics): pass step(loss=loss), call step(closure) with a closure that returns "
            "the loss, or, under Lightning without a closure (precision='16-mixed'), add the "
            "lightning_lopt.trainer.LossToOptimizer callback (lightning_lopt.Trainer adds it)."
        )
    loss = torch.as_tensor(candidate).detach()
    if loss.numel() != 1:
        raise ValueError(f"{owner}: the loss must be a scalar, got shape {list(loss.shape)}")
    loss = loss.reshape(()).to(device=device, dtype=dtype).clone()
    # Each DDP rank sees its own shard's loss; the update depends on it, so average it to keep
    # the replicas identical (DDP only synchronises gradients).
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        loss = loss / dist.get_world_size()
    # Checked (one scalar device sync per step) only until the first warning.
    if not warned_nonfinite and not bool(torch.isfinite(loss)):
        warned_nonfinite = True
        warnings.warn(
            f"{owner}: the loss is {loss.item()}; this step keeps the scheduler's loss statistics "
            "and LSTM state unchanged (parameters are still updated). Further non-finite losses "
            "are not reported.",
            RuntimeWarning,
            stacklevel=4,
        )
    return loss, warned_nonfinite


__all__ = ["resolve_loss"]
