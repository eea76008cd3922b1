"""``MetaTrainer``: PES meta-training of a learned optimizer as an ordinary Lightning fit.

The LightningModule's parameters are θ, the learned optimizer's meta-weights; one training step is
one meta-step (manual optimization):

1. for every task instance (each width of each task), draw ε for its pairs, unroll the ± particles
   for one truncation window (:mod:`~lightning_lopt.meta.unroll`, vmapped over particles) and form
   the PES estimate (:mod:`~lightning_lopt.meta.pes`);
2. average the estimates of all instances with equal weight and zero NaN/inf entries;
3. hand the estimate to Lightning as the gradient of the surrogate ⟨θ, ĝ⟩ (``manual_backward``), so
   DDP averages it over ranks (ranks split the pairs) exactly as it would a loss gradient;
4. step the meta-optimizer (AdamW, warmup + cosine) and clip the *update* norm (lo_spec §4.7).

Logging, progress bars, checkpoints and DDP come from ``lightning.Trainer``. Every random draw is
keyed by (seed, task instance, global pair, meta-step, purpose) (:mod:`~lightning_lopt.meta.rng`).

Checkpoints come at two levels:

- **full** (Lightning's checkpoint, e.g. ``ModelCheckpoint``): θ, the meta-optimizer, the loops and
  every particle's optimizee and optimizer state. Resuming with ``ckpt_path`` is exact.
- **light** (:meth:`MetaTrainer.save_light_checkpoint`, or the :class:`LightCheckpoint` callback):
  θ as a loadable learned-optimizer directory (``model.safetensors`` + ``card.json``), plus the
  meta-optimizer state and the step in ``meta_state.safetensors`` / ``meta_state.json``. A few hundred
  KB; safe to commit. ``resume_from=<dir>`` continues the schedule with fresh episodes;
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
import safetensors.torch
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_lopt import provenance
from lightning_lopt.meta import light_files
from lightning_lopt.meta.augmentation import ReparamAugmentation
from lightning_lopt.meta.meta_optim import WarmupCosine, clipped_step, default_meta_optimizer
from lightning_lopt.meta.pes import PES, pes_gradient, sample_perturbations, window_meta_loss
from lightning_lopt.meta.rng import Stream, generator, seed_of
from lightning_lopt.meta.tasks import Task, TaskInstance
from lightning_lopt.meta.truncation import LogUniformLengthSchedule
from lightning_lopt.meta.unroll import Particles, init_particles, make_loss_and_grad, unroll_window
from lightning_lopt.meta.warm_start import WarmStart, warm_start
from lightning_lopt.optim.architectures import CeloLOpt, LearnedOptimizerModule, SmallFCLOpt, VeLOLOpt
from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.pretrained import from_pretrained, load_checked, save_pretrained

META_STATE_TENSORS = "meta_state.safetensors"
META_STATE_JSON = "meta_state.json"
LIGHT_FORMAT_VERSION = 2  # 2: meta_state.json records a digest of the other files
#: name -> (factory(stage), μ scales?)
LOPTS: dict[str, tuple[Callable[[int], LearnedOptimizerModule], bool]] = {
    "mulo": (lambda stage: SmallFCLOpt(step_mult=0.01), True),
    "lo": (lambda stage: SmallFCLOpt(step_mult=0.001), False),
    "celo": (lambda stage: CeloLOpt(train_phase=stage), False),
    "muvelo": (lambda stage: VeLOLOpt.mu(), True),
    "velo": (lambda stage: VeLOLOpt(), False),
    "celo2": (lambda stage: Celo2LOpt.meta_training(), False),
    "celo2-base": (lambda stage: Celo2LOpt.base(step_mult=1e-3), False),
}
MetaOptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


class _MetaSteps(IterableDataset):
    """The outer loop's "data": an endless count (the work happens in ``training_step``).

    Iterable, so that Lightning adds no DistributedSampler under DDP (ranks split pairs instead).
    """

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


def _frozen(lopt: LearnedOptimizerModule, stage: int | None) -> Callable[[str], bool]:
    """Which θ entries a stage freezes (celo_spec §2.5): stage 1 the scheduler, stage 2 the MLP rule."""
    if isinstance(lopt, CeloLOpt) and stage == 1:
        return lambda name: name.startswith("scheduler.")
    if isinstance(lopt, CeloLOpt) and stage == 2:
        return lambda name: not name.startswith("scheduler.")
    return lambda name: False


class MetaTrainer(L.LightningModule):
    """Meta-train (or fine-tune) a learned optimizer with PES; fit it with ``lightning.Trainer``.

    Args:
        lopt: ``"mulo"``, ``"lo"``, ``"celo"``, ``"muvelo"``, ``"velo"``, ``"celo2"``, ``"celo2-base"`` or an architecture module
            (:mod:`lightning_lopt.optim.architectures`, or any module with ``pure_step`` /
            ``functional.init_state``).
        tasks: the meta-training tasks; every width of every task runs at every meta-step.
        estimator: PES settings (pairs per task instance, σ, truncation length).
        truncation: episode lengths, log-uniform in ``[min_length, max_length]``.
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
        truncation: LogUniformLengthSchedule = LogUniformLengthSchedule(100, 1000),
        initial_offset: int = 50,
        schedule: WarmupCosine | None = WarmupCosine(),
        meta_optimizer: MetaOptimizerFactory | None = None,
        max_update_norm: float | None = 1.0,
        augmentation: ReparamAugmentation | None = None,
        warm_start: WarmStart | None = None,
        stage: int | None = None,
        mu: bool | None = None,
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
        if initial_offset < 0:
            raise ValueError(f"MetaTrainer: initial_offset must be >= 0, got {initial_offset}")
        if stage not in (None, 1, 2):
            raise ValueError(f"MetaTrainer: stage must be 1, 2 or None, got {stage!r}")
        self.lopt, default_mu = self._build_lopt(lopt, stage, seed)
        self.lopt_name = lopt if isinstance(lopt, str) else type(lopt).__name__
        self.mu = default_mu if mu is None else bool(mu)
        if init_from is not None and resume_from is not None:
            raise ValueError("MetaTrainer: give init_from or resume_from, not both")
        if init_from is not None:
            self._load_theta(init_from)
        self._light_state: dict[str, Any] | None = None
        self.warm_start_report: dict[str, Any] | None = None
        if resume_from is not None:
            self._light_state = self._read_light_checkpoint(resume_from)
        frozen = _frozen(self.lopt, stage)
        for name, p in self.lopt.named_parameters():
            p.requires_grad_(not frozen(name))
        self.trainable_names = [n for n, p in self.lopt.named_parameters() if p.requires_grad]
        if not self.trainable_names:
            raise ValueError("MetaTrainer: this stage leaves no trainable meta-parameter")
        self.tasks = list(tasks)
        self.estimator = estimator
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
        self.instances: list[TaskInstance] = [i for t in self.tasks for i in t.build(lopt_is_mu=self.mu)]
        self._particles: list[Particles | None] = [None] * len(self.instances)
        self._restored: list[dict[str, Any] | None] | None = None
        self._loss_and_grad: list[Callable[..., Any]] = []
        self._pair_offset = 0
        self._local_pairs = estimator.num_pairs
        self.compute_seconds = 0.0
        # Plain JSON-like values only, so Lightning checkpoints load with weights_only=True.
        self.save_hyperparameters({**self.card()["recipe"], "tasks": [i.label for i in self.instances]})

    # -- construction ------------------------------------------------------------------------------

    @staticmethod
    def _build_lopt(lopt: str | LearnedOptimizerModule, stage: int | None, seed: int) -> tuple[LearnedOptimizerModule, bool]:
        if isinstance(lopt, str):
            key = lopt.lower()
            if key not in LOPTS:
                raise ValueError(f"MetaTrainer: unknown learned optimizer {lopt!r}; known: {', '.join(LOPTS)}")
            if key == "celo" and stage is None:
                stage = 1
            if key != "celo" and stage is not None:
                raise ValueError(f"MetaTrainer: stage applies to celo only, not {lopt!r}")
            factory, mu = LOPTS[key]
            module = factory(stage or 1)
            module.reset_parameters(torch.Generator().manual_seed(seed))
            return module, mu
        if not hasattr(lopt, "pure_step") or not hasattr(lopt, "functional"):
            raise TypeError(f"MetaTrainer: lopt must be a name or a learned-optimizer module, got {type(lopt).__name__}")
        return lopt, False

    def _load_theta(self, source: str | Path) -> None:
        loaded = from_pretrained(source)
        if type(loaded) is not type(self.lopt):
            raise TypeError(f"init_from {source}: holds {type(loaded).__name__}, this run trains {type(self.lopt).__name__}")
        if isinstance(loaded, CeloLOpt) and isinstance(self.lopt, CeloLOpt):
            loaded.train_phase = self.lopt.train_phase  # stage 2 starts from stage-1 weights
        load_checked(self.lopt, loaded.state_dict(), str(source))

    # -- Lightning hooks -----------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.meta_optimizer_factory([p for p in self.lopt.parameters() if p.requires_grad])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_MetaSteps(), batch_size=None)

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        if self.estimator.num_pairs % world:
            raise ValueError(
                f"MetaTrainer: {self.estimator.num_pairs} pairs per task cannot be split evenly over {world} ranks"
            )
        self._local_pairs = self.estimator.num_pairs // world
        self._pair_offset = rank * self._local_pairs
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if device.type != "cpu":
            self.instances = [i for t in self.tasks for i in t.build(lopt_is_mu=self.mu, device=device)]
        self._loss_and_grad = [make_loss_and_grad(i, self.augmentation is not None) for i in self.instances]

    def on_train_start(self) -> None:
        fresh = self.global_step == 0 and self._light_state is None and self._restored is None
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
            _warn_nothing_left(self.global_step, max_steps)
            return
        if fresh and self.warm_start is not None and self.warm_start_report is None:
            self.warm_start_report = warm_start(self.lopt, self.instances, self.warm_start, mu=self.mu)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["meta_trainer"] = {
            "particles": [None if p is None else p.state_dict() for p in self._particles],
            "compute_seconds": self.compute_seconds,
            "warm_start_report": json.dumps(self.warm_start_report),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_same_run(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
        step = int(checkpoint.get("global_step", 0))
        if self._trainer is not None and 0 <= self.trainer.max_steps <= step:
            _warn_nothing_left(step, self.trainer.max_steps)
        saved = checkpoint.get("meta_trainer", {})
        self._restored = saved.get("particles")
        self.compute_seconds = saved.get("compute_seconds", 0.0)
        self.warm_start_report = json.loads(saved.get("warm_start_report", "null"))

    # -- one meta-step -------------------------------------------------------------------------------

    def _theta_flat(self) -> Tensor:
        params = dict(self.lopt.named_parameters())
        return torch.cat([params[n].detach().flatten() for n in self.trainable_names])

    def _stack_theta(self, flat: Tensor, eps: Tensor) -> dict[str, Tensor]:
        """θ ± ε for the 2N particles: ``{name: [2N, *shape]}`` (frozen entries broadcast)."""
        n = eps.shape[0]
        stacked = torch.cat([flat + eps, flat - eps])
        out: dict[str, Tensor] = {}
        offset = 0
        trainable = set(self.trainable_names)
        for name, p in self.lopt.named_parameters():
            if name in trainable:
                out[name] = stacked[:, offset : offset + p.numel()].view(2 * n, *p.shape)
                offset += p.numel()
            else:
                out[name] = p.detach().expand(2 * n, *p.shape)
        return out

    def _keys(self, index: int, step: int) -> Callable[[Stream, int, int], torch.Generator]:
        offset = self._pair_offset
        return lambda stream, pair, t: generator(self.seed, index, offset + pair, step, int(stream), t)

    def _particles_for(self, index: int, theta_pm: dict[str, Tensor], step: int, dim: int) -> Particles:
        inst = self.instances[index]
        fresh = init_particles(
            inst, self.lopt, theta_pm, self._keys(index, step), self.truncation, self.initial_offset,
            self.augmentation, self._local_pairs, dim,
        )
        if self._restored is not None and self._restored[index] is not None:
            restored = Particles.from_state_dict(self._restored[index], fresh, inst.data.device)
            self._restored[index] = None
            return restored
        return fresh

    def meta_gradient(self, step: int) -> tuple[Tensor, dict[str, float]]:
        """The PES estimate of this rank's pairs at ``step``, averaged over task instances.

        Advances every particle by one truncation window. Returns ``(grad [D], logs)``.
        """
        flat = self._theta_flat()
        dim = flat.numel()
        n, pes = self._local_pairs, self.estimator
        pairs = range(self._pair_offset, self._pair_offset + n)
        grads, logs = [], {}
        resets = nan_resets = 0
        for index, inst in enumerate(self.instances):
            eps_gens = [generator(self.seed, index, j, step, int(Stream.PERTURBATION)) for j in pairs]
            eps = sample_perturbations(dim, pes.std, eps_gens).to(flat.device)
            theta_pm = self._stack_theta(flat, eps)
            particles = self._particles[index] or self._particles_for(index, theta_pm, step, dim)
            data_gens = [generator(self.seed, index, j, step, int(Stream.DATA)) for j in pairs]
            batches = inst.sample(pes.trunc_length, data_gens)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_of(self.seed, index, step, int(Stream.DROPOUT)))
                particles, out = unroll_window(
                    inst, self.lopt, theta_pm, particles, batches, self._keys(index, step),
                    self.truncation, self.augmentation, self._loss_and_grad[index],
                )
            delta = out.losses[:, :n] - out.losses[:, n:]
            grad, particles.accum = pes_gradient(delta, out.masks, out.dones, eps, particles.accum, pes.std)
            self._particles[index] = particles
            grads.append(grad)
            logs[f"meta/loss/{inst.label}"] = float(window_meta_loss(out.losses[:, :n], out.losses[:, n:], out.masks))
            resets += out.resets
            nan_resets += out.nan_resets
        mean = torch.stack(grads).mean(dim=0)
        logs["meta/nonfinite_grad"] = float((~torch.isfinite(mean)).sum())
        logs["meta/resets"] = float(resets)
        logs["meta/nan_resets"] = float(nan_resets)
        logs["meta/loss"] = sum(v for k, v in logs.items() if k.startswith("meta/loss/")) / len(self.instances)
        return torch.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0), logs

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
        inner = 2 * self._local_pairs * self.estimator.trunc_length * len(self.instances)
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
                "stage": self.stage,
                "estimator": vars(self.estimator),
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

    def save_light_checkpoint(self, directory: str | Path) -> Path:
        """θ (loadable with ``from_pretrained``) plus the meta-optimizer state and step.

        Written atomically (:func:`~lightning_lopt.meta.light_files.write_atomically`);
        ``meta_state.json`` records the step and a digest of the other files.
        """
        optimizer = self.optimizers().optimizer
        state = optimizer.state_dict()
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value

        def write(tmp: Path) -> None:
            self.save_pretrained(tmp)
            safetensors.torch.save_file(tensors, str(tmp / META_STATE_TENSORS))
            meta = {
                "format_version": LIGHT_FORMAT_VERSION,
                "meta_step": self.global_step,
                "digest": light_files.digest(tmp),
                "compute_seconds": self.compute_seconds,
                "seed": self.seed,
                "param_groups": state["param_groups"],
                "scalars": scalars,
                "trainable_names": self.trainable_names,
            }
            (tmp / META_STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")

        return light_files.write_atomically(directory, write)

    def _read_light_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from {path}: no such directory (relative paths start at {Path.cwd()})")
        if not (path / META_STATE_JSON).is_file():
            raise FileNotFoundError(
                f"resume_from {path}: no {META_STATE_JSON}; is it a light checkpoint? (weights only: use init_from)"
            )
        meta = light_files.read_json(path / META_STATE_JSON, "restore the directory from one save")
        light_files.check_consistent(path, meta)
        self._load_theta(path)
        card = light_files.read_json(path / "card.json", "restore the directory from one save")
        report = (card.get("recipe") or {}).get("warm_start")
        self.warm_start_report = report if report and "relative_error_end" in report else None
        try:
            tensors = safetensors.torch.load_file(str(path / META_STATE_TENSORS))
        except (safetensors.SafetensorError, OSError) as err:
            raise ValueError(
                f"resume_from {path}: {META_STATE_TENSORS} is truncated or corrupt ({err}); restore the "
                "directory from one save, resume from a full checkpoint (--ckpt_path), or start from its "
                "weights only with init_from"
            ) from err
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for index, values in meta["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        return {
            "optimizer": {"state": state, "param_groups": meta["param_groups"]},
            "meta_step": int(meta["meta_step"]),
            "compute_seconds": float(meta.get("compute_seconds", 0.0)),
        }


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


__all__ = ["LOPTS", "LightCheckpoint", "MetaTrainer"]

#: Recipe entries that define what a full checkpoint's state means: a checkpoint whose entries differ
#: cannot continue this run. The others (schedule, update clip, name) may change on purpose; a
#: difference is reported, since it makes the continuation differ from an uninterrupted run.
_SAME_RUN_KEYS = ("lopt", "mu", "stage", "tasks", "estimator", "truncation", "initial_offset", "augmentation", "seed")


def _warn_nothing_left(step: int, max_steps: int) -> None:
    rank_zero_warn(
        f"MetaTrainer: the run resumes at meta-step {step} and max_steps is {max_steps}: nothing is left "
        "to run; raise --trainer.max_steps to continue it"
    )


def check_same_run(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a full checkpoint of another run; warn about settings that changed on resume."""
    if not saved:
        return
    differ = [k for k in _SAME_RUN_KEYS if k in saved and saved[k] != current.get(k)]
    if differ:
        lines = "; ".join(f"{k}: checkpoint {saved[k]!r}, recipe {current.get(k)!r}" for k in differ)
        raise ValueError(
            f"MetaTrainer: the checkpoint comes from a different run ({lines}); resume with the recipe "
            "that wrote it, or start from its weights with --model.init_from"
        )
    changed = [k for k in ("schedule", "max_update_norm") if k in saved and saved[k] != current.get(k)]
    if changed:
        rank_zero_warn(
            "MetaTrainer: resuming with changed "
            + "; ".join(f"{k} ({saved[k]!r} -> {current.get(k)!r})" for k in changed)
            + ": the continuation differs from an uninterrupted run"
        )

