"""small_fc_lopt / μLO and Celo steps on shards of tensors split along axis 0 (FSDP2's ``Shard(0)``).

Every rule is element-wise except for a few means over a whole tensor. A rank holding rows
``[a, b)`` of each tensor computes the element-wise parts on its rows alone; the means are sums of
per-rank partial sums, added up across ranks by ``reduce`` (a sum over ranks of one flat tensor:
``dist.all_reduce`` in :mod:`lightning_lopt.optim.sharding`, the identity on one process). Shape
rules (the factored axes, the rank, the μP scale) use the *global* shape.

The cross-element reductions of one step, and where they run (``d0`` / ``d1``: the largest and the
second-largest axis of the global shape, docs/reference/small_fc.md#factored-axes-and-tensor-layout):

======================================  =====================  ===================================
reduction                               tensors                 needs the other shards when
======================================  =====================  ===================================
``v_row`` ← mean of g² over ``d0``      rank ≥ 2                ``d0`` is axis 0 (round 1)
``v_col`` ← mean of g² over ``d1``      rank ≥ 2                ``d1`` is axis 0 (round 1)
mean of ``v_row`` over ``d1``           rank ≥ 2                ``d1`` is axis 0 (round 1; ``v_row``
(the row preconditioner's normaliser)                           is then local, so it is known)
Celo: mean(p²), the step's param scale  all                     always (round 1)
feature normalisation: mean of x_c²     all                     always (round 2)
over the tensor, per channel c
======================================  =====================  ===================================

The feature normalisation reads features built from the *reduced* accumulators (``v_row``'s
rsqrt, ``m · row · col``, ``fac_g``), nonlinearly, so it cannot join round 1: a step makes two
reductions, each one flat tensor holding every tensor's partial sums. Accumulators reduced over
axis 0 (``v_row`` when ``d0`` = 0, ``v_col`` when ``d1`` = 0) are identical on every rank
(replicated); all others hold the rank's rows. Celo's scheduler (loss buffer, LSTM) reads only
the loss, which the optimizer averages over ranks, so it runs unchanged on every rank.

VeLO's per-tensor LSTM inputs (means and variances of ``m`` and ``rms``) would need a third
round; it is not implemented here.

Example::

    shards = [ShardSpec(tuple(global_shape), split=True) for global_shape in shapes]
    params, state = small_fc_step(theta, local_params, local_grads, state, ctx, shards, reduce)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_lopt.optim.functional import celo, small_fc
from lightning_lopt.optim.functional.accumulators import (
    ADAFACTOR_DECAYS,
    MOMENTUM_DECAYS,
    RMS_DECAYS,
    factored_dims,
    initial_decays,
    safe_rsqrt,
)
from lightning_lopt.optim.functional.context import StepContext, check_lists
from lightning_lopt.optim.functional.features import hyper_inputs, time_embedding
from lightning_lopt.optim.functional.mlp import layers_of, mlp_forward

State = dict[str, Any]
#: Sums a flat tensor over the ranks that hold the shards (returns the total; may work in place).
Reduce = Callable[[Tensor], Tensor]


class ShardSpec(NamedTuple):
    """Where a local block sits: ``shape`` is the global work shape, ``split`` whether axis 0 is
    divided among the ranks (``False``: the block is the whole tensor, nothing is reduced)."""

    shape: tuple[int, ...]
    split: bool


def identity(flat: Tensor) -> Tensor:
    """The ``reduce`` of a single process."""
    return flat


def accumulator_shapes(shard: ShardSpec, local_rows: int, layout: str = "torch") -> dict[str, tuple[tuple[int, ...], bool]]:
    """``{name: (local shape, keeps axis 0)}`` of one tensor's accumulators.

    An accumulator that keeps axis 0 holds this rank's rows; one reduced over axis 0 is replicated.
    """
    shape = shard.shape
    local = (local_rows, *shape[1:]) if shard.split else shape
    out = {"m": ((*local, len(MOMENTUM_DECAYS)), True), "rms": ((*local, len(RMS_DECAYS)), True)}
    dims = factored_dims(shape, layout)
    if dims is None:
        out["v"] = ((*local, len(ADAFACTOR_DECAYS)), True)
        return out
    d1, d0 = dims
    for name, axis in (("v_row", d0), ("v_col", d1)):
        kept = tuple(s for i, s in enumerate(local) if i != axis)
        out[name] = ((*kept, len(ADAFACTOR_DECAYS)), axis != 0)
    return out


def init_accumulators(shard: ShardSpec, local_rows: int, dtype: torch.dtype, device: torch.device, layout: str = "torch") -> dict[str, Tensor]:
    """Zero accumulators of one local block (the factored axes from the global shape)."""
    return {
        name: torch.zeros(shape, dtype=dtype, device=device)
        for name, (shape, _) in accumulator_shapes(shard, local_rows, layout).items()
    }


class _Sums:
    """Partial sums collected from every tensor, reduced across ranks in one call."""

    def __init__(self) -> None:
        self._parts: list[Tensor] = []

    def add(self, partial: Tensor) -> int:
        self._parts.append(partial)
        return len(self._parts) - 1

    def reduce(self, reduce: Reduce) -> list[Tensor]:
        if not self._parts:
            return []
        flat = reduce(torch.cat([p.reshape(-1) for p in self._parts]))
        sizes = [p.numel() for p in self._parts]
        return [t.reshape(p.shape) for t, p in zip(flat.split(sizes), self._parts)]


def _ema(old: Tensor, new: Tensor, decays: Tensor) -> Tensor:
    decay = torch.clamp(decays, 0.0, 1.0)
    return decay * old + (1 - decay) * new


class _Pending(NamedTuple):
    """One tensor between the reduction rounds."""

    p: Tensor
    g: Tensor
    acc: dict[str, Tensor]
    dims: tuple[int, int] | None
    row_stat: int | Tensor  # index of a pending sum, or the local mean of g² over d0
    col_stat: int | Tensor
    row_mean: int | None  # index of the pending sum of v_row over d1 (None: computed locally)
    p_sq: int | Tensor | None  # Celo: mean(p²) (index of a pending sum, or local)


def _accumulate(
    p: Tensor,
    g: Tensor,
    acc: dict[str, Tensor],
    shard: ShardSpec,
    decays: tuple[Tensor, Tensor, Tensor],
    layout: str,
    sums: _Sums,
    param_rms: bool,
) -> _Pending:
    """Round-1 work of one tensor: the element-wise accumulators and the partial sums to reduce."""
    momentum, rms, adafactor = decays
    gx = g.unsqueeze(-1)
    out = {"m": momentum * acc["m"] + (1 - momentum) * gx, "rms": _ema(acc["rms"], gx * gx, rms)}
    grad_sq = g * g + 1e-30
    dims = factored_dims(shard.shape, layout)
    row_stat: int | Tensor = 0
    col_stat: int | Tensor = 0
    row_mean = None
    if dims is None:
        out["v"] = _ema(acc["v"], grad_sq.unsqueeze(-1), adafactor)
    else:
        d1, d0 = dims
        row_stat = sums.add(grad_sq.sum(dim=0)) if shard.split and d0 == 0 else grad_sq.mean(dim=d0)
        col_stat = sums.add(grad_sq.sum(dim=0)) if shard.split and d1 == 0 else grad_sq.mean(dim=d1)
        if isinstance(row_stat, Tensor):
            out["v_row"] = _ema(acc["v_row"], row_stat.unsqueeze(-1), adafactor)
            if shard.split and d1 == 0:  # v_row keeps the split axis 0, its mean over it is global
                row_mean = sums.add(out["v_row"].sum(dim=0, keepdim=True))
    p_sq: int | Tensor | None = None
    if param_rms:
        p_sq = sums.add((p * p).sum()) if shard.split else (p * p).mean()
    return _Pending(p, g, {**acc, **out}, dims, row_stat, col_stat, row_mean, p_sq)


def _finish(pending: _Pending, shard: ShardSpec, adafactor: Tensor, totals: list[Tensor]) -> tuple[dict[str, Tensor], Tensor, Any]:
    """After round 1: the updated accumulators, ``fac_g`` and the factored ``(dims, row, col)``."""
    acc, dims, gx = dict(pending.acc), pending.dims, pending.g.unsqueeze(-1)
    if dims is None:
        return acc, gx * safe_rsqrt(acc["v"] + 1e-9), (None, None, None)
    d1, d0 = dims
    rows = shard.shape[0]
    if isinstance(pending.row_stat, int):
        acc["v_row"] = _ema(acc["v_row"], (totals[pending.row_stat] / rows).unsqueeze(-1), adafactor)
    if isinstance(pending.col_stat, int):
        acc["v_col"] = _ema(acc["v_col"], (totals[pending.col_stat] / rows).unsqueeze(-1), adafactor)
    else:
        acc["v_col"] = _ema(acc["v_col"], pending.col_stat.unsqueeze(-1), adafactor)
    reduced_d1 = d1 - 1 if d1 > d0 else d1  # index of d1 once d0 is gone from v_row
    if pending.row_mean is None:
        row_mean = acc["v_row"].mean(dim=reduced_d1, keepdim=True)
    else:
        row_mean = totals[pending.row_mean] / rows
    row = safe_rsqrt(acc["v_row"] / (row_mean + 1e-9)).unsqueeze(d0)
    col = safe_rsqrt(acc["v_col"]).unsqueeze(d1)
    return acc, gx * row * col, (dims, row, col)


def _normalised_forward(
    features: list[Tensor], shards: Sequence[ShardSpec], layers: Sequence[tuple[Tensor, Tensor]], reduce: Reduce
) -> list[Tensor]:
    """Round 2: every tensor's MLP output on its features normalised by their global second moments."""
    sums = _Sums()
    local: list[Tensor | int] = []
    for x, shard in zip(features, shards):
        axes = tuple(range(x.dim() - 1))
        local.append(sums.add((x * x).sum(dim=axes)) if shard.split else (x * x).mean(dim=axes))
    totals = sums.reduce(reduce)
    (w0, b0), rest = layers[0], layers[1:]
    outs = []
    for x, shard, moment in zip(features, shards, local):
        if isinstance(moment, int):
            moment = totals[moment] / math.prod(shard.shape)
        rsqrt = torch.rsqrt(1e-5 + moment)
        outs.append(mlp_forward(x, [(w0 * rsqrt.to(w0.dtype), b0), *rest]))
    return outs


def _work(params: Sequence[Tensor], grads: Sequence[Tensor], shards: Sequence[ShardSpec], clip: float | None) -> tuple[list[Tensor], list[Tensor]]:
    p_w, g_w = [], []
    for p, g, shard in zip(params, grads, shards):
        shape = (p.shape[0], *shard.shape[1:]) if shard.split else shard.shape
        g = torch.nan_to_num(g.reshape(shape).to(p.dtype))
        p_w.append(p.reshape(shape))
        g_w.append(g if clip is None else g.clamp(-clip, clip))
    return p_w, g_w


def small_fc_step(
    theta: dict[str, Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    shards: Sequence[ShardSpec],
    reduce: Reduce = identity,
    *,
    step_mult: float = 0.01,
    exp_mult: float = 1e-3,
    layout: str = "torch",
) -> tuple[list[Tensor], State]:
    """:func:`~lightning_lopt.optim.functional.small_fc.step` on local blocks (two ``reduce`` calls)."""
    check_lists(params, grads, ctx)
    decays = (
        small_fc.decays_from_offsets(theta["momentum_decays"], MOMENTUM_DECAYS),
        small_fc.decays_from_offsets(theta["rms_decays"], RMS_DECAYS),
        small_fc.decays_from_offsets(theta["adafactor_decays"], ADAFACTOR_DECAYS),
    )
    layers = layers_of(theta, "mlp", small_fc.NUM_LAYERS)
    iteration = state["iteration"]
    (w0, b0), hidden = layers[0], layers[1:]
    nf = small_fc.NUM_TENSOR_FEATURES
    b0_time = b0 + w0[:, nf:] @ time_embedding(iteration, w0.dtype)

    p_w, g_w = _work(params, grads, shards, None)
    sums = _Sums()
    pending = [
        _accumulate(p, g, acc, shard, decays, layout, sums, param_rms=False)
        for p, g, acc, shard in zip(p_w, g_w, state["tensors"], shards)
    ]
    totals = sums.reduce(reduce)
    finished = [_finish(item, shard, decays[2], totals) for item, shard in zip(pending, shards)]
    features = [
        small_fc.tensor_features(item.p, item.g, acc, fac_g, layout=layout, factored=factored)
        for item, (acc, fac_g, factored) in zip(pending, finished)
    ]
    outs = _normalised_forward(features, shards, [(w0[:, :nf], b0_time), *hidden], reduce)
    new_params = []
    for p, p_local, out, scale in zip(p_w, params, outs, ctx.scales):
        delta = step_mult * out[..., 0] * torch.exp(exp_mult * out[..., 1]) * scale
        new_params.append((p - delta).reshape(p_local.shape))
    return new_params, {"iteration": iteration + 1, "tensors": [acc for acc, _, _ in finished]}


def celo_step(
    theta: dict[str, Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    shards: Sequence[ShardSpec],
    reduce: Reduce = identity,
    *,
    train_phase: int = 2,
    layout: str = "torch",
) -> tuple[list[Tensor], State]:
    """:func:`~lightning_lopt.optim.functional.celo.step` on local blocks (two ``reduce`` calls).

    ``ctx.loss`` must be the same on every rank (the optimizer averages it).
    """
    check_lists(params, grads, ctx)
    if train_phase not in (1, 2):
        raise ValueError(f"train_phase must be 1 or 2, got {train_phase}")
    eta, scheduler_state = celo.scheduler_step(theta, state, ctx)
    lr = eta if train_phase == 2 else 1.0
    decays = initial_decays(eta.dtype, eta.device)
    p_w, g_w = _work(params, grads, shards, celo.GRAD_CLIP)
    sums = _Sums()
    pending = [
        _accumulate(p, g, acc, shard, decays, layout, sums, param_rms=True)
        for p, g, acc, shard in zip(p_w, g_w, state["tensors"], shards)
    ]
    totals = sums.reduce(reduce)
    finished = [_finish(item, shard, decays[2], totals) for item, shard in zip(pending, shards)]
    features = [
        hyper_inputs(item.p, item.g, acc, fac_g, layout=layout, factored=factored)
        for item, (acc, fac_g, factored) in zip(pending, finished)
    ]
    outs = _normalised_forward(features, shards, layers_of(theta, "mlp", 3), reduce)
    new_params = []
    for item, shard, p_local, out, scale in zip(pending, shards, params, outs, ctx.scales):
        p_sq = item.p_sq if isinstance(item.p_sq, Tensor) else totals[item.p_sq] / math.prod(shard.shape)
        param_scale = torch.sqrt(p_sq + 1e-9)
        delta = lr * celo.STEP_MULT * out[..., 0] * torch.exp(celo.EXP_MULT * out[..., 1]) * param_scale
        new_params.append((item.p - delta * scale).reshape(p_local.shape))
    next_state = {"iteration": state["iteration"] + 1, **scheduler_state, "tensors": [acc for acc, _, _ in finished]}
    return new_params, next_state


__all__ = ["Reduce", "ShardSpec", "accumulator_shapes", "celo_step", "identity", "init_accumulators", "small_fc_step"]
