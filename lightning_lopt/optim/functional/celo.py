"""Celo: a per-parameter MLP update rule scaled by a learned LSTM scheduler (docs/reference/celo.md).

Order of one update (docs/reference/celo.md#one-update):

1. add the raw loss to the loss buffer and compute its 9 features (skipped if the loss is not
   finite, see below);
2. replace NaN/±inf gradients (nan_to_num, as small_fc_lopt does) and clip every element to
   [−1000, 1000]. The JAX reference only clips, so one NaN element would turn the whole tensor and
   its accumulators into NaN; for finite gradients the two agree exactly;
3. scheduler input x = [tanh(10·(s − c)) for 9 centres c, the 9 loss features], s = iteration / T;
4. one Haiku LSTM step gives o and η = 0.1·exp(o) (the same for every tensor, so one state is kept);
5. update the accumulators with the clipped gradient, build the 30 MLP inputs, run 30→4→4→3;
6. p ← p − η · 1e-3 · d · exp(1e-3 · a) · sqrt(mean(p²) + 1e-9) · s_p.

Stage 1 of meta-training (``train_phase=1``) drops η: the LSTM still runs but does not scale the
step. s_p is ``ctx.scales[i]`` (1 for the released Celo).

Non-finite loss. With ``finite = isfinite(loss)``, the loss buffer and the LSTM state are replaced by
their old values where ``finite`` is false (``torch.where``, no Python branch). The step still
happens, with η computed from the last good loss statistics, and the iteration counter advances.

θ (the ``state_dict`` of :class:`~lightning_lopt.optim.architectures.CeloLOpt`): ``mlp.{0,1,2}``
(``[out, in]``; layer 0 is the reference's 14 ``w0__k`` blocks concatenated) and the scheduler
entries of :mod:`~lightning_lopt.optim.functional.scheduler` under ``scheduler.``. param_inits = 1 in
every released configuration, which makes the reference's control softmax identically 1, so neither
``rnn_to_controls`` nor the dead first mixing Linear is part of θ.

State: ``iteration``, ``loss_means``, ``loss_running_min``, ``loss_count``, ``lstm_hidden`` and
``lstm_cell`` (``[H]``, global), and ``tensors`` (per-tensor accumulators as in small_fc_lopt).

Example::

    state = init_state(theta, params)
    ctx = StepContext([1.0] * len(params), loss, num_steps=1000)
    params, state = step(theta, params, grads, state, ctx)
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
from lightning_lopt.optim.functional.mlp import layers_of, normalized_mlp_forward
from lightning_lopt.optim.functional.scheduler import head, lstm_forward

NUM_INPUTS = 30
NUM_SCHEDULER_INPUTS = 18
STEP_MULT = 1e-3
EXP_MULT = 1e-3
LR_BASE = 0.1  # η = 0.1·exp(o) (docs/reference/celo.md#one-update)
GRAD_CLIP = 1000.0

State = dict[str, Any]


def init_state(theta: dict[str, Tensor], params: Sequence[Tensor], *, layout: str = "torch") -> State:
    """Zero accumulators, an empty loss buffer and the learned initial LSTM state from θ."""
    hidden = theta["scheduler.init_hidden"]
    return {
        "iteration": torch.zeros((), dtype=torch.int64, device=hidden.device),
        **loss_buffer.init(hidden.dtype, hidden.device),
        "lstm_hidden": hidden.detach().clone(),
        "lstm_cell": theta["scheduler.init_cell"].detach().clone(),
        "tensors": [init_accumulators(p, layout) for p in params],
    }


def scheduler_step(
    theta: dict[str, Tensor], state: State, ctx: StepContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Steps 1, 3 and 4: η for this update and the scheduler part of the next state.

    Returns ``(eta, next_scheduler_state)`` where the state holds the loss buffer and the LSTM
    state, both left unchanged when ``ctx.loss`` is not finite. Useful on its own to log Celo's
    learned schedule.
    """
    finite, buffer, loss_features = loss_buffer.observe(state, ctx, "Celo")
    progress = progress_embedding(state["iteration"], ctx.num_steps, state["loss_means"].dtype)
    x = torch.cat([progress, loss_features]).unsqueeze(0)
    hidden, cell = lstm_forward(
        theta, "scheduler.", x, state["lstm_hidden"].unsqueeze(0), state["lstm_cell"].unsqueeze(0)
    )
    eta = LR_BASE * torch.exp(head(theta, "scheduler.step_size", hidden)[0, 0])
    return eta, {
        **buffer,
        "lstm_hidden": torch.where(finite, hidden[0], state["lstm_hidden"]),
        "lstm_cell": torch.where(finite, cell[0], state["lstm_cell"]),
    }


def step(
    theta: dict[str, Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    *,
    train_phase: int = 2,
    layout: str = "torch",
) -> tuple[list[Tensor], State]:
    """One Celo update; returns ``(new_params, new_state)`` without mutating inputs."""
    check_lists(params, grads, ctx)
    if train_phase not in (1, 2):
        raise ValueError(f"train_phase must be 1 or 2, got {train_phase}")
    eta, scheduler_state = scheduler_step(theta, state, ctx)
    lr = eta if train_phase == 2 else 1.0  # stage 1: the LSTM runs but does not scale the step

    momentum, rms, adafactor = initial_decays(eta.dtype, eta.device)  # fixed (docs/reference/celo.md#configuration)
    layers = layers_of(theta, "mlp", 3)
    new_params: list[Tensor] = []
    new_tensors: list[dict[str, Tensor]] = []
    for p, g, acc, scale in zip(params, grads, state["tensors"], ctx.scales):
        shape = work_shape(p.shape)
        p_w = p.reshape(shape)
        g_w = torch.nan_to_num(g.reshape(shape).to(p.dtype)).clamp(-GRAD_CLIP, GRAD_CLIP)
        acc, fac_g = update_accumulators(acc, g_w, momentum, rms, adafactor, layout)
        out = normalized_mlp_forward(hyper_inputs(p_w, g_w, acc, fac_g, layout=layout), layers)
        param_scale = torch.sqrt((p_w * p_w).mean() + 1e-9)  # the tensor's RMS, not its norm
        delta = lr * STEP_MULT * out[..., 0] * torch.exp(EXP_MULT * out[..., 1]) * param_scale
        new_params.append((p_w - delta * scale).reshape(p.shape))
        new_tensors.append(acc)
    next_state = {"iteration": state["iteration"] + 1, **scheduler_state, "tensors": new_tensors}
    return new_params, next_state
