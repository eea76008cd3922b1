"""One in-place step of one learned optimizer: the seam between the ``torch.optim`` wrappers and the step.

:class:`~lightning_lopt.optim.learned.LearnedOptimizer` resolves the loss and the meta-weights,
builds the :class:`~lightning_lopt.optim.functional.StepContext` and calls :func:`step_in_place`,
nothing else. The seam tries the registered implementations in order and runs the first whose
``supports`` holds; the pure functional step (:func:`pure_step`) is the reference every
implementation is tested against and the fallback. What an implementation needs of its inputs
(contiguous float32 copies written back, the state's memory layout, autograd version bumps, bf16
rounding) stays inside it. The stacked-particle form used by meta-training is the other seam,
:mod:`lightning_lopt.optim.particle_step`.

Implementations are registered explicitly: :func:`register_default_steps` (run once, on first
use) registers, in this order, the Triton CUDA kernels, the chunked CUDA evaluation of the pure
step and the fused CPU kernel (:mod:`lightning_lopt.optim.fast_steps`); :func:`register` adds more.

``options.fused`` selects among them: ``None`` any, ``False`` only those that are not fused
kernels (``kernel = False``), ``True`` only fused kernels, and an error instead of the pure step.

The contract of an implementation (:class:`TensorStep`), on the optimizer's tensors as they are:

- ``params``: the parameters (any float dtype, maybe non-contiguous), written in place with
  ``p ← step(p) − weight_decay · p`` (decoupled decay on the pre-update ``p``);
- ``grads``: their gradients as they are (the implementation casts what it needs);
- ``state``: the global entries (``iteration``, Celo's scheduler state) and ``"tensors"``, one
  accumulator dict per parameter as stored (``m`` / ``rms`` in ``options.state_dtype``);
- returns the new state of the same structure, which the caller stores (it may be the same
  tensors, updated in place).

Example::

    from lightning_lopt.optim import tensor_step
    options = tensor_step.StepOptions("MuLO", fused=None)
    state = {**global_state, "tensors": [opt_state[p] for p in params]}
    new_state = tensor_step.step_in_place(module, params, grads, state, ctx, weight_decays, options)
    tensor_step.resolve(module, params, grads, options).name    # "fused-cpu" on CPU float32
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_lopt.optim.architectures import LearnedOptimizerModule
from lightning_lopt.optim.bf16_state import round_accumulators, widen_accumulators
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.step_contract import State, StepOptions, TensorStep

class PureStep:
    """The reference: the architecture's pure functional step, written back (new state tensors)."""

    name = "pure"
    kernel = False

    def supports(self, module, params, grads, options) -> bool:  # noqa: ANN001 (the protocol's types)
        return True

    def refusal(self, module, params, grads, options) -> str | None:  # noqa: ANN001
        return None

    def step_in_place(
        self,
        module: LearnedOptimizerModule,
        params: list[Tensor],
        grads: list[Tensor],
        state: State,
        ctx: StepContext,
        weight_decays: Sequence[float],
        options: StepOptions,
    ) -> State:
        dtype = options.compute_dtype
        device = params[0].device
        work = [p if p.dtype == dtype else p.to(dtype) for p in params]
        grads = [g.to(dtype) for g in grads]
        global_state = {k: v.to(device) for k, v in state.items() if k != "tensors"}
        accumulators = [widen_accumulators(acc, dtype) for acc in state["tensors"]]
        new_params, new_state = module.step(work, grads, {**global_state, "tensors": accumulators}, ctx)
        for p, old, new, decay in zip(params, work, new_params, weight_decays):
            p.copy_(new - decay * old if decay else new)
        if options.state_dtype == torch.bfloat16:
            # Stochastic rounding keyed on the step's iteration and the tensor's index (bf16_state).
            iteration = int(global_state["iteration"])
            rounded = [round_accumulators(acc, iteration, i) for i, acc in enumerate(new_state["tensors"])]
            new_state = {**new_state, "tensors": rounded}
        return new_state


#: The reference and fallback.
PURE_STEP = PureStep()

_IMPLEMENTATIONS: list[TensorStep] = []
_DEFAULTS_REGISTERED: list[bool] = []


def register(implementation: TensorStep) -> None:
    """Try ``implementation`` after those registered before it (the defaults come first).

    It must write what :data:`PURE_STEP` writes, within the tolerance its tests set.
    """
    register_default_steps()
    _IMPLEMENTATIONS.append(implementation)


def register_default_steps() -> None:
    """Register the built-in fast paths once, in order: Triton CUDA, chunked CUDA, fused CPU kernel."""
    if _DEFAULTS_REGISTERED:
        return
    _DEFAULTS_REGISTERED.append(True)
    from lightning_lopt.optim import fast_steps

    _IMPLEMENTATIONS[:0] = [fast_steps.TRITON_CUDA, fast_steps.CHUNKED_CUDA, fast_steps.FUSED_CPU]


def implementations() -> tuple[TensorStep, ...]:
    """The registered implementations, in the order they are tried (the reference not included)."""
    register_default_steps()
    return tuple(_IMPLEMENTATIONS)


def resolve(
    module: LearnedOptimizerModule, params: Sequence[Tensor], grads: Sequence[Tensor], options: StepOptions
) -> TensorStep:
    """The implementation :func:`step_in_place` runs: the first registered one allowed by
    ``options.fused`` that supports the step, else :data:`PURE_STEP` (an error for ``fused=True``)."""
    candidates = implementations()
    for implementation in candidates:
        if options.fused is not None and implementation.kernel != options.fused:
            continue
        if implementation.supports(module, params, grads, options):
            return implementation
    if options.fused:
        reasons = [r for i in candidates if i.kernel and (r := i.refusal(module, params, grads, options))]
        raise RuntimeError(f"{options.owner}(fused=True): the fused step cannot run: {'; '.join(reasons)}")
    return PURE_STEP


def step_in_place(
    module: LearnedOptimizerModule,
    params: list[Tensor],
    grads: list[Tensor],
    state: State,
    ctx: StepContext,
    weight_decays: Sequence[float],
    options: StepOptions,
) -> State:
    """One step of one optimizer through the implementation :func:`resolve` picks; returns the new state."""
    implementation = resolve(module, params, grads, options)
    with torch.no_grad():
        return implementation.step_in_place(module, params, grads, state, ctx, weight_decays, options)


__all__ = [
    "PURE_STEP",
    "PureStep",
    "StepOptions",
    "TensorStep",
    "implementations",
    "register",
    "register_default_steps",
    "resolve",
    "step_in_place",
]
