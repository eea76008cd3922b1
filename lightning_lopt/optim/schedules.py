"""The learning-rate schedule long runs need: linear warmup, then a cosine decay to zero.

Measured (``docs/results.md``, sections 4, 12 and 19): at a constant ``lr`` μLO diverges on a 10,000-step
run of a Fashion-MNIST MLP, and with this schedule (and weight decay) it does not; the tuned AdamW and
μAdam baselines run it too (``adamw-cosine``, ``muadam-cosine``). A learned optimizer's ``lr``
multiplies its step, so any ``torch.optim.lr_scheduler`` applies to it as to AdamW.

Example::

    opt = MuLO(model.parameters(), weight_decay=1e-3)
    schedule = WarmupCosine(opt, num_steps=10_000)   # step it after every optimizer step
    # in a LightningModule:
    #     return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: The fraction of the run spent warming up, as in the evaluation's ``-cosine`` baselines.
WARMUP_FRACTION = 0.05


def warmup_cosine(steps: int, warmup_fraction: float = WARMUP_FRACTION) -> Callable[[int], float]:
    """The learning-rate multiplier after ``t`` optimizer steps: linear from 1/w to 1 over the first
    ``w = max(1, round(warmup_fraction · steps))`` steps, then a cosine from 1 to 0 at ``steps``.

    Example::

        f = warmup_cosine(100)             # warmup 5 steps
        f(0), f(4), f(5), f(100)           # 0.2, 1.0, 1.0, 0.0
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"warmup_cosine: steps must be a positive integer, got {steps!r}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_cosine: warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
    warmup = max(1, round(warmup_fraction * steps))

    def multiplier(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / max(1, steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """:func:`warmup_cosine` over ``num_steps`` as a torch LR scheduler (step it once per optimizer step).

    Its ``state_dict`` holds ``num_steps``, ``warmup_fraction`` and the step count, and loading it
    rebuilds the schedule from them, so a resumed run continues the schedule it saved (even if the
    resumed fit was configured with another length). In Lightning return it with
    ``"interval": "step"`` (the default ``"epoch"`` would step it once per epoch);
    :class:`lightning_lopt.Trainer`'s ``lr_schedule="warmup-cosine"`` does that.

    Example::

        schedule = WarmupCosine(opt, num_steps=trainer.estimated_stepping_batches)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_steps: int,
        warmup_fraction: float = WARMUP_FRACTION,
        last_epoch: int = -1,
    ) -> None:
        self.num_steps = num_steps
        self.warmup_fraction = warmup_fraction
        super().__init__(optimizer, warmup_cosine(num_steps, warmup_fraction), last_epoch=last_epoch)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # LambdaLR keeps no closures in its state: rebuild the multiplier from the loaded horizon.
        self.lr_lambdas = [warmup_cosine(self.num_steps, self.warmup_fraction)] * len(self.optimizer.param_groups)
