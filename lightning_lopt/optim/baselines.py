"""Hand-designed baselines: μAdam as a real ``torch.optim.Optimizer`` class.

mup's ``MuAdam`` is a factory function, which LightningCLI's ``--optimizer`` rejects. :class:`MuAdam`
is an ``Adam`` subclass with the same per-group rule as μLO's μAdam baseline (docs/reference/mup.md#muadam):
every tensor's Adam update is multiplied by its μP update scale (``1/fan_in`` for hidden matrices,
1 otherwise), i.e. mup's ``MuAdam`` with a base width of 1.

Example::

    opt = MuAdam(model.parameters(), lr=1e-2)          # scales come from the model's parameters
    opt = MuAdam(model.parameters(), lr=1e-2, scales=model.update_scales())   # or explicitly
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lightning_lopt.optim.scaling import scaled_param_groups


class MuAdam(torch.optim.Adam):
    """Adam whose per-tensor learning rate is ``lr * update_scale``.

    Weight decay is divided by the scale, as mup does, so that ``lr * weight_decay`` stays
    width-independent. LR schedulers keep working because they rescale ``group["lr"]`` relatively.
    """

    #: Whether per-tensor μP update scales are required (as :attr:`LearnedOptimizer.mu <lightning_lopt.optim.learned.LearnedOptimizer.mu>`).
    mu = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        scales: Mapping[str, float] | None = None,
        allow_sp: bool = False,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        groups = scaled_param_groups(params, scales, allow_sp=allow_sp, owner="MuAdam")
        for g in groups:
            s = g["update_scale"]
            g["lr"] = g.get("lr", lr) * s
            g["weight_decay"] = g.get("weight_decay", weight_decay) / s
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
