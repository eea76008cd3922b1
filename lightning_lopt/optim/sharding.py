"""The learned optimizers' step on FSDP2-sharded parameters (``DTensor`` with ``Shard(0)``).

:meth:`LearnedOptimizer.step <lightning_lopt.optim.learned.LearnedOptimizer.step>` calls
:func:`sharded_step` when any parameter is a ``DTensor``. It unwraps every parameter, gradient and
accumulator to its local block, runs the pure sharded core
(:mod:`lightning_lopt.optim.functional.sharded`) with ``reduce`` = one ``all_reduce`` over the
parameters' mesh (two per step, each carrying every tensor's statistics), writes the local results
back, and keeps the per-tensor state as ``DTensor`` sharded like the parameter (accumulators
reduced over axis 0 are ``Replicate``), so ``state_dict()`` works with
``torch.distributed.checkpoint``. On CUDA (compute capability ≥ 8.0, Triton installed, ``fused``
not ``False``, float32 compute) the local blocks run the Triton kernels of
:mod:`lightning_lopt.optim.gpu` in three phases with the same two all-reduces between them
(:func:`lightning_lopt.optim.gpu.step.sharded_step_in_place`). On CPU (float32 compute, ``fused``
not ``False``, every parameter ``Shard(0)``, the kernel built) they run the fused C kernel in the
same three phases (:func:`lightning_lopt.optim.fused.driver.sharded_step_in_place`); elsewhere the
pure core.

Supported: ``LO``, ``MuLO`` and ``Celo``; a 1-D device mesh with ``Shard(0)`` or ``Replicate``
placements (what ``fully_shard`` makes), uneven and empty local shards, float32 state. FSDP1
(``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) hands the optimizer flattened 1-D
shards, on which per-tensor statistics and μP scales would be silently wrong: it is refused by
:func:`check_not_fsdp1`.

Example::

    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    opt = lightning_lopt.MuLO(model.parameters(), scales=scales)   # scales from the unsharded names
    loss.backward(); opt.step(loss=loss)                             # every rank
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_lopt.optim.architectures import (
    CeloLOpt,
    LearnedOptimizerModule,
    SmallFCLOpt,
)
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.functional import sharded as core
from lightning_lopt.optim.functional.accumulators import work_shape
from lightning_lopt.optim.step_contract import GLOBAL_STATE_KEY

if TYPE_CHECKING:
    from lightning_lopt.optim.learned import LearnedOptimizer

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]

#: Prefix of the global state's entries, which the sharded step keeps in every parameter's state:
#: ``torch.distributed.checkpoint``'s optimizer state dicts (Lightning's ModelParallelStrategy
#: checkpoints) accept parameter entries only, not the ``"learned_optimizer"`` entry of one process.
GLOBAL_PREFIX = "learned_optimizer."

#: Test hook: run the Triton phases on CPU tensors. Only valid in a process started with
#: ``TRITON_INTERPRET=1`` (Triton's interpreter runs the kernels on CPU memory, slowly);
#: tests/optim/_fsdp2_gpu_phases_script.py sets it to test the CUDA path on CPU machines.
TRITON_ON_CPU = False

_FSDP1_FIX = (
    "FSDP1 (FullyShardedDataParallel, Lightning's strategy='fsdp' / FSDPStrategy) gives the optimizer "
    "flattened 1-D shards, on which the per-tensor statistics and μP scales of a learned optimizer "
    "would be silently wrong. Shard with FSDP2 instead: torch.distributed.fsdp.fully_shard, or "
    "Lightning's ModelParallelStrategy (which uses it)."
)


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def check_not_fsdp1(params: list[Tensor], owner: str) -> None:
    """Raise ``TypeError`` (naming ``ModelParallelStrategy``) for parameters managed by FSDP1."""
    for p in params:
        if getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False):
            raise TypeError(f"{owner}: {_FSDP1_FIX}")


def _spec(p: Tensor, owner: str) -> tuple[core.ShardSpec, Any]:
    """The core's view of one parameter, and its mesh (``None`` for a plain tensor)."""
    if not is_dtensor(p):
        return core.ShardSpec(work_shape(p.shape), split=False), None
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or not isinstance(placements[0], (Shard, Replicate)):
        raise NotImplementedError(
            f"{owner}: sharded parameters are supported on a 1-D device mesh with Shard(0) or Replicate "
            f"placements (what fully_shard makes); got mesh of {mesh.ndim} dims, placements {placements}"
        )
    split = isinstance(placements[0], Shard)
    if split and (placements[0].dim != 0 or p.dim() == 0):
        raise NotImplementedError(f"{owner}: only Shard(0) placements are supported, got {placements}")
    return core.ShardSpec(work_shape(p.shape), split=split), mesh


def _all_reduce(group: Any) -> core.Reduce:
    def reduce(flat: Tensor) -> Tensor:
        flat = flat.contiguous()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        return flat

    return reduce


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


def _wrap(local: Tensor, mesh: Any, spec: core.ShardSpec, keeps_axis0: bool, global_shape: tuple[int, ...]) -> Tensor:
    """``local`` as a DTensor of ``global_shape``: Shard(0) when it keeps the split axis 0, else Replicate."""
    if mesh is None:
        return local
    placement = Shard(0) if spec.split and keeps_axis0 else Replicate()
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=torch.Size(global_shape), stride=stride)


def _global_accumulator_shapes(spec: core.ShardSpec, layout: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    return core.accumulator_shapes(spec._replace(split=False), spec.shape[0], layout)


def _check(opt: LearnedOptimizer, module: LearnedOptimizerModule) -> None:
    owner = type(opt).__name__
    if type(module) not in (SmallFCLOpt, CeloLOpt):
        raise NotImplementedError(
            f"{owner}: sharded (DTensor) parameters are supported by LO, MuLO and Celo; "
            f"{type(module).__name__} is not (VeLO's per-tensor LSTM inputs are not reduced across shards)"
        )
    if opt.state_dtype != torch.float32:
        raise NotImplementedError(f"{owner}: sharded parameters need state_dtype=torch.float32")


def _runs_gpu_phases(opt: LearnedOptimizer, module: LearnedOptimizerModule, device: torch.device) -> bool:
    """Whether the local blocks on ``device`` take the Triton phases (else the pure core)."""
    from lightning_lopt.optim import gpu

    if opt.fused is False or opt.compute_dtype != torch.float32 or not gpu.available():
        return False
    if device.type == "cuda":
        runs = gpu.capable(device)
    else:
        runs = TRITON_ON_CPU and device.type == "cpu"
    from lightning_lopt.optim.gpu.step import architecture_supported

    return runs and architecture_supported(module)


def _runs_cpu_phases(
    opt: LearnedOptimizer, module: LearnedOptimizerModule, device: torch.device, specs: list[core.ShardSpec]
) -> bool:
    """Whether the local blocks on ``device`` take the fused CPU kernel's phases (else the pure core).
    Replicated parameters are left to the pure core: the kernel would count their statistics once per rank."""
    from lightning_lopt.optim import fused
    from lightning_lopt.optim.fused import driver

    if opt.fused is False or opt.compute_dtype != torch.float32 or device.type != "cpu":
        return False
    if not (driver.architecture_supported(module) and all(spec.split and spec.shape[0] > 0 for spec in specs)):
        return False
    return fused.kernel() is not None


def _check_fused(
    opt: LearnedOptimizer, module: LearnedOptimizerModule, device: torch.device, specs: list[core.ShardSpec]
) -> None:
    if opt.fused and not (_runs_gpu_phases(opt, module, device) or _runs_cpu_phases(opt, module, device, specs)):
        raise NotImplementedError(
            f"{type(opt).__name__}(fused=True): on sharded (DTensor) parameters the step runs fused on CUDA "
            "(compute capability ≥ 8.0 and Triton) or on CPU in float32 with every parameter Shard(0) and the "
            "fused kernel built; not here"
        )


def _specs(params: list[Tensor], owner: str) -> tuple[list[core.ShardSpec], list[Any]]:
    specs, meshes = zip(*(_spec(p, owner) for p in params))
    if len({id(m) for m in meshes if m is not None}) > 1:
        raise NotImplementedError(f"{owner}: all sharded parameters must live on one device mesh")
    return list(specs), list(meshes)


def init_state(opt: LearnedOptimizer, params: list[Tensor]) -> None:
    """Create the (zero) state of ``params`` that have none, and the global state if missing.

    Called when the optimizer is built, so that ``state_dict()`` has its final structure before the
    first step: ``torch.distributed.checkpoint`` loads into it, and its optimizer state-dict helpers
    (Lightning's ModelParallelStrategy) would otherwise run a step without a loss to create it.
    """
    module = opt.meta_weights
    _check(opt, module)
    specs, meshes = _specs(params, type(opt).__name__)
    _check_fused(opt, module, _local(params[0]).device, specs)
    dtype = opt.compute_dtype
    global_state = _global_state(opt, params)
    if global_state is None:
        global_state = {k: v for k, v in module.init_state([]).items() if k != "tensors"}
    entries = {GLOBAL_PREFIX + k: v.to(dtype) if v.is_floating_point() else v for k, v in global_state.items()}
    for p, spec, mesh in zip(params, specs, meshes):
        if opt.state.get(p):
            continue
        local_param = _local(p)
        rows = local_param.shape[0] if spec.split else spec.shape[0]
        local = core.init_accumulators(spec, rows, dtype, local_param.device, module.layout)
        shapes = _global_accumulator_shapes(spec, module.layout)
        opt.state[p] = {**{k: _wrap(v, mesh, spec, shapes[k][1], shapes[k][0]) for k, v in local.items()}, **entries}


def sharded_step(
    opt: LearnedOptimizer,
    module: LearnedOptimizerModule,
    params: list[Tensor],
    groups: list[dict[str, Any]],
    ctx: StepContext,
) -> None:
    """One step of ``opt`` on parameters of which some are DTensors (see the module docstring)."""
    _check(opt, module)
    init_state(opt, params)  # parameters added since (add_param_group); checks fused=True
    specs, meshes = _specs(params, type(opt).__name__)
    mesh = next(m for m in meshes if m is not None)
    dtype = opt.compute_dtype
    local_params = [_local(p) for p in params]
    device = local_params[0].device
    grads = [_local(p.grad).to(dtype) for p in params]
    global_state = {k: v.to(device) for k, v in _global_state(opt, params).items()}
    accumulators = [
        {k: _local(v).to(dtype) for k, v in opt.state[p].items() if not k.startswith(GLOBAL_PREFIX)} for p in params
    ]
    state = {**global_state, "tensors": accumulators}
    reduce = _all_reduce(mesh.get_group())
    if _runs_gpu_phases(opt, module, device):
        new_state = _phases_step(opt, _gpu_phases(opt, specs, reduce), module, local_params, grads, state, ctx, groups)
    elif _runs_cpu_phases(opt, module, device, specs):
        new_state = _phases_step(opt, _cpu_phases(specs, reduce), module, local_params, grads, state, ctx, groups)
    else:
        core_step = core.small_fc_step if isinstance(module, SmallFCLOpt) else core.celo_step
        work = [p if p.dtype == dtype else p.to(dtype) for p in local_params]
        new_params, new_state = core_step(module.theta(), work, grads, state, ctx, specs, reduce, **module.step_config)
        for lp, old, new, group in zip(local_params, work, new_params, groups):
            decay = group["lr"] * group["weight_decay"]
            lp.copy_(new - decay * old if decay else new)
    new_global = {GLOBAL_PREFIX + k: v for k, v in new_state.items() if k != "tensors"}
    opt.state.pop(GLOBAL_STATE_KEY, None)
    # Every parameter of the optimizer carries the global state, also those without a gradient now.
    for p in opt.state:
        if isinstance(p, Tensor):
            opt.state[p].update(new_global)
    for p, spec, m, acc in zip(params, specs, meshes, new_state["tensors"]):
        shapes = _global_accumulator_shapes(spec, module.layout)
        opt.state[p] = {**{k: _wrap(v, m, spec, shapes[k][1], shapes[k][0]) for k, v in acc.items()}, **new_global}


def _gpu_phases(opt: LearnedOptimizer, specs: list[core.ShardSpec], reduce: core.Reduce) -> Callable[..., Any]:
    """The Triton phases as an in-place step over the local blocks (non-float32 or non-contiguous
    blocks go through a float32 copy, as ``fast_steps.run_in_place`` does)."""
    from lightning_lopt.optim.gpu.step import sharded_step_in_place

    return functools.partial(sharded_step_in_place, shards=specs, reduce=reduce, numerics=opt.gpu_numerics)


def _cpu_phases(specs: list[core.ShardSpec], reduce: core.Reduce) -> Callable[..., Any]:
    """The fused CPU kernel's phases as an in-place step over the local blocks."""
    from lightning_lopt.optim import fused
    from lightning_lopt.optim.fused import driver

    return functools.partial(
        driver.sharded_step_in_place, fused.kernel(), whole_shapes=[spec.shape for spec in specs], reduce=reduce
    )


def _phases_step(
    opt: LearnedOptimizer,
    fn: Callable[..., Any],
    module: LearnedOptimizerModule,
    local_params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, Any],
    ctx: StepContext,
    groups: list[dict[str, Any]],
) -> dict[str, Any]:
    """Run a kernel's phases (``fn``) on the local blocks, in place; returns the new state."""
    from lightning_lopt.optim import fast_steps

    weight_decays = [group["lr"] * group["weight_decay"] for group in groups]
    return fast_steps.run_in_place(
        fn, module, local_params, grads, state, ctx, weight_decays, opt._step_options(), float32_only=True
    )


def _global_state(opt: LearnedOptimizer, params: list[Tensor]) -> dict[str, Tensor] | None:
    """The global state (iteration, loss buffer, Celo's LSTM), kept under every parameter's state."""
    if GLOBAL_STATE_KEY in opt.state:  # from a step on plain tensors
        return dict(opt.state[GLOBAL_STATE_KEY])
    for p in params:
        entry = opt.state.get(p, {})
        found = {k[len(GLOBAL_PREFIX) :]: v for k, v in entry.items() if k.startswith(GLOBAL_PREFIX)}
        if found:
            return found
    return None


__all__ = ["check_not_fsdp1", "init_state", "is_dtensor", "sharded_step"]
