"""The truncated unroll of one task's particles (docs/reference/pes.md#inner-steps-and-resets; learned_optimization's
``lopt_truncated_step``).

A task instance has N antithetic pairs: particle ``j`` runs θ + ε_j and particle ``j + N`` runs
θ − ε_j. The members of a pair share their data, resets, re-initialisations, episode lengths and
augmentation factors; only θ differs. Each particle's state persists across windows
(:class:`Particles`). One inner step does, for every particle at once (``torch.func.vmap`` over the
particle axis, then :func:`~lightning_lopt.optim.particle_step.particle_step`):

- **train step** (the pair is not done): loss and gradient on the pair's batch at the *pre-update*
  parameters; the meta-loss of the step is that loss, normalised (clip to [0, cap], NaN → cap);
  one learned-optimizer update; ``inner_step += 1``;
- **reset step** (the pair was done): fresh parameters from the task's initialiser, a fresh
  optimizer state (built with the particle's own θ), a new augmentation factor,
  ``inner_step = 0`` and a masked-out loss. The step still consumes its batch.

Then ``done = inner_step ≥ length``, and a done pair draws its next length at once. A particle whose
loss or parameters stop being finite ends its pair's episode the same way (counted as a NaN reset),
so a diverging inner problem never poisons later windows.

Example::

    particles = init_particles(inst, lopt, theta_pm, keys, schedule, max_offset=50, augmentation=None)
    particles, out = unroll_window(inst, lopt, theta_pm, particles, batches, keys, schedule, None)
    out.losses        # [T, 2N] normalised pre-update losses; out.masks, out.dones: [T, N]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_lopt.meta.augmentation import ReparamAugmentation
from lightning_lopt.meta.rng import Stream
from lightning_lopt.meta.tasks import TaskInstance
from lightning_lopt.meta.truncation import LogUniformLengthSchedule, initial_offsets
from lightning_lopt.optim.architectures import LearnedOptimizerModule
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.particle_step import particle_step

#: ``keys(stream, local_pair, t) -> torch.Generator`` for the draws of this window.
Keys = Callable[[Stream, int, int], torch.Generator]


@dataclass
class Particles:
    """The persistent state of the 2N particles of one task instance.

    Attributes:
        params: per tensor ``[2N, *shape]`` (stored parameters; divided by τ under augmentation).
        opt_state: the learned optimizer's state, every tensor stacked ``[2N, ...]``.
        inner_step: ``[N]`` steps taken in the current episode.
        length: ``[N]`` the current episode's length.
        is_done: ``[N]`` whether the next step is a reset step.
        tau: per tensor ``[N, ...]`` augmentation factors, or ``None``.
        accum: ``[N, D]`` PES's perturbations summed over the current episode.
    """

    params: list[Tensor]
    opt_state: dict[str, Any]
    inner_step: Tensor
    length: Tensor
    is_done: Tensor
    tau: list[Tensor] | None
    accum: Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.inner_step.shape[0])

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and lists, for full checkpoints (``torch.load(weights_only=True)`` safe)."""
        leaves, spec = tree_flatten(self.opt_state)
        return {
            "params": list(self.params),
            "opt_state_leaves": leaves,
            "opt_state_spec": repr(spec),
            "inner_step": self.inner_step,
            "length": self.length,
            "is_done": self.is_done,
            "tau": None if self.tau is None else list(self.tau),
            "accum": self.accum,
        }

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any], template: Particles, device: torch.device) -> Particles:
        """Rebuild from :meth:`state_dict`, using ``template`` (a freshly initialised set) for the structure."""
        _, spec = tree_flatten(template.opt_state)
        if repr(spec) != saved["opt_state_spec"]:
            raise ValueError("checkpoint: the saved optimizer state does not match this learned optimizer")
        move = lambda t: t.to(device)  # noqa: E731
        return cls(
            params=[move(p) for p in saved["params"]],
            opt_state=tree_unflatten([move(t) for t in saved["opt_state_leaves"]], spec),
            inner_step=move(saved["inner_step"]),
            length=move(saved["length"]),
            is_done=move(saved["is_done"]),
            tau=None if saved["tau"] is None else [move(t) for t in saved["tau"]],
            accum=move(saved["accum"]),
        )


@dataclass
class WindowResult:
    """What one truncation window produced, for the PES estimate and the logs."""

    losses: Tensor  # [T, 2N] normalised, 0 on reset steps
    raw_losses: Tensor  # [T, 2N] as the network computed them
    masks: Tensor  # [T, N]
    dones: Tensor  # [T, N]
    resets: int
    nan_resets: int


def normalize_loss(loss: Tensor, cap: float) -> Tensor:
    """clip(loss, 0, cap) with NaN and ±inf mapped to the cap (docs/reference/pes.md#meta-loss)."""
    return torch.nan_to_num(loss, nan=cap, posinf=cap, neginf=cap).clamp(0.0, cap)


def particle_theta(theta_pm: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """θ of one particle from the stacked ``{name: [2N, ...]}``."""
    return {k: v[index] for k, v in theta_pm.items()}


def _fresh_pair(
    inst: TaskInstance,
    lopt: LearnedOptimizerModule,
    theta_pm: dict[str, Tensor],
    pair: int,
    num_pairs: int,
    seed: int,
    augmentation: ReparamAugmentation | None,
    aug_generator: torch.Generator | None,
) -> tuple[list[Tensor], list[dict[str, Any]], list[Tensor] | None]:
    """New parameters (shared by the pair), one optimizer state per member, and τ."""
    params = inst.init(seed)
    tau = None
    if augmentation is not None:
        assert aug_generator is not None
        tau = augmentation.sample(inst.shapes, aug_generator)
        params = [p / t for p, t in zip(params, tau)]  # stored init θ0/τ, the loss sees τ·θ
    states = [
        lopt.functional.init_state(particle_theta(theta_pm, member), params, layout=lopt.layout)
        for member in (pair, pair + num_pairs)
    ]
    return params, states, tau


def _write(stacked: Any, index: int, value: Any) -> None:
    tree_map(lambda s, v: s[index].copy_(v), stacked, value)


def init_particles(
    inst: TaskInstance,
    lopt: LearnedOptimizerModule,
    theta_pm: dict[str, Tensor],
    keys: Keys,
    schedule: LogUniformLengthSchedule,
    max_offset: int,
    augmentation: ReparamAugmentation | None,
    num_pairs: int,
    dim: int,
) -> Particles:
    """Fresh particles: new initialisations, zero accumulators, log-uniform lengths and random offsets."""
    device = inst.data.device
    pairs = range(num_pairs)
    # Stream.INIT with t = 0..3 for the initialiser seed, τ, the length and the offset.
    fresh = [
        _fresh_pair(
            inst, lopt, theta_pm, j, num_pairs, _seed(keys(Stream.INIT, j, 0)), augmentation,
            keys(Stream.INIT, j, 1) if augmentation is not None else None,
        )
        for j in pairs
    ]
    params = [torch.stack([fresh[j][0][k] for j in (*pairs, *pairs)]) for k in range(len(inst.names))]
    states = [fresh[j][1][0] for j in pairs] + [fresh[j][1][1] for j in pairs]
    opt_state = tree_map(lambda *xs: torch.stack(xs), states[0], *states[1:])
    length = torch.stack([schedule.sample(1, keys(Stream.INIT, j, 2))[0] for j in pairs]).to(device)
    offset = torch.stack([initial_offsets(1, max_offset, keys(Stream.INIT, j, 3))[0] for j in pairs]).to(device)
    tau = None
    if augmentation is not None:
        tau = [torch.stack([fresh[j][2][k] for j in pairs]) for k in range(len(inst.names))]
    return Particles(
        params=params,
        opt_state=opt_state,
        inner_step=torch.minimum(offset, length - 1),
        length=length,
        is_done=torch.zeros(num_pairs, dtype=torch.bool, device=device),
        tau=tau,
        accum=torch.zeros(num_pairs, dim, device=device),
    )


def _seed(generator: torch.Generator) -> int:
    """A seed for a task's initialiser, drawn from ``generator``."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def make_loss_and_grad(inst: TaskInstance, augmented: bool) -> Callable[..., tuple[Tensor, list[Tensor]]]:
    """``f(params [2N], tau [2N] | None, batch [2N]) -> (loss [2N], grads [2N])``, vmapped over particles."""
    names = inst.names

    def loss_one(params: list[Tensor], tau: list[Tensor] | None, batch: Any) -> Tensor:
        if tau is not None:
            params = [p * t for p, t in zip(params, tau)]
        return inst.loss(dict(zip(names, params)), batch)

    def value_and_grad(params: list[Tensor], tau: list[Tensor] | None, batch: Any) -> tuple[Tensor, list[Tensor]]:
        grads, loss = torch.func.grad_and_value(loss_one)(params, tau, batch)
        return loss, grads

    return torch.func.vmap(value_and_grad, in_dims=(0, 0 if augmented else None, 0), randomness="same")


def unroll_window(
    inst: TaskInstance,
    lopt: LearnedOptimizerModule,
    theta_pm: dict[str, Tensor],
    particles: Particles,
    batches: Any,
    keys: Keys,
    schedule: LogUniformLengthSchedule,
    augmentation: ReparamAugmentation | None,
    loss_and_grad: Callable[..., tuple[Tensor, list[Tensor]]] | None = None,
) -> tuple[Particles, WindowResult]:
    """Run every particle for one truncation window (``T`` = the leading size of ``batches``' leaves).

    ``batches`` holds one batch per step and pair (leaves ``[T, N, ...]``); the ± members of a pair
    get the same one. ``keys`` owns every draw (resets, lengths, augmentation).
    """
    n = particles.num_pairs
    steps = tree_flatten(batches)[0][0].shape[0]
    loss_and_grad = loss_and_grad or make_loss_and_grad(inst, augmentation is not None)
    doubled = lambda t: torch.cat([t, t])  # noqa: E731  (pair j and j + N share it)
    cap = inst.loss_cap
    p = particles
    params, opt_state, inner_step, length, is_done = p.params, p.opt_state, p.inner_step, p.length, p.is_done
    tau = p.tau
    losses, raw_losses, masks, dones = [], [], [], []
    resets = nan_resets = 0
    for t in range(steps):
        batch = tree_map(lambda x: doubled(x[t]) if isinstance(x, Tensor) else x, batches)
        tau2 = None if tau is None else [doubled(x) for x in tau]
        with torch.enable_grad():
            loss, grads = loss_and_grad(params, tau2, batch)
        loss = loss.detach()
        ctx = StepContext(inst.scales, loss, doubled(length))
        params, opt_state = particle_step(lopt, theta_pm, params, [g.detach() for g in grads], opt_state, ctx)

        reset = is_done
        inner_step = torch.where(reset, torch.zeros_like(inner_step), inner_step + 1)
        reset_pairs = reset.nonzero().flatten().tolist()
        resets += len(reset_pairs)
        for j in reset_pairs:
            new_params, states, new_tau = _fresh_pair(
                inst, lopt, theta_pm, j, n, _seed(keys(Stream.RESET, j, t)), augmentation,
                keys(Stream.AUGMENTATION, j, t) if augmentation is not None else None,
            )
            for k, value in enumerate(new_params):
                params[k][j].copy_(value)
                params[k][j + n].copy_(value)
            _write(opt_state, j, states[0])
            _write(opt_state, j + n, states[1])
            if tau is not None and new_tau is not None:
                for k, value in enumerate(new_tau):
                    tau[k][j].copy_(value)

        mask = inner_step != 0
        # A particle that stopped being finite ends its pair's episode (both members are re-initialised
        # together on the next step). Reset steps hold fresh, finite parameters.
        finite = torch.isfinite(loss) & torch.stack([torch.isfinite(x.flatten(1)).all(dim=1) for x in params]).all(0)
        broken = ~(finite[:n] & finite[n:]) & mask
        nan_resets += int(broken.sum())
        done = (inner_step >= length) | broken
        for j in done.nonzero().flatten().tolist():
            length[j] = schedule.sample(1, keys(Stream.LENGTH, j, t + 1))[0]
        is_done = done

        masks.append(mask)
        dones.append(done)
        raw_losses.append(loss)
        losses.append(torch.where(doubled(mask), normalize_loss(loss, cap), torch.zeros_like(loss)))

    new = Particles(params, opt_state, inner_step, length, is_done, tau, particles.accum)
    return new, WindowResult(
        losses=torch.stack(losses),
        raw_losses=torch.stack(raw_losses),
        masks=torch.stack(masks),
        dones=torch.stack(dones),
        resets=resets,
        nan_resets=nan_resets,
    )

