"""Gradient accumulators shared by small_fc_lopt, Celo and VeLO (docs/reference/small_fc.md#accumulators,
docs/reference/small_fc.md#factored-axes-and-tensor-layout, docs/reference/celo.md#per-parameter-features).

Every accumulator keeps its decays on a trailing axis (the reference vmaps them with
``out_axes=-1``). No bias correction is applied anywhere. All functions are pure and work under
``torch.func.vmap``.

Tensor layout. The factored statistics are asymmetric (only the row statistic is mean-normalised),
and the reference picks the factored axes by *size* with a stable argsort, so on a tie (square
matrices, the hidden layers of every μMLP) the result depends on the memory layout. The reference
is JAX: Linear kernels are ``[in, out]`` and conv kernels ``HWIO``; PyTorch stores ``[out, in]`` and
``OIHW``. With ``layout="torch"`` we choose the axes exactly as the reference would on the JAX view
of the tensor (docs/reference/small_fc.md#factored-axes-and-tensor-layout,
docs/reference/celo.md#per-parameter-features) and map them back to PyTorch axes. This is
mathematically the same as transposing to the JAX view, computing there and transposing back,
because every other statistic is equivariant under axis permutations, but it costs no copy. The JAX
view of a PyTorch tensor of rank r ≥ 2 is ``permute(2, ..., r-1, 1, 0)``: spatial axes first, then
``in``, then ``out`` (``[out, in] -> [in, out]``, ``OIHW -> HWIO``, Conv1d ``[out, in, k] -> [k, in,
out]``). ``layout="jax"`` takes tensors that are already in the JAX layout (used to check against
the reference's own numbers).

Example::

    acc = init_accumulators(w)
    acc, fac_g = update_accumulators(acc, g, *initial_decays(w.dtype, w.device))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LAYOUTS = ("torch", "jax")

# The decays every architecture starts from (docs/reference/small_fc.md#hyper-parameters,
# docs/reference/celo.md#configuration). small_fc_lopt
# meta-learns offsets from them; Celo and VeLO use them as constants.
MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)


def work_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape the rules compute on: scalars become ``(1,)`` (docs/reference/small_fc.md#scalars)."""
    return tuple(shape) if len(shape) > 0 else (1,)


def jax_view_permutation(ndim: int) -> tuple[int, ...]:
    """Axes of a PyTorch tensor in the order of the equivalent JAX tensor (see module docstring)."""
    if ndim < 2:
        return tuple(range(ndim))
    return (*range(2, ndim), 1, 0)


def factored_dims(shape: Sequence[int], layout: str = "torch") -> tuple[int, int] | None:
    """``(d1, d0)``: the second-largest and the largest axis, or ``None`` below rank 2.

    The reference takes ``numpy.argsort(shape)[-2:]`` on the JAX-layout shape; numpy's sort is
    stable for so few elements, so on a tie the *later* JAX axis counts as larger
    (docs/reference/small_fc.md#factored-axes-and-tensor-layout).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if len(shape) < 2:
        return None
    perm = jax_view_permutation(len(shape)) if layout == "torch" else tuple(range(len(shape)))
    jax_shape = [shape[axis] for axis in perm]
    order = sorted(range(len(jax_shape)), key=jax_shape.__getitem__)  # stable, like numpy here
    return perm[order[-2]], perm[order[-1]]


def initial_decays(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The momentum, rms and Adafactor decays as tensors."""
    kw = {"dtype": dtype, "device": device}
    return (
        torch.tensor(MOMENTUM_DECAYS, **kw),
        torch.tensor(RMS_DECAYS, **kw),
        torch.tensor(ADAFACTOR_DECAYS, **kw),
    )


def init_accumulators(p: Tensor, layout: str = "torch") -> dict[str, Tensor]:
    """Zero accumulators for one tensor: ``m [*, 3]``, ``rms [*, 1]`` and ``v_row``/``v_col``
    (the shape without d0 / d1, then 3) or, below rank 2, ``v [*, 3]``; ``*`` is the work shape."""
    shape = work_shape(p.shape)
    kw = {"dtype": p.dtype, "device": p.device}
    n_fac = len(ADAFACTOR_DECAYS)
    acc = {
        "m": torch.zeros(*shape, len(MOMENTUM_DECAYS), **kw),
        "rms": torch.zeros(*shape, len(RMS_DECAYS), **kw),
    }
    dims = factored_dims(shape, layout)
    if dims is None:
        acc["v"] = torch.zeros(*shape, n_fac, **kw)
    else:
        d1, d0 = dims
        acc["v_row"] = torch.zeros(*_drop(shape, d0), n_fac, **kw)
        acc["v_col"] = torch.zeros(*_drop(shape, d1), n_fac, **kw)
    return acc


def _drop(shape: Sequence[int], axis: int) -> tuple[int, ...]:
    return tuple(s for i, s in enumerate(shape) if i != axis)


def safe_rsqrt(x: Tensor) -> Tensor:
    """``rsqrt(max(x, 1e-9))`` (the reference's ``safe_rsqrt``)."""
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def factored_scalings(v_row: Tensor, v_col: Tensor, dims: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Row and column preconditioners, already unsqueezed to broadcast against ``g[..., None]``.

    row = rsqrt(max(v_row / (mean of v_row over d1 + 1e-9), 1e-9)), col = rsqrt(max(v_col, 1e-9))
    (docs/reference/small_fc.md#accumulators). Only the row statistic is mean-normalised.
    """
    d1, d0 = dims
    reduced_d1 = d1 - 1 if d1 > d0 else d1  # index of d1 once d0 is gone from v_row
    row_mean = v_row.mean(dim=reduced_d1, keepdim=True)
    row = safe_rsqrt(v_row / (row_mean + 1e-9))
    col = safe_rsqrt(v_col)
    return row.unsqueeze(d0), col.unsqueeze(d1)


def update_accumulators(
    acc: dict[str, Tensor],
    g: Tensor,
    momentum_decays: Tensor,
    rms_decays: Tensor,
    adafactor_decays: Tensor,
    layout: str = "torch",
) -> tuple[dict[str, Tensor], Tensor]:
    """One accumulator update with gradient ``g`` (in the work shape); returns ``(acc, fac_g)``.

    - momentum: m ← β·m + (1−β)·g, β *not* clipped;
    - rms: v ← β̄·v + (1−β̄)·g², β̄ = clip(β, 0, 1);
    - adafactor with G = g² + 1e-30 and γ̄ = clip(γ, 0, 1): factored row/column means over d0/d1,
      or the full second moment below rank 2; ``fac_g`` is g preconditioned by them
      (docs/reference/small_fc.md#accumulators).
    """
    gx = g.unsqueeze(-1)
    out = {
        "m": momentum_decays * acc["m"] + (1 - momentum_decays) * gx,
        "rms": _ema(acc["rms"], gx * gx, rms_decays),
    }
    grad_sq = g * g + 1e-30
    dims = factored_dims(g.shape, layout)
    if dims is None:
        v = _ema(acc["v"], grad_sq.unsqueeze(-1), adafactor_decays)
        out["v"] = v
        fac_g = gx * safe_rsqrt(v + 1e-9)
    else:
        d1, d0 = dims
        out["v_row"] = _ema(acc["v_row"], grad_sq.mean(dim=d0).unsqueeze(-1), adafactor_decays)
        out["v_col"] = _ema(acc["v_col"], grad_sq.mean(dim=d1).unsqueeze(-1), adafactor_decays)
        row, col = factored_scalings(out["v_row"], out["v_col"], dims)
        fac_g = gx * row * col
    return out, fac_g


def _ema(old: Tensor, new: Tensor, decays: Tensor) -> Tensor:
    """The clipped-decay moving average used by the rms and adafactor accumulators."""
    decay = torch.clamp(decays, 0.0, 1.0)
    return decay * old + (1 - decay) * new
