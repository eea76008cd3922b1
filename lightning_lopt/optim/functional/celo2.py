"""Celo2 and Celo2Base: an RMS-normalised, optionally orthogonalised per-parameter MLP rule
(docs/reference/celo2.md#the-update-rule).

One update (docs/reference/celo2.md#one-step), per tensor routed to the learned rule:

1. replace NaN/±inf gradients (``nan_to_num``, as every rule of this library does) and clip every
   element to [−1000, 1000]. The JAX reference only clips, so one NaN element would turn the whole
   tensor into NaN through the normalisation statistics; for finite gradients the two agree exactly;
2. update the accumulators with the clipped gradient, no bias correction: momenta β = (0.9, 0.99,
   0.999), second moment 0.95, Adafactor (0.9, 0.99, 0.999) (§1.3);
3. the input features (§1.4): 30 channels for rank ≥ 2, the first 15 (groups 0–8) for vectors and
   scalars, with rsqrt(v + 1e-8);
4. each channel is normalised x ← x · rsqrt(1e-9 + mean(x²)) over the **matrix axes** (below), per
   slice of the other axes, then the 30→8→8→3 ReLU MLP gives d = channel 0 (§1.5);
5. Celo2 only, rank ≥ 2: d ← NS(d), Newton–Schulz per matrix slice (:mod:`.newton_schulz`);
6. u = d · rsqrt(1e-9 + mean(d²)) over the matrix axes, so that every matrix slice has RMS 1;
   where ``ctx.spectral[i]`` is a number c (``MuCelo2``'s hidden matrices, not in the reference),
   u ← c · u / ‖u‖_eff per matrix slice instead (:func:`spectral_normalize`);
7. p ← p − step_mult · s · u, with s = ``ctx.scales[i]``: the optimizer classes pass lr × μP scale
   with ``step_mult=1`` (the decoupled weight decay −lr·λ·p is theirs too, docs/reference/celo2.md#one-step);
   meta-training passes s = 1 and ``step_mult`` = η = 1e-3, the reference's constant inner lr.

**Matrix axes.** The reference is JAX and uses the *last two* axes of the JAX tensor. With
``layout="torch"`` (PyTorch ``[out, in]`` / ``OIHW`` tensors) the matrix of a Linear weight is the
whole tensor, and the matrix of a conv weight ``[out, in, kh, kw]`` is the ``(in, out)`` plane at
each spatial position ``(kh, kw)``: the JAX kernel ``HWIO``'s last two axes. Statistics and
Newton–Schulz therefore run over torch axes ``(1, 0)``, batched over axes 2... (a 3×3 conv is nine
orthogonalised ``in × out`` matrices, never ``out·in`` orthogonalised 3×3 ones;
docs/reference/celo2.md#checkpoints-and-layout trap
2). With ``layout="jax"`` the matrix is the last two axes. Vectors and scalars (reshaped to ``(1,)``)
use their one axis. The Adafactor axes follow the reference's size rule on the JAX view
(:mod:`.accumulators`), which matters for square matrices.

**The Adam branch** (docs/reference/celo2.md#the-adam-branch). Tensors whose state was created with ``adam=True`` (by
default: rank ≤ 1 when ``adam_1d``; the optimizer classes add embeddings) take an Adam step from the
raw (NaN-zeroed, unclipped) gradient with β = (0.9, 0.95), scaled by ``adam_lr_mult`` × step_mult × s:

- ``adam_mode="adamw"`` (test time, optax.adamw): bias-corrected moments, m̂ / (sqrt(v̂) + 1e-8);
- ``adam_mode="meta_training"`` (the authors' meta-training): no bias correction, m · rsqrt(v + 1e-8);
  the reference meta-trains with ``adam_lr_mult=20``.

θ (the ``state_dict`` of :class:`~lightning_lopt.optim.celo2_lopt.Celo2LOpt`): ``mlp.{0,1,2}.weight``
(``[out, in]``: [8, 30], [8, 8], [3, 8]; layer 0 is the reference's 14 ``w0__k`` blocks in order)
and biases; 347 numbers.

State: ``iteration`` (updates done, used by Adam's bias correction) and ``tensors``: per tensor the
accumulators of :mod:`.accumulators` (learned rule) or ``adam_m`` / ``adam_v`` (Adam branch).

Example::

    theta = dict(Celo2LOpt().state_dict())
    state = init_state(theta, params)
    params, state = step(theta, params, grads, state, StepContext([1e-3] * len(params), None, 0))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lopt.optim.functional.accumulators import (
    LAYOUTS,
    init_accumulators,
    jax_view_permutation,
    update_accumulators,
    work_shape,
)
from lightning_lopt.optim.functional.context import StepContext, check_lists
from lightning_lopt.optim.functional.features import adafactor_features
from lightning_lopt.optim.functional.mlp import layers_of, mlp_forward
from lightning_lopt.optim.functional.newton_schulz import newton_schulz

#: Channels of the feature groups w0__0 .. w0__13 (docs/reference/celo2.md#meta-parameters).
GROUP_CHANNELS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
NUM_INPUTS = 30
NUM_INPUTS_VECTOR = 15  # groups 0–8: vectors and scalars
HIDDEN_SIZE = 8
NUM_OUTPUTS = 3

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.95,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
GRAD_CLIP = 1000.0
FEATURE_EPS = 1e-8  # rsqrt(v + 1e-8)
NORMALIZER_EPS = 1e-9  # input and output second-moment normalisation

#: How ``MuCelo2`` sizes hidden matrices' steps: :func:`spectral_normalize` to :func:`spectral_target`,
#: or the RMS-1 direction times the μP scale (docs/celo2.md, "Spectral steps on hidden matrices").
HIDDEN_NORMS = ("spectral", "rms")

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
ADAM_MODES = ("adamw", "meta_training")
#: The Adam branch's learning-rate multiplier in the authors' meta-training (docs/reference/celo2.md#the-adam-branch).
META_TRAINING_ADAM_LR_MULT = 20.0
#: The constant inner learning rate of the authors' meta-training (docs/reference/celo2.md#meta-training).
META_TRAINING_STEP_MULT = 1e-3

State = dict[str, Any]


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def init_state(
    theta: dict[str, Tensor],
    params: Sequence[Tensor],
    *,
    layout: str = "torch",
    adam_1d: bool = True,
    adam: Sequence[bool] | None = None,
) -> State:
    """Zero state. ``adam[i]`` routes tensor i to the Adam branch; by default rank ≤ 1 tensors go
    there when ``adam_1d`` (Celo2) and none do otherwise (Celo2Base)."""
    _check_layout(layout)
    if adam is None:
        adam = [adam_1d and p.dim() <= 1 for p in params]
    if len(adam) != len(params):
        raise ValueError(f"adam must have one flag per tensor: {len(adam)} flags for {len(params)} tensors")
    device = theta["mlp.0.weight"].device
    tensors = []
    for p, to_adam in zip(params, adam):
        if to_adam:
            zeros = torch.zeros(work_shape(p.shape), dtype=p.dtype, device=p.device)
            tensors.append({"adam_m": zeros, "adam_v": zeros.clone()})
        else:
            tensors.append(init_accumulators(p, layout))
    return {"iteration": torch.zeros((), dtype=torch.int64, device=device), "tensors": tensors}


def matrix_axes(ndim: int, layout: str) -> tuple[int, ...]:
    """The axes of the work-shape tensor that form the reference's matrix (see module docstring).

    Ordered as the JAX matrix's (rows, columns): ``(1, 0)`` = (in, out) for a torch tensor of rank
    ≥ 2, ``(ndim-2, ndim-1)`` for a JAX one, ``(0,)`` for vectors.
    """
    if ndim < 2:
        return (0,)
    if layout == "torch":
        perm = jax_view_permutation(ndim)
        return (perm[-2], perm[-1])
    return (ndim - 2, ndim - 1)


def _normalize(x: Tensor, axes: tuple[int, ...]) -> Tensor:
    """x · rsqrt(1e-9 + mean(x²)) over ``axes`` (one statistic per slice of the other axes)."""
    return x * torch.rsqrt(NORMALIZER_EPS + (x * x).mean(dim=axes, keepdim=True))


def features(p: Tensor, g: Tensor, acc: dict[str, Tensor], fac_g: Tensor, *, layout: str) -> Tensor:
    """The 30 (rank ≥ 2) or 15 input channels, not normalised; ``acc`` holds updated accumulators."""
    m, rms = acc["m"], acc["rms"]
    gx = g.unsqueeze(-1)
    inv = torch.rsqrt(rms + FEATURE_EPS)
    groups = [gx, gx.clamp(-0.1, 0.1), p.unsqueeze(-1), m, rms, m * inv, inv, fac_g, gx * inv]
    if p.dim() >= 2:
        groups += adafactor_features(acc, m, layout=layout, nonfactored_mom_eps=0.0)
    return torch.cat(groups, dim=-1)


def orthogonalize(d: Tensor, layout: str) -> Tensor:
    """Newton–Schulz on every matrix slice of ``d`` (rank ≥ 2), in the JAX (rows, columns) order."""
    axes = matrix_axes(d.dim(), layout)
    moved = d.movedim(axes, (-2, -1))
    return newton_schulz(moved).movedim((-2, -1), axes)


def learned_direction(
    theta: dict[str, Tensor],
    p: Tensor,
    g: Tensor,
    acc: dict[str, Tensor],
    *,
    orthogonalize_matrices: bool,
    layout: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Steps 1–6 for one tensor in the work shape: ``(u, new_acc)`` with u of RMS 1 per matrix slice."""
    dtype = p.dtype
    decays = [torch.tensor(d, dtype=dtype, device=p.device) for d in (MOMENTUM_DECAYS, RMS_DECAYS, ADAFACTOR_DECAYS)]
    g = torch.nan_to_num(g.to(dtype)).clamp(-GRAD_CLIP, GRAD_CLIP)
    acc, fac_g = update_accumulators(acc, g, *decays, layout)
    axes = matrix_axes(p.dim(), layout)
    x = _normalize(features(p, g, acc, fac_g, layout=layout), axes)
    layers = layers_of(theta, "mlp", 3)
    if x.shape[-1] == NUM_INPUTS_VECTOR:
        (w0, b0), rest = layers[0], layers[1:]
        layers = [(w0[:, :NUM_INPUTS_VECTOR], b0), *rest]
    d = mlp_forward(x, layers)[..., 0]  # exp(0 · channel 1) = 1; channel 2 is unused (§1.6)
    return output_direction(d, orthogonalize_matrices=orthogonalize_matrices, layout=layout), acc


def output_direction(d: Tensor, *, orthogonalize_matrices: bool, layout: str) -> Tensor:
    """Steps 5–6 from the MLP output ``d`` (work shape): Newton–Schulz on every matrix slice (if
    ``orthogonalize_matrices`` and rank ≥ 2), then RMS 1 per matrix slice. The fused CPU step
    (:mod:`lightning_lopt.optim.fused.celo2_step`) runs it on the kernel's ``d``."""
    if orthogonalize_matrices and d.dim() >= 2:
        d = orthogonalize(d, layout)
    return _normalize(d, matrix_axes(d.dim(), layout))


def spectral_normalize(u: Tensor, target: float, layout: str) -> Tensor:
    """``target · u / ‖u‖_eff`` per matrix slice of ``u`` (rank ≥ 2), ``‖u‖_eff = ‖u uᵀ‖_F / ‖u‖_F``.

    ‖u‖_eff = sqrt(Σσ⁴ / Σσ²) over the singular values σ of the slice: its spectral norm when the
    non-zero σ are equal, as Newton–Schulz leaves them (to within its [0.7, 1.2] band), and a
    smooth, deterministic stand-in otherwise (it lies between the RMS and the largest σ). So the
    result's spectral norm is about ``target`` whatever the rank of u, which is what μP asks of a
    hidden matrix's step (docs/celo2.md, "MuCelo2: the μP scales"). The Gram matrix is taken on
    the smaller side (one batched matmul, a fifteenth of Newton–Schulz). A zero slice stays zero.

    Example::

        v = spectral_normalize(torch.randn(64, 32), 2.0, "torch")   # ‖v vᵀ‖_F / ‖v‖_F == 2
    """
    if u.dim() < 2:
        raise ValueError(f"spectral_normalize needs a tensor of rank >= 2, got shape {list(u.shape)}")
    axes = matrix_axes(u.dim(), layout)
    x = u.movedim(axes, (-2, -1))
    gram = x.mT @ x if x.shape[-2] > x.shape[-1] else x @ x.mT
    frobenius_sq = (x * x).sum(dim=(-2, -1), keepdim=True)
    gram_norm = torch.linalg.vector_norm(gram, dim=(-2, -1), keepdim=True)
    # target · u · ‖u‖_F / ‖u uᵀ‖_F; ‖u uᵀ‖_F ≥ ‖u‖_F² / min(m, n) > 0 unless the slice is zero
    factor = target * torch.sqrt(frobenius_sq) / torch.where(gram_norm > 0, gram_norm, torch.ones_like(gram_norm))
    return (x * factor).movedim((-2, -1), axes)


def spectral_target(shape: Sequence[int], scale: float) -> float:
    """The ``ctx.spectral`` entry of a hidden matrix of torch ``shape`` (``[fan_out, fan_in, ...]``)
    whose step is multiplied by the μP ``scale``: ``sqrt(max(fan_out, fan_in) / scale)``, so that
    the step's effective spectral norm is ``lr · sqrt(scale · max(fan_out, fan_in))`` (``MuCelo2``'s
    ``hidden_norm="spectral"``; docs/celo2.md, "Spectral steps on hidden matrices").

    Example::

        spectral_target((512, 512), 128 / 512)   # 45.25...: spectral norm lr · sqrt(128)
    """
    if len(shape) < 2:
        raise ValueError(f"spectral_target needs a matrix shape (rank >= 2), got {list(shape)}")
    if not scale > 0:
        raise ValueError(f"spectral_target needs a positive μP scale, got {scale!r}")
    return math.sqrt(max(shape[0], shape[1]) / scale)


def adam_direction(
    g: Tensor, acc: dict[str, Tensor], iteration: Tensor, *, adam_mode: str
) -> tuple[Tensor, dict[str, Tensor]]:
    """The Adam branch's direction for one tensor and its new moments (``iteration`` counts this update)."""
    b1, b2 = ADAM_BETAS
    g = torch.nan_to_num(g.to(acc["adam_m"].dtype))
    m = b1 * acc["adam_m"] + (1 - b1) * g
    v = b2 * acc["adam_v"] + (1 - b2) * g * g
    if adam_mode == "adamw":
        t = iteration.to(m.dtype)
        m_hat = m / (1 - torch.pow(torch.as_tensor(b1, dtype=m.dtype, device=m.device), t))
        v_hat = v / (1 - torch.pow(torch.as_tensor(b2, dtype=m.dtype, device=m.device), t))
        u = m_hat / (torch.sqrt(v_hat) + ADAM_EPS)
    else:
        u = m * torch.rsqrt(v + ADAM_EPS)
    return u, {"adam_m": m, "adam_v": v}


def step(
    theta: dict[str, Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    *,
    orthogonalize: bool = True,
    adam_mode: str = "adamw",
    adam_lr_mult: float = 1.0,
    step_mult: float = 1.0,
    layout: str = "torch",
) -> tuple[list[Tensor], State]:
    """One Celo2 (``orthogonalize=True``) or Celo2Base update; returns ``(new_params, new_state)``.

    ``ctx.scales[i]`` multiplies tensor i's step (learning rate × μP scale); ``ctx.spectral[i]``,
    where given, normalises a learned matrix direction by :func:`spectral_normalize`; the loss and
    the horizon are not used. Inputs are not mutated.
    """
    check_lists(params, grads, ctx)
    _check_layout(layout)
    if adam_mode not in ADAM_MODES:
        raise ValueError(f"adam_mode must be one of {ADAM_MODES}, got {adam_mode!r}")
    iteration = state["iteration"] + 1
    new_params: list[Tensor] = []
    new_tensors: list[dict[str, Tensor]] = []
    spectral = ctx.spectral if ctx.spectral is not None else [None] * len(params)
    for p, g, acc, scale, target in zip(params, grads, state["tensors"], ctx.scales, spectral):
        shape = work_shape(p.shape)
        p_w, g_w = p.reshape(shape), g.reshape(shape)
        if "adam_m" in acc:
            u, acc = adam_direction(g_w, acc, iteration, adam_mode=adam_mode)
            u = adam_lr_mult * u
        else:
            u, acc = learned_direction(theta, p_w, g_w, acc, orthogonalize_matrices=orthogonalize, layout=layout)
            if target is not None and u.dim() >= 2:
                u = spectral_normalize(u, target, layout)
        new_params.append((p_w - (step_mult * scale) * u).reshape(p.shape))
        new_tensors.append(acc)
    return new_params, {"iteration": iteration, "tensors": new_tensors}
