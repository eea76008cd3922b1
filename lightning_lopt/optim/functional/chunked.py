"""The small_fc_lopt / μLO and Celo steps evaluated in chunks, in place: bounded scratch memory.

The pure steps (:mod:`.small_fc`, :mod:`.celo`) build every MLP input of a tensor at once: a
``[*shape, 28]`` (or 30) feature tensor and ``[*shape, 32]`` hidden activations, 30x the
parameter's bytes for a 51M-element embedding. This module computes the *same function* in three
passes over slices along the tensor's first axis, the way the fused kernels do:

1. factored tensors: the row / column means of g² + 1e-30 (summed chunk by chunk) and the new
   ``v_row`` / ``v_col``;
2. per chunk: the new ``m``, ``rms`` (and ``v`` of vectors), written to the state in place, and the
   sum of every input channel squared;
3. per chunk: the inputs again (from the new accumulators), normalised with those sums, the MLP,
   and ``p ← p − Δ − weight_decay · p`` in place.

Scratch memory is one chunk's features and activations (``chunk_bytes`` bounds a chunk's feature
tensor; a chunk is at least one slice along the first axis) plus the factored statistics. The
pure steps stay the reference: the tests hold this evaluation to them within float32 rounding.
The optimizers use it on CUDA where the Triton step does not run (``fused=False``, no Triton).
float32 parameters and state only (the optimizers widen bf16 parameters into a float32 copy).

Example::

    chunked.step_in_place(lopt, params, grads, state, ctx, [0.0] * len(params), chunk_bytes=1 << 24)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lopt.optim.functional import celo, small_fc
from lightning_lopt.optim.functional.accumulators import (
    ADAFACTOR_DECAYS,
    MOMENTUM_DECAYS,
    RMS_DECAYS,
    factored_dims,
    factored_scalings,
    initial_decays,
    safe_rsqrt,
    work_shape,
)
from lightning_lopt.optim.functional.context import StepContext, check_lists
from lightning_lopt.optim.functional.features import time_embedding
from lightning_lopt.optim.functional.mlp import layers_of, mlp_forward

State = dict[str, Any]
#: Default bound on one chunk's feature tensor (bytes).
CHUNK_BYTES = 16 << 20


def _chunks(shape: tuple[int, ...], n_channels: int, element_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, length) slices along axis 0 whose feature tensors stay within ``chunk_bytes``."""
    row = math.prod(shape[1:]) * n_channels * element_bytes
    rows = max(1, chunk_bytes // max(row, 1))
    for start in range(0, shape[0], rows):
        yield start, min(rows, shape[0] - start)


def _ema_(old: Tensor, new: Tensor, decays: Tensor) -> None:
    """accumulators._ema in place."""
    decay = torch.clamp(decays, 0.0, 1.0)
    old.mul_(decay).add_((1 - decay) * new)


class _Tensor:
    """One tensor's views: full-shape broadcasts of the factored statistics, sliced per chunk."""

    def __init__(self, p: Tensor, g: Tensor, acc: dict[str, Tensor], layout: str, clip: float | None) -> None:
        self.shape = work_shape(p.shape)
        self.p, self.g, self.acc, self.clip = p.reshape(self.shape), g.reshape(self.shape), acc, clip
        self.dims = factored_dims(self.shape, layout)

    def grad(self, s: int, n: int) -> Tensor:
        g = torch.nan_to_num(self.g.narrow(0, s, n).to(self.p.dtype))
        return g.clamp(-self.clip, self.clip) if self.clip is not None else g

    def update_factored(self, adafactor: Tensor, chunk: Iterator[tuple[int, int]]) -> None:
        """Pass 1: v_row / v_col from the chunk-wise means of g² + 1e-30 (in place)."""
        d1, d0 = self.dims
        sums: dict[int, list[Tensor]] = {d0: [], d1: []}
        for s, n in chunk:
            grad_sq = self.grad(s, n) ** 2 + 1e-30
            for d in (d0, d1):
                sums[d].append(grad_sq.sum(dim=d))
        means = {}
        for d, parts in sums.items():
            # Axis 0 reduced: the chunks' sums add up; otherwise they tile axis 0 of the result.
            total = torch.stack(parts).sum(0) if d == 0 else torch.cat(parts, dim=0)
            means[d] = total / self.shape[d]
        _ema_(self.acc["v_row"], means[d0].unsqueeze(-1), adafactor)
        _ema_(self.acc["v_col"], means[d1].unsqueeze(-1), adafactor)
        row, col = factored_scalings(self.acc["v_row"], self.acc["v_col"], self.dims)
        full = (*self.shape, len(ADAFACTOR_DECAYS))
        self.row_factor, self.col_factor = row.expand(full), col.expand(full)
        self.v_row_full = self.acc["v_row"].unsqueeze(d0).expand(full)
        self.v_col_full = self.acc["v_col"].unsqueeze(d1).expand(full)

    def update_elementwise(self, s: int, n: int, momentum: Tensor, rms: Tensor, adafactor: Tensor) -> None:
        """Pass 2: m, rms (and v of vectors) of this chunk, in place."""
        gx = self.grad(s, n).unsqueeze(-1)
        m = self.acc["m"].narrow(0, s, n)
        m.mul_(momentum).add_((1 - momentum) * gx)
        _ema_(self.acc["rms"].narrow(0, s, n), gx * gx, rms)
        if self.dims is None:
            _ema_(self.acc["v"].narrow(0, s, n), gx * gx + 1e-30, adafactor)

    def features(self, s: int, n: int, is_celo: bool) -> Tensor:
        """The MLP inputs of this chunk, from the updated accumulators (small_fc: 28, Celo: 30)."""
        g, p = self.grad(s, n), self.p.narrow(0, s, n)
        gx = g.unsqueeze(-1)
        m, v = self.acc["m"].narrow(0, s, n), self.acc["rms"].narrow(0, s, n)
        rsqrt = torch.rsqrt(v + 1e-6)
        if self.dims is None:
            va = self.acc["v"].narrow(0, s, n)
            fac_g = gx * safe_rsqrt(va + 1e-9)
            inv = torch.rsqrt(va + 1e-8)
            adafactor = [va, va, inv, inv, m * (va + (0.0 if is_celo else 1e-6)) ** -0.5]
        else:
            row, col = self.row_factor.narrow(0, s, n), self.col_factor.narrow(0, s, n)
            fac_g = gx * row * col
            v_row, v_col = self.v_row_full.narrow(0, s, n), self.v_col_full.narrow(0, s, n)
            adafactor = [v_row, v_col, torch.rsqrt(v_row + 1e-8), torch.rsqrt(v_col + 1e-8), m * row * col]
        if is_celo:
            groups = [gx, gx.clamp(-0.1, 0.1), p.unsqueeze(-1), m, v, m * rsqrt, rsqrt, fac_g, gx * rsqrt, *adafactor]
        else:
            groups = [gx, p.unsqueeze(-1), m, v, m * rsqrt, rsqrt, fac_g, *adafactor]
        return torch.cat(groups, dim=-1)


def step_in_place(
    module: Any,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    weight_decays: Sequence[float],
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """One small_fc_lopt / μLO or Celo step of ``module`` (a :class:`SmallFCLOpt` / :class:`CeloLOpt`)
    on float32 ``params`` and state, all written in place (the global state too).

    Computes what ``module.step`` returns, with ``p ← step(p) − weight_decay · p`` (the optimizers'
    decoupled decay on the pre-update p).
    """
    check_lists(params, grads, ctx)
    theta = {k: v.detach() for k, v in module.state_dict().items()}
    is_celo = module.functional is celo
    layers = layers_of(theta, "mlp", 3)
    iteration = state["iteration"]
    if is_celo:
        eta, scheduler_state = celo.scheduler_step(theta, state, ctx)
        lr = (eta if module.train_phase == 2 else 1.0) * celo.STEP_MULT
        momentum, rms, adafactor = initial_decays(eta.dtype, eta.device)
        exp_mult, new_global, n_channels = celo.EXP_MULT, {**scheduler_state}, celo.NUM_INPUTS
        clip = celo.GRAD_CLIP
    else:
        momentum = small_fc.decays_from_offsets(theta["momentum_decays"], MOMENTUM_DECAYS)
        rms = small_fc.decays_from_offsets(theta["rms_decays"], RMS_DECAYS)
        adafactor = small_fc.decays_from_offsets(theta["adafactor_decays"], ADAFACTOR_DECAYS)
        (w0, b0), hidden = layers[0], layers[1:]
        nf = small_fc.NUM_TENSOR_FEATURES
        layers = [(w0[:, :nf], b0 + w0[:, nf:] @ time_embedding(iteration, w0.dtype)), *hidden]
        lr, exp_mult, new_global, n_channels = module.step_mult, module.exp_mult, {}, nf
        clip = None

    for p, g, acc, scale, wd in zip(params, grads, state["tensors"], ctx.scales, weight_decays):
        if p.numel() == 0:
            continue
        t = _Tensor(p, g, acc, module.layout, clip)
        chunks = list(_chunks(t.shape, n_channels, p.element_size(), chunk_bytes))
        if t.dims is not None:
            t.update_factored(adafactor, iter(chunks))
        sq = torch.zeros(n_channels, dtype=p.dtype, device=p.device)
        for s, n in chunks:
            t.update_elementwise(s, n, momentum, rms, adafactor)
            x = t.features(s, n, is_celo)
            sq += (x * x).reshape(-1, n_channels).sum(0)
        count = math.prod(t.shape)
        (w0, b0), rest = layers[0], layers[1:]
        normalised = [(w0 * torch.rsqrt(1e-5 + sq / count).to(w0.dtype), b0), *rest]
        # Celo scales the step by the tensor's RMS: p is its input channel 2.
        step_scale = lr * torch.sqrt(sq[2] / count + 1e-9) if is_celo else lr
        for s, n in chunks:
            out = mlp_forward(t.features(s, n, is_celo), normalised)
            delta = step_scale * out[..., 0] * torch.exp(exp_mult * out[..., 1]) * scale
            p_chunk = t.p.narrow(0, s, n)
            p_chunk.copy_(p_chunk - delta - wd * p_chunk if wd else p_chunk - delta)
    for key, value in {"iteration": iteration + 1, **new_global}.items():
        state[key].copy_(value)


__all__ = ["CHUNK_BYTES", "step_in_place"]
