"""The two forms of the GPU step: in place for the optimizers, stacked particles for meta-training.

- :func:`step_in_place`: one θ; parameters, accumulators and the global state (iteration, Celo's
  loss buffer and LSTM state) are all updated in place, so repeated steps reuse the same memory
  and can be captured in a CUDA graph;
- :func:`particle_step`: P particles on a leading axis, each with its own θ; returns new tensors
  like :func:`~lightning_lopt.optim.particle_step.vmapped_pure_step` (the registered seam);
- :func:`sharded_step_in_place`: :func:`step_in_place` on blocks of rows of tensors (FSDP2's
  ``Shard(0)``), with the two sums across blocks made by ``reduce`` between the passes.

Example::

    from lightning_lopt.optim.gpu import step as gpu_step
    gpu_step.step_in_place(lopt, params, grads, state, ctx, [0.0] * len(params), numerics="exact")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lopt.optim.architectures import CeloLOpt, LearnedOptimizerModule, SmallFCLOpt
from lightning_lopt.optim.functional import StepContext, celo
from lightning_lopt.optim.functional.accumulators import work_shape
from lightning_lopt.optim.functional.sharded import Reduce, ShardSpec
from lightning_lopt.optim.gpu import table
from lightning_lopt.optim.gpu.theta import PackedNets, celo_nets, small_fc_nets

State = dict[str, Any]
#: Hidden widths the 32-wide tiles hold.
MAX_HIDDEN = 32


def architecture_supported(module: LearnedOptimizerModule) -> bool:
    """Whether the kernels implement this architecture and configuration."""
    if type(module) is SmallFCLOpt:
        return module.hidden_size <= MAX_HIDDEN
    if type(module) is CeloLOpt:
        return module.mlp[0].out_features <= MAX_HIDDEN and module.mlp[1].out_features <= MAX_HIDDEN
    return False


def _nets(module: LearnedOptimizerModule, theta: dict[str, Tensor], state: State, ctx: StepContext,
          particles: bool) -> tuple[PackedNets, State]:
    """Packed kernel inputs and the next global state (all but ``tensors``)."""
    iteration = state["iteration"]
    if isinstance(module, SmallFCLOpt):
        return small_fc_nets(module, theta, iteration), {"iteration": iteration + 1}
    global_state = {k: v for k, v in state.items() if k != "tensors"}
    if particles:
        from lightning_lopt.optim.fused.driver import _vmapped_scheduler

        eta, scheduler_state = _vmapped_scheduler(theta, global_state, ctx)
    else:
        single = {k: v[0] for k, v in theta.items() if k.startswith("scheduler.")}
        eta, scheduler_state = celo.scheduler_step(single, global_state, ctx)
    return celo_nets(module, theta, eta, iteration), {"iteration": iteration + 1, **scheduler_state}


def _run(module: LearnedOptimizerModule, jobs: list[table.Job], nets: PackedNets, numerics: str) -> None:
    """Both passes, one plan per (parameter dtype, gradient dtype): a plan's kernels are compiled for one."""
    groups: dict[tuple[torch.dtype, torch.dtype], list[table.Job]] = {}
    for job in jobs:
        if job.p.numel() > 0:
            groups.setdefault((job.p.dtype, job.g.dtype), []).append(job)
    for group in groups.values():
        plan = table.plan_for(group, module.layout, isinstance(module, CeloLOpt))
        stats, workspace = table.statistics(plan, nets)
        table.apply(plan, nets, stats, workspace, numerics=numerics)


def step_in_place(
    module: LearnedOptimizerModule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    weight_decays: Sequence[float],
    *,
    numerics: str = "fast",
) -> None:
    """One step of one optimizer: ``p ← step(p) − weight_decay · p`` and the state, all in place.

    ``params`` (float32 or bf16), ``grads`` (either) and the accumulators (``m`` / ``rms`` float32
    or bf16, the rest float32) must be contiguous. ``state`` holds the global entries and
    ``"tensors"``; the global tensors are overwritten with their next values.
    """
    theta = {k: v.detach().unsqueeze(0) for k, v in module.state_dict().items()}
    nets, new_global = _nets(module, theta, state, ctx, particles=False)
    jobs = [
        table.Job(work_shape(p.shape), p, g, acc, float(scale), float(wd), index)
        for index, (p, g, acc, scale, wd) in enumerate(zip(params, grads, state["tensors"], ctx.scales, weight_decays))
    ]
    _run(module, jobs, nets, numerics)
    for key, value in new_global.items():
        state[key].copy_(value.reshape(state[key].shape))


def sharded_step_in_place(
    module: LearnedOptimizerModule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    weight_decays: Sequence[float],
    shards: Sequence[ShardSpec],
    reduce: Reduce,
    *,
    numerics: str = "fast",
) -> None:
    """:func:`step_in_place` on local blocks of rows: ``shards[i]`` is the whole tensor's work shape
    and whether ``params[i]`` is a block of its rows (else the whole, replicated tensor).

    Three phases with a ``reduce`` (the sum over ranks of one flat float32 tensor, as in
    :mod:`lightning_lopt.optim.functional.sharded`) between each two: the partial sums over axis 0
    of the factored statistics (:func:`table.partial_sums`), then the channel sums of squares of the
    split tensors (:func:`table.finish_statistics`), then the update with the whole tensors' counts
    (:func:`table.apply`). Every rank must pass the same tensors in the same order (empty blocks
    included), so that the reductions line up. Parameters, gradients and ``m`` / ``rms`` must each
    be all float32 or all bf16 (one plan); every other requirement is :func:`step_in_place`'s.

    Example::

        shards = [ShardSpec(work_shape(p.shape), split=True) for p in dtensor_params]
        sharded_step_in_place(lopt, local_params, local_grads, state, ctx, [0.0] * n, shards, reduce)
    """
    theta = {k: v.detach().unsqueeze(0) for k, v in module.state_dict().items()}
    nets, new_global = _nets(module, theta, state, ctx, particles=False)
    jobs = [
        table.Job(work_shape(p.shape), p, g, acc, float(scale), float(wd), index,
                  total_rows=shard.shape[0] if shard.split else None)
        for index, (p, g, acc, scale, wd, shard) in enumerate(
            zip(params, grads, state["tensors"], ctx.scales, weight_decays, shards)
        )
    ]
    if any(job.p.numel() or job.total_rows is not None for job in jobs):
        plan = table.plan_for(jobs, module.layout, isinstance(module, CeloLOpt))
        workspace = table.partial_sums(plan, nets)
        if plan.shared_floats:  # the same on every rank: it follows from the whole tensors' shapes
            shared = workspace[: plan.shared_floats]
            shared.copy_(reduce(shared))
        stats = table.finish_statistics(plan, nets, workspace)
        if plan.n_split:
            partial = stats.index_select(0, plan.split_jobs)
            stats.index_copy_(0, plan.split_jobs, reduce(partial.reshape(-1)).reshape(partial.shape))
        table.apply(plan, nets, stats, workspace, numerics=numerics)
    for key, value in new_global.items():
        state[key].copy_(value.reshape(state[key].shape))


def particle_step(
    module: LearnedOptimizerModule,
    theta: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    state: State,
    ctx: StepContext,
    *,
    numerics: str = "fast",
) -> tuple[list[Tensor], State]:
    """P stacked particles (leading axis everywhere, θ per particle); new tensors, inputs untouched."""
    nets, new_state = _nets(module, theta, state, ctx, particles=True)
    new_params = [p.detach().clone(memory_format=torch.contiguous_format) for p in params]
    new_tensors = [{k: v.clone(memory_format=torch.contiguous_format) for k, v in acc.items()} for acc in state["tensors"]]
    grads = [g.contiguous() for g in grads]
    jobs = [
        table.Job(work_shape(p.shape[1:]), p[i], g[i], {k: v[i] for k, v in acc.items()}, float(scale), 0.0, index, i)
        for index, (p, g, acc, scale) in enumerate(zip(new_params, grads, new_tensors, ctx.scales))
        for i in range(p.shape[0])
    ]
    _run(module, jobs, nets, numerics)
    new_state["tensors"] = new_tensors
    return new_params, new_state
