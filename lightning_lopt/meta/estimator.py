"""The PES gradient estimate over every task instance (learned_optimization's ``GradientEstimator``).

One :class:`TaskWorker` per task instance (each width of each task) owns that instance's share of
the estimate: its ± particles (with PES's per-pair accumulators, :class:`~.unroll.Particles`), its
vmapped loss-and-grad, and a saved state waiting to be restored after a full-checkpoint resume.
:class:`PESEstimator` runs every worker for one truncation window and averages their estimates:

1. per worker, draw ε for its pairs, unroll the ± particles for one window
   (:func:`~.unroll.unroll_windows`) and form the PES estimate (:func:`~.pes.pes_gradient`);
   workers whose instances share an architecture (:func:`~.unroll.batch_key`, e.g. one MLP on
   several data sets) unroll as one group, one vmapped loss-and-grad and one particle step per
   inner step for all of them, which is what a tiny task's step costs: per-call overhead;
2. average the estimates of all instances with equal weight and zero NaN/inf entries.

Every random draw is keyed by (seed, task instance, global pair, meta-step, purpose)
(:mod:`~lightning_lopt.meta.rng`), so ranks that split the pairs (:meth:`PESEstimator.shard`) draw
exactly what one process running all pairs would.

Example::

    est = PESEstimator(lopt, trainable_names, instances, EstimatorSettings(PES(num_pairs=4), schedule, 50, None, seed=0))
    est.prepare()
    grad, logs = est.estimate(theta_flat, step=0)     # grad [D]; logs["meta/loss"], ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_lopt.meta.augmentation import ReparamAugmentation
from lightning_lopt.meta.pes import PES, meta_objective, pes_gradient, sample_perturbations, window_meta_loss
from lightning_lopt.meta.rng import Stream, generator, seed_of
from lightning_lopt.meta.tasks import TaskInstance
from lightning_lopt.meta.truncation import LogUniformLengthSchedule
from lightning_lopt.meta.unroll import (
    Particles, WindowInput, WindowResult, batch_key, init_particles, make_loss_and_grad, unroll_windows,
)
from lightning_lopt.optim.architectures import LearnedOptimizerModule


@dataclass(frozen=True)
class EstimatorSettings:
    """What every worker of one run shares: the PES settings, episodes, augmentation and the seed."""

    pes: PES
    truncation: LogUniformLengthSchedule
    initial_offset: int
    augmentation: ReparamAugmentation | None
    seed: int
    meta_objective: str = "loss"  # pes.META_OBJECTIVES


def stack_theta(lopt: LearnedOptimizerModule, trainable_names: Sequence[str], flat: Tensor, eps: Tensor) -> dict[str, Tensor]:
    """θ ± ε for the 2N particles: ``{name: [2N, *shape]}`` (frozen entries broadcast).

    ``flat`` holds the trainable entries of ``lopt`` in ``trainable_names`` order; ``eps`` is ``[N, D]``.
    """
    n = eps.shape[0]
    stacked = torch.cat([flat + eps, flat - eps])
    out: dict[str, Tensor] = {}
    offset = 0
    trainable = set(trainable_names)
    for name, p in lopt.named_parameters():
        if name in trainable:
            out[name] = stacked[:, offset : offset + p.numel()].view(2 * n, *p.shape)
            offset += p.numel()
        else:
            out[name] = p.detach().expand(2 * n, *p.shape)
    return out


@dataclass
class WorkerResult:
    """One worker's window: its estimate ``[D]``, meta-loss and reset counts."""

    grad: Tensor
    meta_loss: float
    resets: int
    nan_resets: int


class TaskWorker:
    """One task instance's part of the PES estimate: particles, accumulators, loss-and-grad, restore.

    Args:
        instance: the task instance (one width of one task).
        index: its position among the run's instances (part of every random key).
        lopt: the learned optimizer whose θ the particles run.
        trainable_names: the θ entries that ``flat`` in :meth:`estimate` holds, in order.
        settings: what all workers share.
    """

    def __init__(
        self,
        instance: TaskInstance,
        index: int,
        lopt: LearnedOptimizerModule,
        trainable_names: Sequence[str],
        settings: EstimatorSettings,
    ) -> None:
        self.instance = instance
        self.index = index
        self.lopt = lopt
        self.trainable_names = list(trainable_names)
        self.settings = settings
        self.particles: Particles | None = None
        self._restored: dict[str, Any] | None = None
        self._loss_and_grad: Callable[..., Any] | None = None

    def prepare(self) -> None:
        """Build the vmapped loss-and-grad for the instance (after it is on its device)."""
        self._loss_and_grad = make_loss_and_grad(self.instance, self.settings.augmentation is not None)

    def state_dict(self) -> dict[str, Any] | None:
        """The particles as plain tensors (``None`` before the first window)."""
        return None if self.particles is None else self.particles.state_dict()

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        """Keep ``saved`` to restore the particles at the next window (their structure needs θ)."""
        self._restored = saved

    def _keys(self, step: int, pair_offset: int) -> Callable[[Stream, int, int], torch.Generator]:
        seed, index = self.settings.seed, self.index
        return lambda stream, pair, t: generator(seed, index, pair_offset + pair, step, int(stream), t)

    def _particles_for(self, theta_pm: dict[str, Tensor], step: int, pairs: range, dim: int) -> Particles:
        s = self.settings
        fresh = init_particles(
            self.instance, self.lopt, theta_pm, self._keys(step, pairs.start), s.truncation, s.initial_offset,
            s.augmentation, len(pairs), dim,
        )
        if self._restored is not None:
            restored = Particles.from_state_dict(self._restored, fresh, self.instance.data.device)
            self._restored = None
            return restored
        return fresh

    def window_input(self, flat: Tensor, step: int, pairs: range) -> tuple[WindowInput, Tensor]:
        """This instance's share of the window at θ = ``flat`` for ``pairs``, and its ε ``[N, D]``."""
        s, inst = self.settings, self.instance
        dim = flat.numel()
        eps_gens = [generator(s.seed, self.index, j, step, int(Stream.PERTURBATION)) for j in pairs]
        eps = sample_perturbations(dim, s.pes.std, eps_gens).to(flat.device)
        theta_pm = stack_theta(self.lopt, self.trainable_names, flat, eps)
        particles = self.particles or self._particles_for(theta_pm, step, pairs, dim)
        data_gens = [generator(s.seed, self.index, j, step, int(Stream.DATA)) for j in pairs]
        batches = inst.sample(s.pes.trunc_length, data_gens)
        return WindowInput(inst, theta_pm, particles, batches, self._keys(step, pairs.start)), eps

    def finish(self, particles: Particles, out: WindowResult, eps: Tensor) -> WorkerResult:
        """Keep the advanced particles; the PES estimate and meta-loss of the window."""
        n = eps.shape[0]
        objective = meta_objective(out.losses, self.settings.meta_objective)
        delta = objective[:, :n] - objective[:, n:]
        grad, particles.accum = pes_gradient(delta, out.masks, out.dones, eps, particles.accum, self.settings.pes.std)
        self.particles = particles
        meta_loss = float(window_meta_loss(out.losses[:, :n], out.losses[:, n:], out.masks))
        return WorkerResult(grad, meta_loss, out.resets, out.nan_resets)


def run_group(workers: Sequence[TaskWorker], flat: Tensor, step: int, pairs: range) -> list[WorkerResult]:
    """Advance ``workers`` (one :func:`~.unroll.batch_key`, or a single worker) by one window together.

    The dropout seed is the first worker's, which is each worker's own when it runs alone (instances
    with dropout always do).
    """
    first, s = workers[0], workers[0].settings
    prepared = [w.window_input(flat, step, pairs) for w in workers]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(s.seed, first.index, step, int(Stream.DROPOUT)))
        inputs = [inp for inp, _ in prepared]
        outs = unroll_windows(first.lopt, inputs, s.truncation, s.augmentation, first._loss_and_grad)
    return [w.finish(particles, out, eps) for w, (particles, out), (_, eps) in zip(workers, outs, prepared)]


class PESEstimator:
    """``estimate(θ, step) → (grad, logs)``: the PES estimate of this rank's pairs over all task instances.

    Args:
        lopt: the learned optimizer (frozen θ entries are read from it).
        trainable_names: the θ entries that ``theta`` in :meth:`estimate` holds, in order.
        instances: the task instances, one worker each.
        settings: what all workers share.
        batched: run instances with equal :func:`~.unroll.batch_key` as one group (one vmapped
            loss-and-grad and particle step per inner step for all of them); ``False`` runs each
            instance alone. The estimate is the same either way, up to float rounding.
    """

    def __init__(
        self,
        lopt: LearnedOptimizerModule,
        trainable_names: Sequence[str],
        instances: Sequence[TaskInstance],
        settings: EstimatorSettings,
        batched: bool = True,
    ) -> None:
        self.settings = settings
        self.workers = [TaskWorker(inst, i, lopt, trainable_names, settings) for i, inst in enumerate(instances)]
        self.pairs = range(settings.pes.num_pairs)
        self.batched = batched
        self.groups: list[list[TaskWorker]] = []

    @property
    def instances(self) -> list[TaskInstance]:
        return [w.instance for w in self.workers]

    def shard(self, world_size: int, rank: int) -> None:
        """Run only ``rank``'s share of the pairs (ranks split them evenly; DDP averages the estimates)."""
        num_pairs = self.settings.pes.num_pairs
        if num_pairs % world_size:
            raise ValueError(
                f"MetaTrainer: {num_pairs} pairs per task cannot be split evenly over {world_size} ranks"
            )
        local = num_pairs // world_size
        self.pairs = range(rank * local, (rank + 1) * local)

    def prepare(self, instances: Sequence[TaskInstance] | None = None) -> None:
        """Build every worker's loss-and-grad, first replacing the instances (e.g. rebuilt on a GPU)."""
        if instances is not None:
            if len(instances) != len(self.workers):
                raise ValueError(f"PESEstimator: {len(instances)} instances for {len(self.workers)} workers")
            for worker, inst in zip(self.workers, instances):
                worker.instance = inst
        for worker in self.workers:
            worker.prepare()
        self.groups = group_workers(self.workers) if self.batched else [[w] for w in self.workers]

    def state_dict(self) -> list[dict[str, Any] | None]:
        """Every worker's particles, in instance order (the ``particles`` entry of a full checkpoint)."""
        return [w.state_dict() for w in self.workers]

    def load_state_dict(self, saved: Sequence[dict[str, Any] | None]) -> None:
        """Restore every worker's particles at its next window."""
        if len(saved) != len(self.workers):
            raise ValueError(f"checkpoint: particles of {len(saved)} task instances, this run has {len(self.workers)}")
        for worker, state in zip(self.workers, saved):
            worker.load_state_dict(state)

    def estimate(self, theta: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """Advance every particle by one window at θ (``[D]``, trainable entries); ``(grad [D], logs)``."""
        grads, logs = [], {}
        resets = nan_resets = 0
        results = {id(w): r for group in self.groups for w, r in zip(group, run_group(group, theta, step, self.pairs))}
        for worker in self.workers:
            result = results[id(worker)]
            grads.append(result.grad)
            logs[f"meta/loss/{worker.instance.label}"] = result.meta_loss
            resets += result.resets
            nan_resets += result.nan_resets
        mean = torch.stack(grads).mean(dim=0)
        logs["meta/nonfinite_grad"] = float((~torch.isfinite(mean)).sum())
        logs["meta/resets"] = float(resets)
        logs["meta/nan_resets"] = float(nan_resets)
        logs["meta/loss"] = sum(v for k, v in logs.items() if k.startswith("meta/loss/")) / len(self.workers)
        return torch.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0), logs


def group_workers(workers: Sequence[TaskWorker]) -> list[list[TaskWorker]]:
    """``workers`` split into groups of equal :func:`~.unroll.batch_key` (in first-seen order);
    a worker whose key is ``None`` is a group of its own."""
    groups: dict[Any, list[TaskWorker]] = {}
    for worker in workers:
        key = batch_key(worker.instance)
        groups.setdefault(("alone", worker.index) if key is None else key, []).append(worker)
    return list(groups.values())
