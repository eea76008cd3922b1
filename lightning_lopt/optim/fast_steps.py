"""The built-in fast paths of :mod:`lightning_lopt.optim.tensor_step`, with what each needs of its inputs.

- :data:`TRITON_CUDA`: the Triton kernels of :mod:`lightning_lopt.optim.gpu` (CUDA, float32 / bf16
  parameters read as they are, ``options.gpu_numerics``);
- :data:`CHUNKED_CUDA`: the pure step evaluated in chunks, in place
  (:mod:`lightning_lopt.optim.functional.chunked`; CUDA, float32 state; not a fused kernel, so it
  is what ``fused=False`` runs on CUDA);
- :data:`FUSED_CPU`: the fused C kernel of :mod:`lightning_lopt.optim.fused` (CPU float32); for
  Celo2 the kernel's elementwise part completed in torch (:mod:`lightning_lopt.optim.fused.celo2_step`).

All three read and write raw contiguous memory in place: parameters that are not contiguous (or,
for the float32-only paths, not float32) go through a contiguous copy that is written back;
parameters written directly get their autograd version bumped; accumulators are brought to the
kernels' layout (:func:`kernel_layout`), which becomes the stored state. bf16 ``m`` / ``rms`` are
rounded inside the kernels. :func:`lightning_lopt.optim.tensor_step.register_default_steps`
registers them; importing this module registers nothing.

Example::

    from lightning_lopt.optim import fast_steps
    fast_steps.FUSED_CPU.supports(module, params, grads, options)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_lopt.optim import fused, gpu
from lightning_lopt.optim.architectures import LearnedOptimizerModule
from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.functional import StepContext, chunked
from lightning_lopt.optim.fused import celo2_step, driver
from lightning_lopt.optim.step_contract import State, StepOptions

#: ``(module, params, grads, state, ctx, weight_decays) -> new global state or None`` (updated in place).
InPlaceFn = Callable[[LearnedOptimizerModule, list[Tensor], list[Tensor], State, StepContext, Sequence[float]], State | None]


def kernel_layout(acc: dict[str, Tensor], state_dtype: torch.dtype) -> dict[str, Tensor]:
    """``acc`` contiguous, ``m`` / ``rms`` in ``state_dtype`` and the rest float32 (usually as is)."""
    out = {}
    for key, value in acc.items():
        dtype = state_dtype if key in ("m", "rms") else torch.float32
        out[key] = value if value.dtype == dtype and value.is_contiguous() else value.to(dtype).contiguous()
    return out


def run_in_place(
    fn: InPlaceFn,
    module: LearnedOptimizerModule,
    params: list[Tensor],
    grads: list[Tensor],
    state: State,
    ctx: StepContext,
    weight_decays: Sequence[float],
    options: StepOptions,
    *,
    float32_only: bool,
) -> State:
    """``fn`` on contiguous views of the optimizer's tensors; returns the state to store.

    ``float32_only``: the kernel takes float32 parameters only (others go through a float32 copy).
    """
    work = [
        p if p.is_contiguous() and (p.dtype == torch.float32 or not float32_only)
        else p.detach().to(torch.float32 if float32_only else p.dtype).contiguous()
        for p in params
    ]
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    tensors = [kernel_layout(acc, options.state_dtype) for acc in state["tensors"]]
    device = params[0].device
    global_state = {k: v for k, v in state.items() if k != "tensors"}
    if any(v.device != device for v in global_state.values()):
        global_state = {k: v.to(device) for k, v in global_state.items()}
    full = {**global_state, "tensors": tensors}
    new_global = fn(module, work, grads, full, ctx, weight_decays)
    for p, w in zip(params, work):
        if w is p:
            # Written behind autograd's back: bump the version so that a graph that saved p fails loudly.
            torch.autograd.graph.increment_version(p)
        else:
            p.copy_(w)
    return {**(global_state if new_global is None else new_global), "tensors": tensors}


class TritonCudaStep:
    """The GPU kernels (:mod:`lightning_lopt.optim.gpu`), reading bf16 parameters and gradients as they are."""

    name = "triton-cuda"
    kernel = True

    def supports(self, module, params, grads, options) -> bool:  # noqa: ANN001 (the protocol's types)
        return gpu.supports(module, params)

    def refusal(self, module, params, grads, options) -> str | None:  # noqa: ANN001
        return None  # fused=True's error names what the CPU kernel needs (as before the seam)

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
        from lightning_lopt.optim.gpu.step import step_in_place

        fn = functools.partial(step_in_place, numerics=options.gpu_numerics)
        return run_in_place(fn, module, params, grads, state, ctx, weight_decays, options, float32_only=False)


class ChunkedCudaStep:
    """The pure step evaluated in chunks (bounded scratch memory), in place; float32 only."""

    name = "chunked-cuda"
    kernel = False

    def supports(self, module, params, grads, options) -> bool:  # noqa: ANN001
        return (
            params[0].device.type == "cuda"
            and options.compute_dtype == torch.float32
            and options.state_dtype == torch.float32
            and driver.architecture_supported(module)
            and not isinstance(module, Celo2LOpt)  # the chunked evaluation implements small_fc and Celo
        )

    def refusal(self, module, params, grads, options) -> str | None:  # noqa: ANN001
        return None  # not a fused kernel: fused=True never asks

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
        fn = chunked.step_in_place
        return run_in_place(fn, module, params, grads, state, ctx, weight_decays, options, float32_only=True)


class FusedCpuStep:
    """The fused C kernel (:mod:`lightning_lopt.optim.fused`): CPU, float32 arithmetic, plain dense tensors."""

    name = "fused-cpu"
    kernel = True

    def _usable(self, module, params, grads, options) -> bool:  # noqa: ANN001
        return (
            params[0].device.type == "cpu"
            and options.compute_dtype == torch.float32
            and driver.architecture_supported(module)
            and self._plain(params, grads)
        )

    @staticmethod
    def _plain(params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
        # The kernel addresses raw memory: tensor subclasses, sparse and meta tensors take the pure step.
        return all(driver.is_plain_dense(t) for t in (*params, *grads))

    def supports(self, module, params, grads, options) -> bool:  # noqa: ANN001
        # Built (once) only where it would run: a failed build warns once, then the pure step runs.
        return self._usable(module, params, grads, options) and fused.kernel() is not None

    def refusal(self, module, params, grads, options) -> str | None:  # noqa: ANN001
        device = params[0].device
        return str(fused.build_error() or (
            f"it runs on CPU float32 only (here {device.type}, {options.compute_dtype})"
            if self._plain(params, grads)
            else "it takes plain dense CPU tensors only (not DTensor, sparse or meta tensors)"
        ))

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
        kernel = fused.kernel()
        step = celo2_step.step_in_place if isinstance(module, Celo2LOpt) else driver.step_in_place
        fn = functools.partial(step, kernel)
        grads = [g if g.dtype == torch.float32 else g.to(torch.float32) for g in grads]  # .to costs a call per tensor
        return run_in_place(fn, module, params, grads, state, ctx, weight_decays, options, float32_only=True)


TRITON_CUDA = TritonCudaStep()
CHUNKED_CUDA = ChunkedCudaStep()
FUSED_CPU = FusedCpuStep()

__all__ = ["CHUNKED_CUDA", "FUSED_CPU", "TRITON_CUDA", "kernel_layout", "run_in_place"]
