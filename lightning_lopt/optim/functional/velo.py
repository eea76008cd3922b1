"""VeLO and μVeLO: a per-tensor LSTM that writes the weights of a per-parameter MLP (docs/reference/velo.md).

One update:

1. add the raw loss to the loss buffer (skipped if not finite, as in Celo) and compute its features;
2. replace NaN/±inf gradients (nan_to_num, as small_fc_lopt does) and clip every element to
   [−1000, 1000]. The JAX reference only clips, so one NaN element would turn the whole tensor and
   its accumulators into NaN; for finite gradients the two agree exactly;
3. per tensor, 30 LSTM inputs from the tensor and the **previous** step's m and rms, all scaled by
   1/RMS(p): progress (9), loss features (9), then, in the reference's sorted-key order, mean_rms
   (1), rank one-hot (5), var_m (3), var_rms (3). Each statistic goes through
   0.5·clip(log(1e-8 + |10·x|), −5, 5). var_rms subtracts mean_m, which broadcasts it to 3 values:
   a quirk of the reference kept here
   (docs/reference/velo.md#lstm-inputs: a description of the design lists 28 inputs; the code has 30);
4. the mixed-input Haiku LSTM (one state per tensor) gives controls c ∈ R^K and lr_mult (no
   nonlinearity);
5. the tensor's MLP weights are interp_mult · mean_k(c_k · W_k) over the bank of K MLPs (30→4→4→3),
   applied to the 30 per-parameter inputs built from the *updated* accumulators;
6. p ← p − 1e-3 · lr_mult · d · exp(1e-3 · a) · [sqrt(mean(p²) + 1e-9) if param_scale_mult] · s_p.

VeLO: interp_mult 100, param_scale_mult on, s_p = 1. μVeLO: interp_mult 1, param_scale_mult off,
s_p = ``ctx.scales[i]`` (docs/reference/velo.md#muvelo).

θ (the ``state_dict`` of :class:`~lightning_lopt.optim.architectures.VeLOLOpt`): the scheduler
entries (``scheduler.``, with ``controls``) and the bank ``bank.{0,1,2}.weight`` ``[K, out, in]`` /
``.bias`` ``[K, out]``. The reference's dead first mixing Linear is not part of θ.

State: ``iteration`` and the loss buffer (global), and per tensor the accumulators plus the tensor's
LSTM state ``lstm_hidden`` / ``lstm_cell`` (``[H]``).

Example::

    state = init_state(theta, params)
    params, state = step(theta, params, grads, state, StepContext(scales, loss, 1000))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lopt.optim.functional import loss_buffer
from lightning_lopt.optim.functional.accumulators import (
    init_accumulators,
    initial_decays,
    update_accumulators,
    work_shape,
)
from lightning_lopt.optim.functional.context import StepContext, check_lists
from lightning_lopt.optim.functional.features import hyper_inputs, progress_embedding
from lightning_lopt.optim.functional.mlp import normalized_mlp_forward
from lightning_lopt.optim.functional.scheduler import head, lstm_forward

NUM_INPUTS = 30
NUM_LSTM_INPUTS = 30
MAX_RANK = 5
STEP_MULT = 1e-3
EXP_MULT = 1e-3
GRAD_CLIP = 1000.0

State = dict[str, Any]


def init_state(theta: dict[str, Tensor], params: Sequence[Tensor], *, layout: str = "torch") -> State:
    """Zero accumulators, an empty loss buffer and θ's learned initial LSTM state for every tensor."""
    hidden, cell = theta["scheduler.init_hidden"], theta["scheduler.init_cell"]
    tensors = []
    for p in params:
        acc = init_accumulators(p, layout)
        tensors.append({**acc, "lstm_hidden": hidden.detach().clone(), "lstm_cell": cell.detach().clone()})
    return {
        "iteration": torch.zeros((), dtype=torch.int64, device=hidden.device),
        **loss_buffer.init(hidden.dtype, hidden.device),
        "tensors": tensors,
    }


def _clip_log_abs(x: Tensor) -> Tensor:
    return 0.5 * torch.clamp(torch.log(1e-8 + (10.0 * x).abs()), -5.0, 5.0)


def lstm_inputs(p: Tensor, m: Tensor, rms: Tensor, progress: Tensor, loss_features: Tensor) -> Tensor:
    """The 30 per-tensor LSTM inputs (step 3 above) from work-shape ``p`` and previous ``m``/``rms``."""
    norm = torch.rsqrt(torch.clamp((p * p).mean(), min=1e-9))
    m, rms = m * norm, rms * norm
    axes = tuple(range(p.dim()))
    mean_m = m.mean(dim=axes, keepdim=True)
    var_m = ((m - mean_m) ** 2).mean(dim=axes)
    mean_rms = rms.mean(dim=axes)
    var_rms = ((rms - mean_m) ** 2).mean(dim=axes)  # sic: mean_m (see module docstring)
    # One-hot of the number of axes longer than 1: a constant, since shapes are static under vmap.
    # Like jax.nn.one_hot, a rank of MAX_RANK or more (e.g. a Conv3d kernel) gives all zeros.
    n_axes = sum(size > 1 for size in p.shape)
    rank = (torch.arange(MAX_RANK, device=p.device) == n_axes).to(p.dtype)
    parts = [progress, loss_features, _clip_log_abs(mean_rms), rank, _clip_log_abs(var_m)]
    return torch.cat([*parts, _clip_log_abs(var_rms)])


def step(
    theta: dict[str, Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    *,
    interp_mult: float = 100.0,
    param_scale_mult: bool = True,
    layout: str = "torch",
) -> tuple[list[Tensor], State]:
    """One VeLO / μVeLO update; returns ``(new_params, new_state)`` without mutating inputs."""
    check_lists(params, grads, ctx)
    finite, buffer, loss_features = loss_buffer.observe(state, ctx, "VeLO")
    dtype = state["loss_means"].dtype
    iteration = state["iteration"]
    progress = progress_embedding(iteration, ctx.num_steps, dtype)

    shapes = [work_shape(p.shape) for p in params]
    p_w = [p.reshape(s) for p, s in zip(params, shapes)]
    g_w = [torch.nan_to_num(g.reshape(s).to(p.dtype)).clamp(-GRAD_CLIP, GRAD_CLIP) for g, p, s in zip(grads, params, shapes)]
    old = state["tensors"]
    x = torch.stack([lstm_inputs(p, a["m"], a["rms"], progress, loss_features) for p, a in zip(p_w, old)])
    hidden, cell = lstm_forward(
        theta,
        "scheduler.",
        x,
        torch.stack([a["lstm_hidden"] for a in old]),
        torch.stack([a["lstm_cell"] for a in old]),
    )
    controls = head(theta, "scheduler.controls", hidden)
    lr_mult = head(theta, "scheduler.step_size", hidden)[:, 0]

    momentum, rms, adafactor = initial_decays(dtype, iteration.device)  # fixed (docs/reference/velo.md#configuration)
    new_params: list[Tensor] = []
    new_tensors: list[dict[str, Tensor]] = []
    for i, (p, g, acc, scale) in enumerate(zip(p_w, g_w, old, ctx.scales)):
        new_acc, fac_g = update_accumulators(
            {k: acc[k] for k in acc if not k.startswith("lstm_")}, g, momentum, rms, adafactor, layout
        )
        layers = [
            tuple(
                _interpolate(theta[f"bank.{k}.{part}"], controls[i], interp_mult)
                for part in ("weight", "bias")
            )
            for k in range(3)
        ]
        out = normalized_mlp_forward(hyper_inputs(p, g, new_acc, fac_g, layout=layout), layers)
        delta = STEP_MULT * lr_mult[i] * out[..., 0] * torch.exp(EXP_MULT * out[..., 1])
        if param_scale_mult:
            delta = delta * torch.sqrt((p * p).mean() + 1e-9)
        new_params.append((p - delta * scale).reshape(params[i].shape))
        new_tensors.append(
            {
                **new_acc,
                "lstm_hidden": torch.where(finite, hidden[i], acc["lstm_hidden"]),
                "lstm_cell": torch.where(finite, cell[i], acc["lstm_cell"]),
            }
        )
    return new_params, {"iteration": iteration + 1, **buffer, "tensors": new_tensors}


def _interpolate(bank: Tensor, controls: Tensor, interp_mult: float) -> Tensor:
    """interp_mult · mean_k(c_k · W_k) for a bank ``[K, ...]`` and controls ``[K]``."""
    weighted = controls.reshape(-1, *([1] * (bank.dim() - 1))) * bank
    return interp_mult * weighted.mean(dim=0)
