"""Held-out inner runs: train fresh optimizees with the current θ (no perturbation) and report losses.

Used to watch meta-training (:class:`InnerEvaluation`) and in tests. It reuses the unroll's machinery,
with all particles running the same unperturbed θ on initialisations and batches drawn from a key
space that meta-training never uses, so the runs are held out from the meta-training draws.

Example::

    curve = inner_loss_curve(meta.lopt, meta.instances[0], steps=200, seeds=range(4))   # [200, 4]
    curve[-10:].mean()                    # mean training loss over the last 10 steps
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_lopt.meta.checkpoint import CARD
from lightning_lopt.meta.rng import Stream, generator
from lightning_lopt.meta.tasks import TaskInstance
from lightning_lopt.meta.truncation import LogUniformLengthSchedule
from lightning_lopt.meta.unroll import init_particles, unroll_window
from lightning_lopt.optim.architectures import LearnedOptimizerModule

#: Added to the seed of held-out runs: a key space meta-training draws never use.
HELD_OUT = 2**31
#: The mean over task instances of the held-out losses that :class:`InnerEvaluation` logs and selects by.
MEAN_METRIC = "meta/eval/mean"
#: The card field of a θ kept by :class:`InnerEvaluation`: the value and how it was measured.
SELECTED_BY = "selected_by"


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
    """Every ``every_n_steps`` meta-steps, log the mean loss of held-out inner runs per task instance,
    and optionally keep the θ with the lowest one.

    Logs ``meta/eval/<instance>`` = the mean training loss over the last 10 of ``steps`` inner steps,
    averaged over ``num_seeds`` fresh runs, and :data:`MEAN_METRIC` = their mean over the instances.
    Every evaluation uses the same held-out initialisations and batches, so two θ are compared on
    equal terms: the selection is paired, not at the mercy of which batches a meta-step drew.

    Meta-training's logged ``meta/loss`` cannot tell whether θ improves: it depends on where in
    their episodes the particles are (a resumed run starts fresh episodes, so it falls for a while
    whatever θ does). Measured: continuing MuCelo2's long-run recipe for 340 more meta-steps made it
    worse on its own held-out tasks at 1,000 and 10,000 inner steps (docs/results.md, section 23).
    With ``best_dirpath`` the θ with the lowest :data:`MEAN_METRIC` so far is kept there as a light
    checkpoint (it loads with ``from_pretrained`` and resumes with ``resume_from``), its card's
    ``selected_by`` recording the value and how it was measured. The θ a fit starts from and the one
    it ends with are candidates too, so a continuation never leaves a worse θ there than it started
    with; a resumed fit reads the value already recorded in ``best_dirpath`` (when measured the same
    way) and only replaces that θ with a better one.

    Args:
        every_n_steps: evaluate every this many meta-steps.
        steps: inner steps of each held-out run (choose the horizon you care about: the selection
            is for that horizon).
        num_seeds: held-out runs per task instance.
        best_dirpath: where to keep the best θ; ``None``: only log.

    Example::

        L.Trainer(max_steps=500, callbacks=[InnerEvaluation(every_n_steps=50, steps=200)]).fit(meta)
        # keep the θ that trains the held-out runs best over 1,000 steps
        InnerEvaluation(every_n_steps=50, steps=1000, best_dirpath="runs/my-mulo/best")
    """

    def __init__(
        self, every_n_steps: int = 50, steps: int = 200, num_seeds: int = 4, best_dirpath: str | Path | None = None
    ) -> None:
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("steps", steps, 10), ("num_seeds", num_seeds, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"InnerEvaluation: {name} must be an integer >= {low}, got {value!r}")
        self.every_n_steps, self.steps, self.num_seeds = every_n_steps, steps, num_seeds
        self.best_dirpath = None if best_dirpath is None else Path(best_dirpath)
        #: The lowest mean held-out loss seen (or read from ``best_dirpath``); ``None`` before any.
        self.best: float | None = None
        self._start_pending = False

    def measured_as(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """How a value of :data:`MEAN_METRIC` was measured: only equal ones are comparable."""
        labels = [inst.label for inst in getattr(pl_module, "instances", [])]
        return {"metric": MEAN_METRIC, "steps": self.steps, "num_seeds": self.num_seeds, "instances": labels}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.best_dirpath is None or self.best is not None:
            return
        card_path = self.best_dirpath / CARD
        if not card_path.is_file():
            return
        recorded = (json.loads(card_path.read_text()).get(SELECTED_BY) or {})
        if {k: recorded.get(k) for k in self.measured_as(pl_module)} == self.measured_as(pl_module):
            self.best = float(recorded["value"])
        else:
            rank_zero_warn(
                f"InnerEvaluation: {self.best_dirpath} holds a θ not selected by this evaluation "
                f"({recorded or 'no selected_by on its card'}); it will be replaced by the first θ evaluated here"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_pending = self.best_dirpath is not None and self.best is None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # The starting θ is a candidate. Evaluated here, not in on_train_start: Lightning runs the
        # callbacks' on_train_start before the module's, which restores a resumed run's step and
        # meta-optimizer state, and a kept θ must be a checkpoint the run can continue from.
        if self._start_pending:
            self._start_pending = False
            self._evaluate(trainer, pl_module, log=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module, log=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_dirpath is not None and trainer.global_step % self.every_n_steps:
            self._evaluate(trainer, pl_module, log=False)  # the last θ is a candidate too

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, *, log: bool) -> None:
        instances = getattr(pl_module, "instances", [])
        if not instances:
            return
        losses = {}
        for inst in instances:
            losses[inst.label] = float(inner_loss_curve(pl_module.lopt, inst, self.steps, range(self.num_seeds))[-10:].mean())
        mean = sum(losses.values()) / len(losses)
        if log:
            for label, value in losses.items():
                pl_module.log(f"meta/eval/{label}", value, on_step=True, on_epoch=False)
            pl_module.log(MEAN_METRIC, mean, on_step=True, on_epoch=False)
        if self.best_dirpath is None or not math.isfinite(mean) or (self.best is not None and mean >= self.best):
            return
        self.best = mean
        if trainer.is_global_zero:
            selected = {**self.measured_as(pl_module), "value": mean, "meta_step": trainer.global_step}
            pl_module.save_light_checkpoint(self.best_dirpath, **{SELECTED_BY: selected})

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A full checkpoint may be older than the θ now in best_dirpath (read in setup): keep the lower.
        known = [v for v in (self.best, state_dict.get("best")) if v is not None]
        self.best = min(known) if known else None
