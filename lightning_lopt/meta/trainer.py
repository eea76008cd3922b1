"""``MetaTrainer``: PES meta-training of a learned optimizer as an ordinary Lightning fit.

The LightningModule's parameters are θ, the learned optimizer's meta-weights; one training step is
one meta-step (manual optimization):

1. estimate the meta-gradient with PES over every task instance (each width of each task):
   :class:`~lightning_lopt.meta.estimator.PESEstimator` advances each instance's ± particles by one
   truncation window and averages the instances' estimates;
2. hand the estimate to Lightning as the gradient of the surrogate ⟨θ, ĝ⟩ (``manual_backward``), so
   DDP averages it over ranks (ranks split the pairs) exactly as it would a loss gradient;
3. step the meta-optimizer (AdamW, warmup + cosine) and clip the *update* norm (docs/reference/pes.md#meta-optimizer).

Logging, progress bars, checkpoints and DDP come from ``lightning.Trainer``. Every random draw is
keyed by (seed, task instance, global pair, meta-step, purpose) (:mod:`~lightning_lopt.meta.rng`).

Checkpoints come at two levels:

- **full** (Lightning's checkpoint, e.g. ``ModelCheckpoint``): θ, the meta-optimizer, the loops and
  every particle's optimizee and optimizer state. Resuming with ``ckpt_path`` is exact.
- **light** (:meth:`MetaTrainer.save_light_checkpoint`, or the :class:`LightCheckpoint` callback):
  θ as a loadable learned-optimizer directory plus the meta-optimizer state and the step
  (:mod:`~lightning_lopt.meta.checkpoint`). A few hundred KB; safe to commit. ``resume_from=<dir>`` continues the schedule with fresh episodes;
  ``init_from=<dir or packaged name>`` only reads θ (fine-tuning).

Example::

    import lightning as L
    from lightning_lopt.meta import MetaTrainer, Task, ImageMLPTask

    meta = MetaTrainer("mulo", tasks=[ImageMLPTask("digits", widths=[32, 64])])
    L.Trainer(max_steps=500).fit(meta)
    meta.save_pretrained("runs/my-mulo")                 # then MuLO(..., meta_weights="runs/my-mulo")
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_lopt import provenance
from lightning_lopt.checks import check_positive_number
from lightning_lopt.meta.augmentation import ReparamAugmentation
from lightning_lopt.meta.catalogue import build_lopt, frozen_by_stage
from lightning_lopt.meta.checkpoint import (
    check_same_run,
    read_light_checkpoint,
    warn_nothing_left,
    write_light_checkpoint,
)
from lightning_lopt.meta.estimator import EstimatorSettings, PESEstimator
from lightning_lopt.meta.meta_optim import WarmupCosine, clipped_step, default_meta_optimizer
from lightning_lopt.meta.pes import META_OBJECTIVES, PES
from lightning_lopt.meta.tasks import Task, TaskInstance
from lightning_lopt.meta.truncation import LogUniformLengthSchedule
from lightning_lopt.meta.warm_start import WarmStart, warm_start
from lightning_lopt.optim.architectures import CeloLOpt, LearnedOptimizerModule
from lightning_lopt.optim.pretrained import from_pretrained, load_checked, save_pretrained

MetaOptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


class _MetaSteps(IterableDataset):
    """The outer loop's "data": an endless count (the work happens in ``training_step``).

    Iterable, so that Lightning adds no DistributedSampler under DDP (ranks split pairs instead).
    """

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class MetaTrainer(L.LightningModule):
    """Meta-train (or fine-tune) a learned optimizer with PES; fit it with ``lightning.Trainer``.

    Args:
        lopt: ``"mulo"``, ``"lo"``, ``"celo"``, ``"muvelo"``, ``"velo"``, ``"celo2"``, ``"celo2-base"`` or an architecture module
            (:mod:`lightning_lopt.optim.architectures`, or any module with ``pure_step`` /
            ``functional.init_state``).
        tasks: the meta-training tasks; every width of every task runs at every meta-step.
        estimator: PES settings (pairs per task instance, σ, truncation length).
        meta_objective: what PES differentiates per inner step: ``"loss"`` (the normalised loss, μLO's
            and Celo's choice) or ``"log"`` (its logarithm, floored at 1e-3: relative improvements
            count the same at every loss level; :func:`~lightning_lopt.meta.pes.meta_objective`).
            The logged ``meta/loss`` is the normalised loss either way.
        truncation: episode lengths, log-uniform in ``[min_length, max_length]`` (or two ranges).
        initial_offset: the first episode starts at a random inner step in ``[0, initial_offset)``.
        schedule: the meta-learning-rate schedule (``None``: the meta-optimizer's own lr).
        meta_optimizer: ``params -> Optimizer`` (default AdamW, wd 1e-4, optax's betas and eps).
        max_update_norm: clip of the meta-optimizer's update norm (``None``: no clip).
        augmentation: Celo's weight re-parametrisation (``None``: off).
        warm_start: before the first meta-step of a fresh run, regress θ's step onto a tuned
            (μ)Adam's on the tasks (:mod:`~lightning_lopt.meta.warm_start`); recorded on the card.
        stage: Celo's stage: 1 trains the update rule without the scheduler, 2 freezes the rule and
            trains the scheduler (``init_from`` the stage-1 weights). ``None`` for other optimizers.
        mu: whether the optimizer uses μP update scales (default: from the name; False for a module).
        base_width: μP scales relative to this width, as ``MuCelo2(base_width=...)`` uses them
            (hidden ``base_width / fan_in``, readout ``base_width / base fan-in``); ``None``: μLO's
            absolute scales. Needs a μ optimizer; recorded on the card.
        hidden_norm: ``"rms"`` (default) or ``"spectral"``: hidden matrices' steps as
            ``MuCelo2(hidden_norm=...)`` sizes them (``"spectral"`` needs a μ optimizer and only
            changes Celo2-family steps); recorded on the card. ``MuCelo2``'s default is
            ``"spectral"``; the default here stays ``"rms"``, what the committed runs used.
        init_from: a packaged name or a directory written by :meth:`save_pretrained` /
            :meth:`save_light_checkpoint`: start from these weights (fine-tuning).
        resume_from: a light checkpoint directory: continue its θ, meta-optimizer and step count.
        seed: the meta-initialisation and every draw of the run.
        recipe: a name for the card (e.g. ``"mulo_s_cpu"``).
    """

    def __init__(
        self,
        lopt: str | LearnedOptimizerModule = "mulo",
        tasks: Sequence[Task] = (),
        estimator: PES = PES(),
        meta_objective: str = "loss",
        truncation: LogUniformLengthSchedule = LogUniformLengthSchedule(100, 1000),
        initial_offset: int = 50,
        schedule: WarmupCosine | None = WarmupCosine(),
        meta_optimizer: MetaOptimizerFactory | None = None,
        max_update_norm: float | None = 1.0,
        augmentation: ReparamAugmentation | None = None,
        warm_start: WarmStart | None = None,
        stage: int | None = None,
        mu: bool | None = None,
        base_width: float | None = None,
        hidden_norm: str = "rms",
        init_from: str | None = None,
        resume_from: str | None = None,
        seed: int = 0,
        recipe: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if not tasks:
            raise ValueError("MetaTrainer: give at least one Task")
        if estimator.trunc_length > truncation.max_length:
            raise ValueError(
                f"MetaTrainer: the truncation ({estimator.trunc_length} steps) is longer than the longest "
                f"episode ({truncation.max_length}); lower estimator.trunc_length or raise truncation.max_length"
            )
        if meta_objective not in META_OBJECTIVES:
            raise ValueError(f"MetaTrainer: meta_objective must be one of {META_OBJECTIVES}, got {meta_objective!r}")
        if initial_offset < 0:
            raise ValueError(f"MetaTrainer: initial_offset must be >= 0, got {initial_offset}")
        if stage not in (None, 1, 2):
            raise ValueError(f"MetaTrainer: stage must be 1, 2 or None, got {stage!r}")
        self.lopt, default_mu = build_lopt(lopt, stage, seed)
        self.lopt_name = lopt if isinstance(lopt, str) else type(lopt).__name__
        self.mu = default_mu if mu is None else bool(mu)
        # Task.build refuses a base width for a non-μ optimizer.
        self.base_width = None if base_width is None else check_positive_number("MetaTrainer: base_width", base_width)
        self.hidden_norm = hidden_norm  # Task.build checks it against the optimizer
        if init_from is not None and resume_from is not None:
            raise ValueError("MetaTrainer: give init_from or resume_from, not both")
        # The weights a fine-tune started from, with their own chain, so a card's compute is complete.
        self.started_from: dict[str, Any] | None = None
        if init_from is not None:
            self.started_from = started_from_entry(init_from, self._load_theta(init_from))
        self._light_state: dict[str, Any] | None = None
        self.warm_start_report: dict[str, Any] | None = None
        if resume_from is not None:
            self._light_state = read_light_checkpoint(resume_from, self._load_theta)
            self.warm_start_report = self._light_state["warm_start_report"]
            self.started_from = self._light_state["started_from"]
        frozen = frozen_by_stage(self.lopt, stage)
        for name, p in self.lopt.named_parameters():
            p.requires_grad_(not frozen(name))
        self.trainable_names = [n for n, p in self.lopt.named_parameters() if p.requires_grad]
        if not self.trainable_names:
            raise ValueError("MetaTrainer: this stage leaves no trainable meta-parameter")
        self.tasks = list(tasks)
        self.estimator = estimator
        self.meta_objective = meta_objective
        self.truncation = truncation
        self.initial_offset = initial_offset
        self.schedule = schedule
        self.meta_optimizer_factory = meta_optimizer or default_meta_optimizer
        self.max_update_norm = max_update_norm
        self.augmentation = augmentation
        self.warm_start = warm_start
        self.stage = stage
        self.seed = seed
        self.recipe = recipe
        # Built now, on the CPU, so that bad tasks and missing data fail before any compute.
        instances = [
            i for t in self.tasks
            for i in t.build(lopt_is_mu=self.mu, base_width=self.base_width, hidden_norm=self.hidden_norm)
        ]
        settings = EstimatorSettings(estimator, truncation, initial_offset, augmentation, seed, meta_objective)
        self.gradient_estimator = PESEstimator(self.lopt, self.trainable_names, instances, settings)
        self._full_resume = False
        self.compute_seconds = 0.0
        # Plain JSON-like values only, so Lightning checkpoints load with weights_only=True.
        self.save_hyperparameters({**self.card()["recipe"], "tasks": [i.label for i in self.instances]})

    # -- construction ------------------------------------------------------------------------------

    @property
    def instances(self) -> list[TaskInstance]:
        """The task instances (each width of each task), on the fit's device once it is set up."""
        return self.gradient_estimator.instances

    def _load_theta(self, source: str | Path) -> dict[str, Any]:
        """Load θ from ``source``; returns its card."""
        loaded = from_pretrained(source)
        if type(loaded) is not type(self.lopt):
            raise TypeError(f"init_from {source}: holds {type(loaded).__name__}, this run trains {type(self.lopt).__name__}")
        if isinstance(loaded, CeloLOpt) and isinstance(self.lopt, CeloLOpt):
            loaded.train_phase = self.lopt.train_phase  # stage 2 starts from stage-1 weights
        load_checked(self.lopt, loaded.state_dict(), str(source))
        return dict(getattr(loaded, "card", {}))

    # -- Lightning hooks -----------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.meta_optimizer_factory([p for p in self.lopt.parameters() if p.requires_grad])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_MetaSteps(), batch_size=None)

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        self.gradient_estimator.shard(world, rank)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        on_device = None
        if device.type != "cpu":
            on_device = [
                i for t in self.tasks for i in t.build(
                    lopt_is_mu=self.mu, device=device, base_width=self.base_width, hidden_norm=self.hidden_norm
                )
            ]
        self.gradient_estimator.prepare(on_device)

    def on_train_start(self) -> None:
        fresh = self.global_step == 0 and self._light_state is None and not self._full_resume
        if self._light_state is not None:
            state, self._light_state = self._light_state, None
            optimizer = self.optimizers().optimizer
            optimizer.load_state_dict(state["optimizer"])
            # Continue the step count (the schedule and every draw depend on it) as a full resume
            # would, and the loggers' step axis with it.
            loop = self.trainer.fit_loop.epoch_loop
            progress = loop.manual_optimization.optim_step_progress
            progress.total.ready = progress.total.completed = state["meta_step"]
            loop._batches_that_stepped = state["meta_step"]
            self.compute_seconds = state["compute_seconds"]
        max_steps = self.trainer.max_steps
        if not fresh and 0 <= max_steps <= self.global_step:
            warn_nothing_left(self.global_step, max_steps)
            return
        if fresh and self.warm_start is not None and self.warm_start_report is None:
            self.warm_start_report = warm_start(self.lopt, self.instances, self.warm_start, mu=self.mu)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["meta_trainer"] = {
            "particles": self.gradient_estimator.state_dict(),
            "compute_seconds": self.compute_seconds,
            "warm_start_report": json.dumps(self.warm_start_report),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_same_run(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
        step = int(checkpoint.get("global_step", 0))
        if self._trainer is not None and 0 <= self.trainer.max_steps <= step:
            warn_nothing_left(step, self.trainer.max_steps)
        saved = checkpoint.get("meta_trainer", {})
        if saved.get("particles") is not None:
            self.gradient_estimator.load_state_dict(saved["particles"])
            self._full_resume = True
        self.compute_seconds = saved.get("compute_seconds", 0.0)
        self.warm_start_report = json.loads(saved.get("warm_start_report", "null"))

    # -- one meta-step -------------------------------------------------------------------------------

    def _theta_flat(self) -> Tensor:
        params = dict(self.lopt.named_parameters())
        return torch.cat([params[n].detach().flatten() for n in self.trainable_names])

    def meta_gradient(self, step: int) -> tuple[Tensor, dict[str, float]]:
        """The PES estimate of this rank's pairs at ``step``, averaged over task instances.

        Advances every particle by one truncation window. Returns ``(grad [D], logs)``.
        """
        return self.gradient_estimator.estimate(self._theta_flat(), step)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        start = time.perf_counter()
        step = self.global_step
        optimizer = self.optimizers()
        if self.schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.schedule(step)
        grad, logs = self.meta_gradient(step)
        optimizer.zero_grad()
        # ⟨θ, ĝ⟩ has gradient ĝ: Lightning's backward (and DDP's all-reduce) carries the estimate.
        params = dict(self.lopt.named_parameters())
        surrogate = torch.zeros((), device=grad.device)
        offset = 0
        for name in self.trainable_names:
            p = params[name]
            surrogate = surrogate + (p * grad[offset : offset + p.numel()].view_as(p)).sum()
            offset += p.numel()
        self.manual_backward(surrogate)
        global_grad = torch.cat([params[n].grad.flatten() for n in self.trainable_names])
        update_norm = clipped_step(optimizer.optimizer, self.max_update_norm, step=optimizer.step)
        elapsed = time.perf_counter() - start
        self.compute_seconds += elapsed
        inner = 2 * len(self.gradient_estimator.pairs) * self.estimator.trunc_length * len(self.instances)
        logs.update(
            {
                "meta/grad_norm": float(torch.linalg.vector_norm(global_grad)),
                "meta/update_norm": update_norm,
                "meta/lr": float(optimizer.param_groups[0]["lr"]),
                "meta/inner_steps_per_s": inner / elapsed,
            }
        )
        self.log_dict({k: v for k, v in logs.items() if k != "meta/loss"}, on_step=True, on_epoch=False)
        self.log("meta/loss", logs["meta/loss"], on_step=True, on_epoch=False, prog_bar=True)
        theta_finite = all(bool(torch.isfinite(p).all()) for p in self.lopt.parameters())
        if not theta_finite:
            raise FloatingPointError("MetaTrainer: θ became non-finite; lower the meta learning rate")

    # -- weights and light checkpoints -----------------------------------------------------------------

    def card(self) -> dict[str, Any]:
        """What the weight card records about this run."""
        return {
            "recipe": {
                "name": self.recipe,
                "lopt": self.lopt_name,
                "mu": self.mu,
                "base_width": self.base_width,
                "hidden_norm": self.hidden_norm,
                "stage": self.stage,
                "estimator": vars(self.estimator),
                "meta_objective": self.meta_objective,
                "truncation": vars(self.truncation),
                "initial_offset": self.initial_offset,
                "schedule": None if self.schedule is None else vars(self.schedule),
                "max_update_norm": self.max_update_norm,
                "augmentation": None if self.augmentation is None else vars(self.augmentation),
                "warm_start": self.warm_start_report
                or (None if self.warm_start is None else {"settings": vars(self.warm_start)}),
                "seed": self.seed,
            },
            "meta_training_steps": self.global_step if self._trainer is not None else 0,
            "started_from": self.started_from,
            "tasks": [i.label for i in self.instances],
            "data": sorted({type(t.datamodule).__name__ for t in self.tasks}),
            "compute": {
                "seconds": round(self.compute_seconds, 1),
                "machine": provenance.machine(),
                "device": str(self.device),
                "torch_threads": torch.get_num_threads(),
            },
        }

    def save_pretrained(self, directory: str | Path, **extra: Any) -> Path:
        """Write θ as a learned-optimizer directory (``model.safetensors`` + ``card.json``)."""
        card = self.card()
        card.update(extra)
        return save_pretrained(self.lopt, directory, **card)

    def save_light_checkpoint(self, directory: str | Path, **card: Any) -> Path:
        """θ (loadable with ``from_pretrained``) plus the meta-optimizer state and step.

        Written atomically (:func:`~lightning_lopt.meta.checkpoint.write_light_checkpoint`);
        ``meta_state.json`` records the step and a digest of the other files. ``card`` adds
        JSON-serialisable fields to the card (e.g. ``selected_by``).
        """
        return write_light_checkpoint(
            directory,
            lambda tmp: self.save_pretrained(tmp, **card),
            self.optimizers().optimizer.state_dict(),
            meta_step=self.global_step,
            compute_seconds=self.compute_seconds,
            seed=self.seed,
            trainable_names=self.trainable_names,
        )


class LightCheckpoint(L.Callback):
    """Write a light checkpoint every ``every_n_steps`` meta-steps and at the end of the fit (rank 0).

    Args:
        dirpath: the directory (replaced atomically each time; it always holds the latest step).
        every_n_steps: how often.

    Example::

        L.Trainer(max_steps=1000, callbacks=[LightCheckpoint("runs/mulo/light", 50)]).fit(meta)
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"LightCheckpoint: every_n_steps must be >= 1, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and isinstance(pl_module, MetaTrainer):
            pl_module.save_light_checkpoint(self.dirpath)


def started_from_entry(source: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """What a fine-tune's card records about the weights it started from (``init_from``).

    The source's recipe, meta-steps and compute, and its own ``started_from``, so the chain back to
    a meta-initialisation, and the compute it took, can be read off the last card.

    Example::

        started_from_entry("checkpoints/meta/celo2_cpu", from_pretrained("checkpoints/meta/celo2_cpu").card)
        # {"source": "checkpoints/meta/celo2_cpu", "recipe": "celo2_cpu", "meta_training_steps": 690, ...}
    """
    return {
        "source": str(source),
        "recipe": (card.get("recipe") or {}).get("name"),
        "meta_training_steps": card.get("meta_training_steps"),
        "compute_seconds": (card.get("compute") or {}).get("seconds"),
        "started_from": card.get("started_from"),
    }


__all__ = ["LightCheckpoint", "MetaTrainer"]
