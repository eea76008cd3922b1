"""One learned-optimizer step for P particles at once: the seam between meta-training and the step.

The meta-trainer holds P particles of one task (PES's ± pairs), each with its own θ, parameters,
gradients and optimizer state, all stacked on a leading axis of size P. It steps them with
:func:`particle_step` and nothing else, so a faster implementation of the step (a fused kernel)
drops in by registering itself here, without touching the meta-trainer. The built-in ones (the
fused CPU kernel, the GPU kernels for CUDA parameters) are registered by
:func:`register_default_particle_steps`, called once on first use, not by importing their modules.

The default implementation is the pure functional step (:mod:`lightning_lopt.optim.functional`)
mapped over the particle axis with ``torch.func.vmap``; it is the reference every registered
implementation is tested against.

Stacked layout (leading axis P everywhere):

- ``theta``: ``{name: [P, *shape]}``, the keys of the architecture module's ``state_dict()``;
- ``params`` / ``grads``: lists of ``[P, *shape]``;
- ``state``: the architecture's state with every tensor stacked (``iteration`` is ``[P]``);
- ``ctx``: a :class:`~lightning_lopt.optim.functional.StepContext` whose ``scales`` are shared by
  all particles (one float per tensor), ``loss`` is ``[P]`` (or ``None``) and ``num_steps`` an
  ``int`` or a ``[P]`` tensor (each particle's own horizon).

Example::

    from lightning_lopt.optim.particle_step import particle_step, stack_state
    state = stack_state([lopt.init_state([p[i] for p in params]) for i in range(P)])
    params, state = particle_step(lopt, theta, params, grads, state, StepContext(scales, None, 1000))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_lopt.optim.architectures import LearnedOptimizerModule
from lightning_lopt.optim.functional import StepContext

State = dict[str, Any]
#: ``(module, theta, params, grads, state, ctx) -> (new_params, new_state)`` on stacked particles.
ParticleStepFn = Callable[
    [LearnedOptimizerModule, dict[str, Tensor], list[Tensor], list[Tensor], State, StepContext],
    tuple[list[Tensor], State],
]
#: ``(module, params) -> bool``: whether an implementation can run this step (device, dtype, ...).
Supports = Callable[[LearnedOptimizerModule, Sequence[Tensor]], bool]

_IMPLEMENTATIONS: dict[type[LearnedOptimizerModule], tuple[ParticleStepFn, Supports]] = {}
_DEFAULTS_REGISTERED: list[bool] = []


def register_default_particle_steps() -> None:
    """Register the built-in fast paths once: the fused CPU kernel, then the GPU kernels in front of
    it for CUDA parameters (:mod:`lightning_lopt.optim.fused`, :mod:`lightning_lopt.optim.gpu`)."""
    if _DEFAULTS_REGISTERED:
        return
    _DEFAULTS_REGISTERED.append(True)
    from lightning_lopt.optim import fused, gpu

    fused.register_particle_steps()
    gpu.register_particle_steps()


def register_particle_step(
    module_class: type[LearnedOptimizerModule], fn: ParticleStepFn, supports: Supports
) -> None:
    """Use ``fn`` for ``module_class`` wherever ``supports(module, params)`` holds (replacing the
    built-in one, if any).

    ``fn`` must return what :func:`vmapped_pure_step` returns, within the tolerance its tests set.
    """
    register_default_particle_steps()
    _IMPLEMENTATIONS[module_class] = (fn, supports)


def implementation(module_class: type[LearnedOptimizerModule]) -> tuple[ParticleStepFn, Supports] | None:
    """The registered ``(fn, supports)`` for ``module_class``, or ``None`` (the reference runs)."""
    register_default_particle_steps()
    return _IMPLEMENTATIONS.get(module_class)


def particle_step(
    module: LearnedOptimizerModule,
    theta: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    state: State,
    ctx: StepContext,
) -> tuple[list[Tensor], State]:
    """Step P stacked particles; dispatches to a registered implementation, else :func:`vmapped_pure_step`.

    No gradient flows through the step (PES needs none), so it runs under ``torch.no_grad``.
    """
    entry = implementation(type(module))
    with torch.no_grad():
        if entry is not None and entry[1](module, params):
            return entry[0](module, theta, params, grads, state, ctx)
        return vmapped_pure_step(module, theta, params, grads, state, ctx)


def vmapped_pure_step(
    module: LearnedOptimizerModule,
    theta: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    state: State,
    ctx: StepContext,
) -> tuple[list[Tensor], State]:
    """The reference: ``module.pure_step`` mapped over the particle axis with ``torch.func.vmap``."""
    pure = module.pure_step
    scales, spectral = list(ctx.scales), ctx.spectral

    def one(th: dict[str, Tensor], p: list[Tensor], g: list[Tensor], s: State, loss: Any, n: Any):
        return pure(th, p, g, s, StepContext(scales, loss, n, spectral))

    num_steps = ctx.num_steps
    per_particle_horizon = isinstance(num_steps, Tensor) and num_steps.dim() == 1
    in_dims = (0, 0, 0, 0, 0 if ctx.loss is not None else None, 0 if per_particle_horizon else None)
    return torch.func.vmap(one, in_dims=in_dims)(theta, params, grads, state, ctx.loss, num_steps)


def stack_state(states: Sequence[State]) -> State:
    """Stack per-particle states (same structure) on a new leading axis."""
    return tree_map(lambda *xs: torch.stack(xs), states[0], *states[1:])


def unstack_state(state: State, index: int) -> State:
    """Particle ``index`` of a stacked state."""
    return tree_map(lambda x: x[index], state)


__all__ = [
    "implementation",
    "particle_step",
    "register_default_particle_steps",
    "register_particle_step",
    "stack_state",
    "unstack_state",
    "vmapped_pure_step",
]
