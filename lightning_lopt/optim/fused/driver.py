"""Run one learned-optimizer step through the fused kernel: marshalling, θ preparation, both forms.

Three entry points, with the numbers of the pure step (within float32 rounding):

- :func:`step_in_place` for the ``torch.optim`` wrappers: one θ, the parameters, their
  accumulators written in place (no second copy of the state or the parameters);
- :func:`particle_step` for meta-training: P particles stacked on a leading axis, each with its own
  θ; returns new tensors like :func:`~lightning_lopt.optim.particle_step.vmapped_pure_step`;
- :func:`celo2_directions`: Celo2's elementwise part (accumulators in place, the MLP output ``d``),
  which :mod:`.celo2_step` completes in torch.

What stays in torch: everything that is per step and per particle rather than per element (the
decays from their offsets, small_fc's time features folded into the first-layer bias, Celo's loss
buffer and LSTM scheduler). The kernel does every per-element pass (kernel.c).

Example::

    from lightning_lopt.optim.fused import build, driver
    if driver.supports(lopt, params):
        kernel = build.load()
        new_global = driver.step_in_place(kernel, lopt, params, grads, state, ctx, [0.0] * len(params))
        params, state = driver.particle_step(kernel, lopt, theta, stacked, grads, stacked_state, ctx)
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_lopt.optim.architectures import (
    CeloLOpt,
    LearnedOptimizerModule,
    SmallFCLOpt,
)
from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.functional import StepContext, celo, celo2, small_fc
from lightning_lopt.optim.functional.accumulators import (
    ADAFACTOR_DECAYS,
    MOMENTUM_DECAYS,
    RMS_DECAYS,
    factored_dims,
    work_shape,
)
from lightning_lopt.optim.functional.features import time_embedding
from lightning_lopt.optim.fused.build import Kernel

State = dict[str, Any]
_RULE = {SmallFCLOpt: 0, CeloLOpt: 1, Celo2LOpt: 2}
#: lopt_step's status for a call it refuses (unknown rule, hidden size or normalisation view).
_INVALID_CALL = -2
#: The largest Celo2 tensor kernel.c's FINISH normalises and steps: one work unit (``CHUNK``), so its
#: one-thread sum costs no parallelism; larger ones are normalised by torch.
CELO2_FINISH_MAX = 16384
#: small_fc hidden sizes the kernel's register tiles divide (8 outputs per tile on AVX-512).
_HIDDEN_SIZES = (8, 16, 24, 32)


class _Call(ctypes.Structure):
    """``lopt_call`` of kernel.c."""

    _fields_ = [
        ("rule", ctypes.c_int32),
        ("n_particles", ctypes.c_int32),
        ("n_tensors", ctypes.c_int32),
        ("n_threads", ctypes.c_int32),
        ("state_bf16", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        *[(name, ctypes.c_void_p) for name in ("tensors", "tscale", "w0", "b0", "w1", "b1", "w2", "b2", "decays", "lr", "seed")],
        ("exp_mult", ctypes.c_float),
    ]


def architecture_supported(module: LearnedOptimizerModule) -> bool:
    """Whether the kernel implements this architecture and configuration."""
    if isinstance(module, SmallFCLOpt):
        return type(module) is SmallFCLOpt and module.hidden_size in _HIDDEN_SIZES
    return type(module) in (CeloLOpt, Celo2LOpt)


def supports(module: LearnedOptimizerModule, params: Sequence[Tensor]) -> bool:
    """Whether :func:`step_in_place` / :func:`particle_step` run this step (CPU float32 only)."""
    return architecture_supported(module) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


# -- θ-derived, per-particle inputs --------------------------------------------------------------


@dataclass
class _Nets:
    """Per-particle kernel inputs, contiguous float32 with a leading particle axis."""

    w0: Tensor
    b0: Tensor
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    decays: Tensor  # [P, 7]: momentum, rms, adafactor
    lr: Tensor  # [P]
    seeds: np.ndarray  # [P] uint32, the iteration
    exp_mult: float


def _seeds(iteration: Tensor) -> np.ndarray:
    return np.asarray([int(i) & 0xFFFFFFFF for i in iteration.reshape(-1).tolist()], dtype=np.uint32)


def _nets(
    theta: dict[str, Tensor], w0: Tensor, b0: Tensor, decays: Tensor, lr: Tensor, iteration: Tensor, exp_mult: float
) -> _Nets:
    """The kernel inputs: the first layer as given, θ's ``mlp.1`` and ``mlp.2`` as they are, every
    tensor made contiguous (the kernel reads them as packed float32 rows)."""
    return _Nets(
        w0=w0.contiguous(),
        b0=b0.contiguous(),
        w1=theta["mlp.1.weight"].contiguous(),
        b1=theta["mlp.1.bias"].contiguous(),
        w2=theta["mlp.2.weight"].contiguous(),
        b2=theta["mlp.2.bias"].contiguous(),
        decays=decays.contiguous(),
        lr=lr.contiguous(),
        seeds=_seeds(iteration),
        exp_mult=exp_mult,
    )


def _small_fc_nets(module: SmallFCLOpt, theta: dict[str, Tensor], iteration: Tensor) -> _Nets:
    """θ of P particles (leading axis) → kernel inputs; the time features become a bias (as the pure step)."""
    w0 = theta["mlp.0.weight"]
    nf = small_fc.NUM_TENSOR_FEATURES
    time = time_embedding(iteration.reshape(-1, 1), w0.dtype)  # [P, 11]
    b0 = theta["mlp.0.bias"] + (w0[..., nf:] @ time.unsqueeze(-1)).squeeze(-1)
    decays = torch.cat(
        [
            small_fc.decays_from_offsets(theta["momentum_decays"], MOMENTUM_DECAYS),
            small_fc.decays_from_offsets(theta["rms_decays"], RMS_DECAYS),
            small_fc.decays_from_offsets(theta["adafactor_decays"], ADAFACTOR_DECAYS),
        ],
        dim=-1,
    )
    lr = torch.full((w0.shape[0],), module.step_mult, dtype=torch.float32)
    return _nets(theta, w0[..., :nf], b0, decays, lr, iteration, module.exp_mult)


def _celo_nets(module: CeloLOpt, theta: dict[str, Tensor], eta: Tensor, iteration: Tensor) -> _Nets:
    """Celo θ of P particles and their η → kernel inputs (stage 1 drops η, as the pure step)."""
    w0 = theta["mlp.0.weight"]
    p = w0.shape[0]
    lr = eta.reshape(p) * celo.STEP_MULT if module.train_phase == 2 else torch.full((p,), celo.STEP_MULT)
    constant = torch.tensor([*MOMENTUM_DECAYS, *RMS_DECAYS, *ADAFACTOR_DECAYS], dtype=torch.float32)
    return _nets(theta, w0, theta["mlp.0.bias"], constant.expand(p, -1), lr.to(torch.float32), iteration, celo.EXP_MULT)


def _celo2_nets(theta: dict[str, Tensor], iteration: Tensor) -> _Nets:
    """Celo2's θ of P particles (leading axis) → kernel inputs; its decays are constants, there is no
    learning rate or exp_mult in the kernel's part (the step is completed in torch)."""
    w0 = theta["mlp.0.weight"]
    p = w0.shape[0]
    constant = torch.tensor([*celo2.MOMENTUM_DECAYS, *celo2.RMS_DECAYS, *celo2.ADAFACTOR_DECAYS], dtype=torch.float32)
    lr = torch.zeros(p, dtype=torch.float32)
    return _nets(theta, w0, theta["mlp.0.bias"], constant.expand(p, -1), lr, iteration, 0.0)


# -- tensors --------------------------------------------------------------------------------------


def normalisation_view(shape: tuple[int, ...], layout: str) -> tuple[int, int, int]:
    """``T_GX, T_GY, T_GZ`` of kernel.c: the work-shape tensor as ``[X][Y][Z]`` whose slices
    ``(x, z)`` are Celo2's matrix slices (the statistic is a mean over ``y``, the matrix axes).

    Rank ≤ 2: one slice. Torch layout: the matrix axes are ``(1, 0)``, slices over axes 2...
    (``[1][out·in][kh·kw]``); JAX layout: the last two axes, slices over the leading ones.
    """
    n = math.prod(shape)
    if len(shape) <= 2:
        return (1, n, 1)
    if layout == "torch":
        return (1, shape[0] * shape[1], math.prod(shape[2:]))
    return (math.prod(shape[:-2]), shape[-2] * shape[-1], 1)



def _view(shape: tuple[int, ...], layout: str) -> list[int]:
    """``T_N`` … ``T_D0_IS_A`` of kernel.c: the size, whether the tensor is factored, its 5-D view
    ``[pre, A, mid, B, post]`` around the two factored axes ``a < b`` (d0 and d1 in axis order),
    and whether d0 is ``a``. Below rank 2 the tensor is not factored."""
    n = math.prod(shape)
    dims = factored_dims(shape, layout)
    if dims is None:
        return [n, 0, 1, 1, 1, 1, 1, 0]
    a, b = sorted(dims)
    view = [math.prod(shape[:a]), shape[a], math.prod(shape[a + 1 : b]), shape[b], math.prod(shape[b + 1 :])]
    return [n, 1, *view, int(dims[1] == a)]


def _block_view(whole: tuple[int, ...], rows: int, layout: str, fields: list[int]) -> list[int]:
    """The descriptor of a block of ``rows`` rows of axis 0 of a tensor of work shape ``whole``: the
    whole tensor's factored axes and 5-D view with axis 0 cut to the block (it lies in ``pre``, or is
    ``A``), the given ``fields`` (``T_P_IN`` … ``T_GZ``), then ``T_N_TOTAL``, ``T_A_TOTAL``, ``T_SPLIT_A``."""
    view = _view(whole, layout)
    n_total, a_total = view[0], view[3]
    view[0] = n_total // whole[0] * rows
    split_a = 0
    if view[1]:
        if min(factored_dims(whole, layout)) == 0:  # axis a is axis 0 (pre == 1)
            view[3], split_a = rows, 1
        else:
            view[2] = view[2] // whole[0] * rows
    return [*view, *fields, n_total, a_total, split_a]


@dataclass
class _Job:
    """One tensor of the step (all particles): its work shape and the buffers the kernel reads and writes."""

    shape: tuple[int, ...]
    layout: str
    p_in: Tensor
    p_out: Tensor
    g: Tensor
    acc_in: dict[str, Tensor]
    acc_out: dict[str, Tensor]
    scale: float
    weight_decay: float
    index: int  # position in the step's tensor list (keys the stochastic rounding of bf16 state)
    view: tuple[int, int, int] | None = None  # Celo2: normalisation_view; else one slice
    #: The whole tensor's work shape when ``shape`` is this rank's block of rows of axis 0 (sharded step).
    whole_shape: tuple[int, ...] | None = None

    def descriptor(self) -> list[int]:
        """The int64 fields of kernel.c's tensor descriptor (``T_N`` … ``T_SPLIT_A``)."""
        if "v" in self.acc_in:
            v = [self.acc_in["v"], self.acc_out["v"]]
            ptrs = [t.data_ptr() for t in v] + [0, 0]
        else:
            v = [self.acc_in["v_row"], self.acc_out["v_row"], self.acc_in["v_col"], self.acc_out["v_col"]]
            ptrs = [t.data_ptr() for t in v]
        tensors = [self.p_in, self.p_out, self.g, self.acc_in["m"], self.acc_out["m"], self.acc_in["rms"], self.acc_out["rms"]]
        view = self.view or (1, math.prod(self.shape), 1)
        pointers = [*(t.data_ptr() for t in tensors), *ptrs, self.index, *view]
        if self.whole_shape is None:
            shape_view = _view(self.shape, self.layout)  # one process: the whole-tensor counts are the block's
            return [*shape_view, *pointers, shape_view[0], shape_view[3], 0]
        return _block_view(self.whole_shape, self.shape[0], self.layout, pointers)



_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_FLOAT32 = (torch.float32,)
_FLOAT32_OR_BF16 = (torch.float32, torch.bfloat16)


def is_plain_dense(t: object) -> bool:
    """Whether ``t`` is memory the kernel can address: a plain strided CPU tensor (not a DTensor or
    other subclass, not sparse, not meta)."""
    # ``is_cpu`` rather than ``device.type``: building the device object costs more than the rest of
    # the check, and the step checks every buffer of every tensor (many small tensors: most of the step).
    return type(t) in _PLAIN_TYPES and t.is_cpu and t.layout == torch.strided


def _dense_contiguous(t: Tensor) -> Tensor:
    """``t.contiguous()`` for strided tensors; others are passed on for :func:`_check_job` to refuse."""
    return t.contiguous() if t.layout == torch.strided else t


def _check_job(job: _Job, n_particles: int) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless every buffer of ``job`` is what kernel.c reads and
    writes (it trusts the descriptor's sizes and raw pointers, so a wrong tensor would crash the
    interpreter rather than fail)."""
    n = n_particles * math.prod(job.shape)
    sizes = {"m": n * len(MOMENTUM_DECAYS), "rms": n * len(RMS_DECAYS)}
    dims = factored_dims(job.shape if job.whole_shape is None else job.whole_shape, job.layout)
    if dims is None:
        sizes["v"] = n * len(ADAFACTOR_DECAYS)
    else:
        d1, d0 = dims
        for key, axis in (("v_row", d0), ("v_col", d1)):  # v_row drops d0, v_col drops d1
            kept = math.prod(s for i, s in enumerate(job.shape) if i != axis)
            sizes[key] = n_particles * kept * len(ADAFACTOR_DECAYS)
    # An in-place step writes to the buffers it reads: each is checked once.
    buffers = [("parameter", job.p_in, n, _FLOAT32), ("gradient", job.g, n, _FLOAT32)]
    if job.p_out is not job.p_in:
        buffers.append(("parameter output", job.p_out, n, _FLOAT32))
    states = [("state", job.acc_in)]
    if job.acc_out is not job.acc_in:
        states.append(("state output", job.acc_out))
    for which, acc in states:
        if acc.keys() != sizes.keys():
            raise ValueError(f"the fused step: {which} keys {sorted(acc)} do not match the tensor's {sorted(sizes)}")
        buffers += [(f"{which} '{key}'", acc[key], numel, _FLOAT32_OR_BF16 if key in ("m", "rms") else _FLOAT32) for key, numel in sizes.items()]
    for name, t, numel, allowed in buffers:
        if not (is_plain_dense(t) and t.dtype in allowed and t.is_contiguous() and t.numel() == numel):
            _raise_for_buffer(name, t, numel, allowed, job.shape)


def _raise_for_buffer(name: str, t: object, numel: int, allowed: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> None:
    """The error for a buffer of a fused-step job that is not what kernel.c reads and writes."""
    if not is_plain_dense(t):
        kind = type(t).__name__ if type(t) not in _PLAIN_TYPES else f"{t.layout} on {t.device}"
        raise TypeError(f"the fused step takes plain dense CPU tensors; the {name} is a {kind}")
    if t.dtype not in allowed:
        raise TypeError(f"the fused step: the {name} is {t.dtype}, expected {' or '.join(map(str, allowed))}")
    if not t.is_contiguous():
        raise ValueError("the fused step needs contiguous parameters, gradients and state")
    raise ValueError(f"the fused step: the {name} has {t.numel()} elements, expected {numel} for shape {list(shape)}")


def _state_is_bf16(jobs: Sequence[_Job]) -> bool:
    dtypes = {t.dtype for job in jobs for key in ("m", "rms") for t in (job.acc_in[key], job.acc_out[key])}
    if not dtypes <= {torch.float32, torch.bfloat16} or len(dtypes) != 1:
        raise TypeError(f"m and rms must all be float32 or all bfloat16, got {sorted(map(str, dtypes))}")
    return dtypes == {torch.bfloat16}


def _call(
    module: LearnedOptimizerModule,
    nets: _Nets | None,
    descriptors: np.ndarray,
    scalars: np.ndarray,
    n_particles: int,
    state_bf16: bool,
) -> _Call:
    """The kernel's argument block; the arrays must outlive the call."""
    call = _Call(
        rule=_RULE[type(module)],
        n_particles=n_particles,
        n_tensors=len(descriptors),
        n_threads=torch.get_num_threads(),
        state_bf16=int(state_bf16),
        hidden=module.hidden_size if isinstance(module, SmallFCLOpt) else 0,  # fixed by Celo's and Celo2's rule
        tensors=descriptors.ctypes.data,
        tscale=scalars.ctypes.data,
    )
    if nets is not None:
        for name in ("w0", "b0", "w1", "b1", "w2", "b2", "decays", "lr"):
            setattr(call, name, getattr(nets, name).data_ptr())
        call.seed = nets.seeds.ctypes.data
        call.exp_mult = nets.exp_mult
    return call


def _launch(kernel: Kernel, module: LearnedOptimizerModule, nets: _Nets, jobs: Sequence[_Job]) -> None:
    """One kernel call over every (particle, tensor) pair; the tensors must be contiguous.

    Empty tensors are left out (their outputs are empty too).
    """
    n_particles = nets.w0.shape[0]
    for job in jobs:
        _check_job(job, n_particles)
    jobs = [job for job in jobs if job.p_in.numel() > 0]
    if not jobs:
        return
    descriptors = np.asarray([job.descriptor() for job in jobs], dtype=np.int64)
    scalars = np.asarray([[job.scale, job.weight_decay] for job in jobs], dtype=np.float32)
    call = _call(module, nets, descriptors, scalars, nets.w0.shape[0], _state_is_bf16(jobs))
    status = kernel.lib.lopt_step(ctypes.byref(call))
    if status == _INVALID_CALL:
        raise ValueError("the fused learned-optimizer step refused its arguments (rule, hidden size or tensor view)")
    if status != 0:
        raise MemoryError(f"the fused learned-optimizer step failed (status {status}): workspace allocation")


def workspace_bytes(
    kernel: Kernel,
    module: LearnedOptimizerModule,
    shapes: Sequence[Sequence[int]],
    *,
    n_particles: int = 1,
    state_bf16: bool = False,
) -> int:
    """The bytes one step over tensors of these shapes allocates inside the kernel (its transient memory).

    Tables of the factored statistics, reduction partials, per-unit sums and normalised first
    layers; the parameters and the state themselves are not counted (they are written in place).
    """
    null_pointers = [0] * 11
    views = [
        normalisation_view(work_shape(shape), module.layout) if isinstance(module, Celo2LOpt) else (1, math.prod(shape), 1)
        for shape in shapes
    ]
    rows = []
    for index, (shape, view) in enumerate(zip(shapes, views)):
        shape_view = _view(work_shape(shape), module.layout)
        rows.append([*shape_view, *null_pointers, index, *view, shape_view[0], shape_view[3], 0])
    descriptors = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
    scalars = np.zeros((len(rows), 2), dtype=np.float32)
    call = _call(module, None, descriptors, scalars, n_particles, state_bf16)
    return int(kernel.lib.lopt_workspace_bytes(ctypes.byref(call)))


# -- the two forms --------------------------------------------------------------------------------


def _one_theta(module: LearnedOptimizerModule, state: State, ctx: StepContext) -> tuple[_Nets, State]:
    """The kernel inputs of the optimizer's one θ, and the new global state (Celo: its scheduler's step)."""
    theta = {k: v.detach() for k, v in module.state_dict().items()}
    one_particle = {k: v.unsqueeze(0) for k, v in theta.items()}
    iteration = state["iteration"]
    if isinstance(module, SmallFCLOpt):
        return _small_fc_nets(module, one_particle, iteration.reshape(1)), {"iteration": iteration + 1}
    eta, scheduler_state = celo.scheduler_step(theta, state, ctx)
    nets = _celo_nets(module, one_particle, eta, iteration.reshape(1))
    return nets, {"iteration": iteration + 1, **scheduler_state}


def _in_place_jobs(
    layout: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    accumulators: Sequence[dict[str, Tensor]],
    scales: Sequence[float],
    weight_decays: Sequence[float],
    whole_shapes: Sequence[tuple[int, ...]] | None = None,
) -> list[_Job]:
    """The jobs of a step that writes ``params`` and their ``accumulators`` in place; ``whole_shapes``
    (the sharded step) are the work shapes of the tensors whose blocks ``params`` are."""
    wholes = [None] * len(params) if whole_shapes is None else [tuple(whole) for whole in whole_shapes]
    return [
        _Job(
            work_shape(p.shape), layout, p, p, _dense_contiguous(g), acc, acc, float(scale), float(wd), index, whole_shape=whole
        )
        for index, (p, g, acc, scale, wd, whole) in enumerate(zip(params, grads, accumulators, scales, weight_decays, wholes))
    ]


def step_in_place(
    kernel: Kernel,
    module: LearnedOptimizerModule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    weight_decays: Sequence[float],
) -> State:
    """One step of one optimizer: writes ``params`` and ``state["tensors"]`` in place.

    Computes ``p ← step(p) − weight_decay · p`` (the wrappers' decoupled weight decay, applied to
    the pre-update ``p``). Returns the new global state (everything but ``"tensors"``).
    ``params`` and the state must be contiguous float32 (``m`` / ``rms`` may be bf16).
    """
    nets, new_global = _one_theta(module, state, ctx)
    jobs = _in_place_jobs(module.layout, params, grads, state["tensors"], ctx.scales, weight_decays)
    _launch(kernel, module, nets, jobs)
    return new_global


def sharded_step_in_place(
    kernel: Kernel,
    module: LearnedOptimizerModule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    weight_decays: Sequence[float],
    *,
    whole_shapes: Sequence[tuple[int, ...]],
    reduce: Callable[[Tensor], Tensor],
) -> State:
    """:func:`step_in_place` on this rank's blocks of rows of axis 0 (FSDP2's ``Shard(0)``) of
    tensors of work shapes ``whole_shapes``: the kernel's phases 1, 2, 3 with ``reduce`` (a sum
    over the ranks, as :data:`lightning_lopt.optim.functional.sharded.Reduce`) of the statistics
    between them, float64. Every rank passes the same tensors (empty blocks included) in the same
    order, and the same ``ctx.loss``; the step then equals one process's on the whole tensors.

    Example::

        reduce = lambda flat: (dist.all_reduce(flat), flat)[1]
        new_global = sharded_step_in_place(kernel, lopt, blocks, grads, state, ctx, [0.0] * n,
                                           whole_shapes=[spec.shape for spec in specs], reduce=reduce)
    """
    nets, new_global = _one_theta(module, state, ctx)
    jobs = _in_place_jobs(module.layout, params, grads, state["tensors"], ctx.scales, weight_decays, whole_shapes)
    for job in jobs:
        _check_job(job, 1)
    descriptors = np.asarray([job.descriptor() for job in jobs], dtype=np.int64)
    scalars = np.asarray([[job.scale, job.weight_decay] for job in jobs], dtype=np.float32)
    call = _call(module, nets, descriptors, scalars, 1, _state_is_bf16(jobs))
    workspace = torch.empty(int(kernel.lib.lopt_workspace_bytes(ctypes.byref(call))) + 64, dtype=torch.uint8)
    ws = workspace.data_ptr() + (-workspace.data_ptr()) % 64  # the kernel's 64-byte alignment
    reduced = torch.empty(0, dtype=torch.float64)
    for phase in (1, 2, 3):
        length = int(kernel.lib.lopt_exchange_length(ctypes.byref(call), phase)) if phase < 3 else 0
        out = torch.zeros(length, dtype=torch.float64)
        status = kernel.lib.lopt_step_phase(ctypes.byref(call), phase, ws, reduced.data_ptr(), out.data_ptr())
        if status != 0:
            raise RuntimeError(f"the fused sharded step failed in phase {phase} (status {status})")
        if phase < 3:
            reduced = reduce(out).contiguous() if length else out
    return new_global


def celo2_directions(
    kernel: Kernel,
    module: Celo2LOpt,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    accumulators: Sequence[dict[str, Tensor]],
    indices: Sequence[int],
    iteration: Tensor,
    finish: Sequence[tuple[float, float]] | None = None,
) -> list[Tensor]:
    """Celo2's elementwise part for tensors routed to the learned rule: updates their accumulators
    in place and returns the MLP output ``d`` of each (float32, work shape), before Newton–Schulz
    and the output normalisation (docs/reference/celo2.md#one-step, steps 1–4).

    ``finish`` gives each tensor a ``(scale, weight_decay)``: where either is nonzero the kernel
    also normalises ``d`` over the whole tensor and steps the parameter in place, ``p ← p −
    scale·d·rsqrt(1e-9 + mean(d²)) − weight_decay·p`` (kernel.c's FINISH). Right at any size, but
    one thread sums each tensor: the caller hands over tensors of at most :data:`CELO2_FINISH_MAX`
    elements that take no Newton–Schulz.

    ``params``, ``grads`` and the accumulators must be contiguous float32 (``m`` / ``rms`` may be
    bf16); ``indices`` are the tensors' positions in the step and ``iteration`` the updates done
    before it (together they key the stochastic rounding of bf16 state).
    """
    theta = {k: v.detach().unsqueeze(0) for k, v in module.state_dict().items()}
    nets = _celo2_nets(theta, iteration.reshape(1))
    shapes = [work_shape(p.shape) for p in params]
    # One allocation split into the tensors' outputs: with many small tensors an allocation and a
    # view per tensor cost more than the kernel's arithmetic on them (vectors need no view).
    sizes = [math.prod(s) for s in shapes]
    chunks = torch.empty(sum(sizes), dtype=torch.float32).split(sizes)
    directions = [d if len(shape) == 1 else d.view(shape) for d, shape in zip(chunks, shapes)]
    finish = finish if finish is not None else [(0.0, 0.0)] * len(params)
    jobs = [
        _Job(shape, module.layout, p, d, _dense_contiguous(g), acc, acc, float(scale), float(wd), index, normalisation_view(shape, module.layout))
        for p, g, acc, d, shape, index, (scale, wd) in zip(params, grads, accumulators, directions, shapes, indices, finish)
    ]
    _launch(kernel, module, nets, jobs)
    return directions


def particle_step(
    kernel: Kernel,
    module: LearnedOptimizerModule,
    theta: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    state: State,
    ctx: StepContext,
) -> tuple[list[Tensor], State]:
    """P stacked particles (leading axis everywhere, θ per particle); new tensors, inputs untouched."""
    iteration = state["iteration"]
    if isinstance(module, SmallFCLOpt):
        nets = _small_fc_nets(module, theta, iteration)
        new_state: State = {"iteration": iteration + 1}
    else:
        global_state = {k: v for k, v in state.items() if k != "tensors"}
        eta, scheduler_state = _vmapped_scheduler(theta, global_state, ctx)
        nets = _celo_nets(module, theta, eta, iteration)
        new_state = {"iteration": iteration + 1, **scheduler_state}
    params = [p.contiguous() for p in params]
    new_params = [torch.empty_like(p) for p in params]
    new_tensors = [{k: torch.empty_like(v) for k, v in acc.items()} for acc in state["tensors"]]
    jobs = [
        _Job(
            work_shape(p.shape[1:]),
            module.layout,
            p,
            out,
            g.to(torch.float32).contiguous(),
            {k: v.contiguous() for k, v in acc.items()},
            acc_out,
            float(scale),
            0.0,
            index,
        )
        for index, (p, out, g, acc, acc_out, scale) in enumerate(
            zip(params, new_params, grads, state["tensors"], new_tensors, ctx.scales)
        )
    ]
    _launch(kernel, module, nets, jobs)
    new_state["tensors"] = new_tensors
    return [out.reshape(p.shape) for out, p in zip(new_params, params)], new_state


def _vmapped_scheduler(theta: dict[str, Tensor], state: State, ctx: StepContext) -> tuple[Tensor, State]:
    """Celo's η and next scheduler state for every particle (the pure ``scheduler_step``, vmapped)."""
    scheduler_theta = {k: v for k, v in theta.items() if k.startswith("scheduler.")}

    def one(th: dict[str, Tensor], s: State, loss: Any, num_steps: Any) -> tuple[Tensor, State]:
        return celo.scheduler_step(th, s, StepContext([], loss, num_steps))

    num_steps = ctx.num_steps
    per_particle = isinstance(num_steps, Tensor) and num_steps.dim() == 1
    in_dims = (0, 0, 0 if ctx.loss is not None else None, 0 if per_particle else None)
    return torch.func.vmap(one, in_dims=in_dims)(scheduler_theta, state, ctx.loss, num_steps)
