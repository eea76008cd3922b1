"""The GPU step of small_fc_lopt / μLO (``LO``, ``MuLO``) and Celo: Triton kernels over many tensors.

``LO``, ``MuLO`` and ``Celo`` use it by default when their parameters are on a CUDA device and
Triton is installed (``fused=None``; ``fused=False`` forces the pure step, ``fused=True`` fails
where neither fused step can run). Meta-training reaches it through
:func:`lightning_lopt.optim.particle_step.particle_step`, where :func:`register_particle_steps`
registers the stacked particle form for CUDA parameters.

Structure (one concept per file): :mod:`.kernels` (the Triton kernels), :mod:`.theta` (θ → packed
per-particle kernel inputs, in torch), :mod:`.table` (the tensor table, block maps, workspace and
the launches), :mod:`.step` (the optimizer and particle forms).

What a step does: pass 1 (:func:`table.statistics`) reduces, per tensor, the Adafactor row/column
means (factored tensors, written to the state) and the second moment of every MLP input channel;
pass 2 (:func:`table.apply`) rebuilds the inputs of a block of elements, normalises them, runs the
MLP with ``tl.dot`` and writes parameters and state in place. Nothing of size [numel, features]
exists; the scratch memory is the workspace of the factored statistics (40 bytes per entry of
``v_row`` / ``v_col``), the statistics and the job table. Every launch covers all tensors (a
tensor table, like torch's multi-tensor apply); nothing in a step synchronises with the host (the
loss stays a tensor), so the step can be captured in a CUDA graph.

Numerics (``numerics=``, the optimizers' ``gpu_numerics`` attribute):

- ``"fast"`` (default): the MLP's matrix products on tensor cores (TF32); the update differs from
  the pure step by at most 1e-2 of the update's RMS per tensor;
- ``"exact"``: fp32 FMA products; within 1e-5 of the pure step, as the CPU kernel.

Contract of the phases (the FSDP2 sharded step all-reduces between them;
:func:`step.sharded_step_in_place` is this sequence, :mod:`lightning_lopt.optim.sharding` calls
it for CUDA blocks)::

    jobs = [table.Job(local_shape, p, g, acc, scale, wd, i, total_rows=rows_of_the_whole_tensor)]
    plan = table.plan_for(jobs, layout, celo)         # empty blocks of split tensors included
    ws = table.partial_sums(plan, nets)               # phase A: writes no state
    ws[:plan.shared_floats] = all_reduce(ws[:plan.shared_floats])
    stats = table.finish_statistics(plan, nets, ws)   # phase B: float32 [n_jobs, 32]
    stats[plan.split_jobs] = all_reduce(stats[plan.split_jobs])
    table.apply(plan, nets, stats, ws, numerics="fast")   # phase C

- Phase A sums g² over the factored axes. For a tensor split along axis 0 (``total_rows`` set)
  whose factored axis ``a`` is axis 0, the sum over it (the statistic reduced over axis 0, which is
  replicated) is a partial sum; when moreover ``d1`` is axis 0, the mean of ``v_row`` over ``d1``
  (the row factor's normaliser) is too, and phase A adds the new ``v_row`` of the block into it
  without storing it. These partial sums are the workspace prefix ``[:plan.shared_floats]``, laid
  out from the whole tensors' shapes, so it lines up on every rank.
- Phase B finishes the factored statistics (EMA written to the state once), their tables and
  ``stats[i, c]`` = Σ over job i's elements of (MLP input channel c)², channels in spec order
  (docs/reference/small_fc.md#features: 28 for small_fc, docs/reference/celo.md#per-parameter-features:
  30 for Celo; the rest 0); a SUM, so the rows of split tensors all-reduce with SUM (replicated
  tensors' rows are complete and are not reduced). Celo's parameter scale mean(p²) is channel 2.
- Phase C divides by the whole tensors' counts (:attr:`table.Plan.numels`; the factored means by
  the whole axis 0) and applies on the block.

:func:`table.statistics` is phases A and B without a reduction (the unsharded step: the same
kernels in the same order as before the split, so its numerics are unchanged).

Example::

    from lightning_lopt.optim import gpu
    gpu.available()          # Triton importable (the kernels compile at first use)
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_lopt.optim.architectures import CeloLOpt, LearnedOptimizerModule, SmallFCLOpt
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.particle_step import State, register_particle_step, vmapped_pure_step

#: The numeric mode of the particle form (the meta-trainer's seam).
PARTICLE_NUMERICS = "fast"
NUMERIC_MODES = ("fast", "exact")


#: The least CUDA compute capability the kernels are built for (TF32 and bf16 need Ampere).
MIN_CAPABILITY = (8, 0)


def available() -> bool:
    """Whether Triton is importable (the kernels are compiled at first use)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def capable(device: torch.device) -> bool:
    """Whether the CUDA ``device`` has the compute capability the kernels need (:data:`MIN_CAPABILITY`)."""
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def supports(module: LearnedOptimizerModule, params: Sequence[Tensor]) -> bool:
    """Whether the GPU step runs this step: CUDA (compute capability ≥ 8.0), float32 / bf16
    parameters, a supported configuration, Triton installed."""
    from lightning_lopt.optim.gpu.step import architecture_supported

    return (
        bool(params)
        and all(p.device.type == "cuda" and p.dtype in (torch.float32, torch.bfloat16) for p in params)
        and capable(params[0].device)
        and architecture_supported(module)
        and available()
    )


def _particle_step(
    module: LearnedOptimizerModule,
    theta: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    state: State,
    ctx: StepContext,
) -> tuple[list[Tensor], State]:
    """The seam's GPU implementation; θ in another dtype than float32 is left to the reference."""
    from lightning_lopt.optim.gpu import step

    if any(v.dtype != torch.float32 for v in theta.values() if v.is_floating_point()):
        return vmapped_pure_step(module, theta, params, grads, state, ctx)
    return step.particle_step(module, theta, params, grads, state, ctx, numerics=PARTICLE_NUMERICS)


def register_particle_steps() -> None:
    """Register the GPU form for CUDA parameters in front of the CPU kernel's registration (called by
    :func:`lightning_lopt.optim.particle_step.register_default_particle_steps`, after the CPU kernel's)."""
    from lightning_lopt.optim import particle_step

    for cls in (SmallFCLOpt, CeloLOpt):
        cpu_step, cpu_supports = particle_step.implementation(cls)

        def run(module, theta, params, grads, state, ctx, _cpu_step=cpu_step):
            if supports(module, params):
                return _particle_step(module, theta, params, grads, state, ctx)
            return _cpu_step(module, theta, params, grads, state, ctx)

        def either(module, params, _cpu_supports=cpu_supports):
            return supports(module, params) or _cpu_supports(module, params)

        register_particle_step(cls, run, either)


__all__ = ["NUMERIC_MODES", "PARTICLE_NUMERICS", "available", "capable", "register_particle_steps", "supports"]
