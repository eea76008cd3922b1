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


@dataclass
class WindowInput:
    """One task instance's share of a window run together with others (:func:`unroll_windows`)."""

    inst: TaskInstance
    theta_pm: dict[str, Tensor]  # {name: [2N, ...]}
    particles: Particles
    batches: Any  # leaves [T, N, ...]
    keys: Keys


def batch_key(inst: TaskInstance) -> tuple[Any, ...] | None:
    """Instances with equal keys can share :func:`unroll_windows`; ``None``: this one runs alone.

    Equal keys mean the same module (its class and printed configuration), parameter names, shapes
    and dtypes, buffers, update scales and spectral targets, device and batch structure (shapes and dtypes), so one
    instance's loss is every one's and their batches stack. A module with dropout runs alone: its
    draws come from the global generator, seeded per instance.
    """
    module = inst.module
    if any("Dropout" in type(m).__name__ for m in module.modules()):
        return None
    params = dict(module.named_parameters())
    buffers = tuple((n, b.shape, b.dtype, tuple(b.flatten().tolist())) for n, b in inst.buffers.items())
    return (
        type(module), repr(module), tuple(inst.names), tuple(tuple(s) for s in inst.shapes),
        tuple(params[n].dtype for n in inst.names), buffers, tuple(inst.scales),
        None if inst.spectral is None else tuple(inst.spectral), str(inst.data.device), inst.batch_structure,
    )


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
    inputs = [WindowInput(inst, theta_pm, particles, batches, keys)]
    return unroll_windows(lopt, inputs, schedule, augmentation, loss_and_grad)[0]


def unroll_windows(
    lopt: LearnedOptimizerModule,
    inputs: list[WindowInput],
    schedule: LogUniformLengthSchedule,
    augmentation: ReparamAugmentation | None,
    loss_and_grad: Callable[..., tuple[Tensor, list[Tensor]]] | None = None,
) -> list[tuple[Particles, WindowResult]]:
    """:func:`unroll_window` for several instances of one architecture at once, one result each.

    The instances must share parameter names, shapes and dtypes, update scales, spectral targets and the loss
    function (``inputs[0].inst.loss`` runs for all; equal :func:`batch_key` s say when that is right).
    Their particles are concatenated on the particle axis so that each inner step is one vmapped
    loss-and-grad and one :func:`~lightning_lopt.optim.particle_step.particle_step` call for all of
    them: for tiny tasks the per-call overhead, not the arithmetic, is most of a step. Everything
    else (batches, resets, lengths, augmentation, the meta-loss cap) stays each instance's own, so
    each result equals what :func:`unroll_window` gives for that instance alone, up to float rounding.
    """
    first = inputs[0].inst
    steps = tree_flatten(inputs[0].batches)[0][0].shape[0]
    loss_and_grad = loss_and_grad or make_loss_and_grad(first, augmentation is not None)
    doubled = lambda t: torch.cat([t, t])  # noqa: E731  (pair j and j + N share it)
    joined = lambda *xs: torch.cat(xs) if len(xs) > 1 else xs[0]  # noqa: E731
    sizes = [w.particles.num_pairs for w in inputs]
    bounds = [(sum(2 * s for s in sizes[:m]), sum(2 * s for s in sizes[: m + 1])) for m in range(len(inputs))]
    theta_pm = {k: joined(*[w.theta_pm[k] for w in inputs]) for k in inputs[0].theta_pm}
    params = [joined(*ps) for ps in zip(*[w.particles.params for w in inputs])]
    opt_state = tree_map(joined, inputs[0].particles.opt_state, *[w.particles.opt_state for w in inputs[1:]])
    inner_steps = [w.particles.inner_step for w in inputs]
    lengths = [w.particles.length for w in inputs]
    is_dones = [w.particles.is_done for w in inputs]
    taus = [w.particles.tau for w in inputs]
    logs: list[dict[str, list[Tensor]]] = [{"losses": [], "raw": [], "masks": [], "dones": []} for _ in inputs]
    resets = [0] * len(inputs)
    nan_resets = [0] * len(inputs)
    for t in range(steps):
        batch = tree_map(
            lambda *xs: joined(*[doubled(x[t]) for x in xs]) if isinstance(xs[0], Tensor) else xs[0],
            inputs[0].batches, *[w.batches for w in inputs[1:]],
        )
        tau2 = None if taus[0] is None else [joined(*[doubled(tau[k]) for tau in taus]) for k in range(len(taus[0]))]
        with torch.enable_grad():
            loss, grads = loss_and_grad(params, tau2, batch)
        loss = loss.detach()
        ctx = StepContext(first.scales, loss, joined(*[doubled(length) for length in lengths]), first.spectral)
        params, opt_state = particle_step(lopt, theta_pm, params, [g.detach() for g in grads], opt_state, ctx)
        # Each instance's bookkeeping works on its rows (views, so resets write into the joined tensors).
        for m, (w, (a, b)) in enumerate(zip(inputs, bounds)):
            n, inst, keys = sizes[m], w.inst, w.keys
            part = [p[a:b] for p in params]
            part_state = tree_map(lambda s: s[a:b], opt_state)  # noqa: B023
            tau = taus[m]
            reset = is_dones[m]
            inner_step = torch.where(reset, torch.zeros_like(inner_steps[m]), inner_steps[m] + 1)
            reset_pairs = reset.nonzero().flatten().tolist()
            resets[m] += len(reset_pairs)
            for j in reset_pairs:
                new_params, states, new_tau = _fresh_pair(
                    inst, lopt, w.theta_pm, j, n, _seed(keys(Stream.RESET, j, t)), augmentation,
                    keys(Stream.AUGMENTATION, j, t) if augmentation is not None else None,
                )
                for k, value in enumerate(new_params):
                    part[k][j].copy_(value)
                    part[k][j + n].copy_(value)
                _write(part_state, j, states[0])
                _write(part_state, j + n, states[1])
                if tau is not None and new_tau is not None:
                    for k, value in enumerate(new_tau):
                        tau[k][j].copy_(value)

            mask = inner_step != 0
            # A particle that stopped being finite ends its pair's episode (both members are
            # re-initialised together on the next step). Reset steps hold fresh, finite parameters.
            part_loss = loss[a:b]
            finite_params = torch.stack([torch.isfinite(x.flatten(1)).all(dim=1) for x in part]).all(0)
            finite = torch.isfinite(part_loss) & finite_params
            broken = ~(finite[:n] & finite[n:]) & mask
            nan_resets[m] += int(broken.sum())
            done = (inner_step >= lengths[m]) | broken
            for j in done.nonzero().flatten().tolist():
                lengths[m][j] = schedule.sample(1, keys(Stream.LENGTH, j, t + 1))[0]
            inner_steps[m], is_dones[m] = inner_step, done

            logs[m]["masks"].append(mask)
            logs[m]["dones"].append(done)
            logs[m]["raw"].append(part_loss)
            normalized = normalize_loss(part_loss, inst.loss_cap)
            logs[m]["losses"].append(torch.where(doubled(mask), normalized, torch.zeros_like(part_loss)))

    # Separate storage per instance, so that one instance's checkpoint holds only its own particles.
    own = (lambda x: x.clone()) if len(inputs) > 1 else (lambda x: x)  # noqa: E731
    results = []
    for m, (w, (a, b)) in enumerate(zip(inputs, bounds)):
        new = Particles(
            [own(p[a:b]) for p in params], tree_map(lambda s: own(s[a:b]), opt_state),  # noqa: B023
            inner_steps[m], lengths[m], is_dones[m], taus[m], w.particles.accum,
        )
        log = logs[m]
        results.append((new, WindowResult(
            losses=torch.stack(log["losses"]),
            raw_losses=torch.stack(log["raw"]),
            masks=torch.stack(log["masks"]),
            dones=torch.stack(log["dones"]),
            resets=resets[m],
            nan_resets=nan_resets[m],
        )))
    return results
