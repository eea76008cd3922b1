"""Held-out inner runs: train fresh optimizees with the current θ (no perturbation) and report losses.

Used to watch meta-training (:class:`InnerEvaluation`) and in tests. It reuses the unroll's machinery,
with all particles running the same unperturbed θ on initialisations and batches drawn from a key
space that meta-training never uses, so the runs are held out from the meta-training draws.

Example::

    curve = inner_loss_curve(meta.lopt, meta.instances[0], steps=200, seeds=range(4))   # [200, 4]
    curve[-10:].mean()                    # mean training loss over the last 10 steps
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_lopt.meta.rng import Stream, generator
from lightning_lopt.meta.tasks import TaskInstance
from lightning_lopt.meta.truncation import LogUniformLengthSchedule
from lightning_lopt.meta.unroll import init_particles, unroll_window
from lightning_lopt.optim.architectures import LearnedOptimizerModule

#: Added to the seed of held-out runs: a key space meta-training draws never use.
HELD_OUT = 2**31


@torch.no_grad()
def inner_loss_curve(
    lopt: LearnedOptimizerModule, inst: TaskInstance, steps: int, seeds: Sequence[int]
) -> Tensor:
    """Raw training losses ``[steps, len(seeds)]`` of fresh optimizees trained by ``lopt`` for ``steps`` steps.

    Each run starts from its own initialisation (episode length = ``steps``, no offset, no
    augmentation) and sees its own batches; the loss of step t is taken before update t.
    """
    seeds = list(seeds)
    n = len(seeds)
    theta = {k: v.detach().unsqueeze(0).expand(2 * n, *v.shape) for k, v in lopt.state_dict().items()}

    def keys(stream: Stream, pair: int, t: int) -> torch.Generator:
        return generator(HELD_OUT, seeds[pair], int(stream), t)

    schedule = LogUniformLengthSchedule(steps, steps)
    particles = init_particles(inst, lopt, theta, keys, schedule, 0, None, n, 1)
    batches = inst.sample(steps, [generator(HELD_OUT, s, int(Stream.DATA)) for s in seeds])
    _, out = unroll_window(inst, lopt, theta, particles, batches, keys, schedule, None)
    return out.raw_losses[:, :n]


class InnerEvaluation(L.Callback):
    """Every ``every_n_steps`` meta-steps, log the mean loss of held-out inner runs per task instance.

    Logs ``meta/eval/<instance>`` = the mean training loss over the last 10 of ``steps`` inner steps,
    averaged over ``num_seeds`` fresh runs.

    Example::

        L.Trainer(max_steps=500, callbacks=[InnerEvaluation(every_n_steps=50, steps=200)]).fit(meta)
    """

    def __init__(self, every_n_steps: int = 50, steps: int = 200, num_seeds: int = 4) -> None:
        self.every_n_steps, self.steps, self.num_seeds = every_n_steps, steps, num_seeds

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        for inst in getattr(pl_module, "instances", []):
            curve = inner_loss_curve(pl_module.lopt, inst, self.steps, range(self.num_seeds))
            pl_module.log(f"meta/eval/{inst.label}", float(curve[-10:].mean()), on_step=True, on_epoch=False)
