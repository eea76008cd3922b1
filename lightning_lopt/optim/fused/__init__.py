"""The fused CPU step of small_fc_lopt / μLO (``LO``, ``MuLO``) and Celo, and the elementwise part of
Celo2's (``Celo2``, ``Celo2Base``, ``MuCelo2``; :mod:`.celo2_step` completes it in torch).

A C kernel (``kernel.c``, compiled at first use by :mod:`.build`) computes a step in two passes over
each tensor: the statistics (Adafactor row/column means, the per-channel second moments of the MLP
inputs), then, block by block, the features of a few dozen elements pushed through the MLP while
they sit in cache and registers. Multi-threaded with OpenMP (``torch.get_num_threads()`` threads)
with numbers independent of the thread count. The pure functional step stays the reference and the
fallback: the tests hold the fused step to it within 1e-5 relative.

- The ``torch.optim`` wrappers (:mod:`lightning_lopt.optim.learned`) use it automatically on CPU in
  float32 (``fused=None``); ``fused=False`` forces the pure step.
- Meta-training reaches it through :func:`lightning_lopt.optim.particle_step.particle_step`, where
  :func:`register_particle_steps` registers it for :class:`SmallFCLOpt`, :class:`CeloLOpt` and
  :class:`Celo2LOpt`.
- If the kernel cannot be built (no C compiler, say), :func:`kernel` warns once and returns
  ``None``, and both fall back to the pure step.

Example::

    from lightning_lopt.optim import fused
    fused.kernel() is not None      # compiled and loaded (cached under ~/.cache/lightning_lopt)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_lopt.optim.architectures import (
    CeloLOpt,
    LearnedOptimizerModule,
    SmallFCLOpt,
)
from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.fused import build, celo2_step, driver
from lightning_lopt.optim.fused.build import BuildError, Kernel
from lightning_lopt.optim.particle_step import (
    State,
    register_particle_step,
    vmapped_pure_step,
)

_FAILURE: list[BuildError] = []


def kernel() -> Kernel | None:
    """The kernel for this CPU, or ``None`` (with one warning per process) if it cannot be built."""
    if _FAILURE:
        return None
    try:
        return build.load()
    except BuildError as err:
        _FAILURE.append(err)
        warnings.warn(
            f"lightning_lopt: the fused CPU learned-optimizer step is unavailable, using the slower "
            f"pure step instead ({err})",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def build_error() -> BuildError | None:
    """Why :func:`kernel` returned ``None`` (``None`` if it has not failed)."""
    return _FAILURE[0] if _FAILURE else None


def _supports(module: LearnedOptimizerModule, params: Sequence[Tensor]) -> bool:
    return driver.supports(module, params) and kernel() is not None


def _particle_step(
    module: LearnedOptimizerModule,
    theta: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    state: State,
    ctx: StepContext,
) -> tuple[list[Tensor], State]:
    """The seam's fused implementation; θ in another dtype than the (float32) parameters is left to
    the reference, whose type promotion the kernel does not reproduce."""
    if any(v.dtype != torch.float32 for v in theta.values() if v.is_floating_point()):
        return vmapped_pure_step(module, theta, params, grads, state, ctx)
    step = celo2_step.particle_step if isinstance(module, Celo2LOpt) else driver.particle_step
    return step(kernel(), module, theta, params, grads, state, ctx)


def register_particle_steps() -> None:
    """Register the kernel's particle form for :class:`SmallFCLOpt`, :class:`CeloLOpt` and
    :class:`Celo2LOpt` (called by :func:`lightning_lopt.optim.particle_step.register_default_particle_steps`)."""
    register_particle_step(SmallFCLOpt, _particle_step, _supports)
    register_particle_step(CeloLOpt, _particle_step, _supports)
    register_particle_step(Celo2LOpt, _particle_step, _supports)


__all__ = ["BuildError", "build_error", "kernel", "register_particle_steps"]
