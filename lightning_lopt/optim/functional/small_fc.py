"""small_fc_lopt (SP "LO") and μLO: the Adafactor-feature MLP learned optimizer (docs/reference/small_fc.md).

Per tensor: update momentum/rms/Adafactor accumulators with the (nan_to_num'd) gradient, build the
28 features of docs/reference/small_fc.md#features from the *new* accumulators, normalise each channel over the tensor,
append the 11 time features tanh(t/τ − 1) (t = updates done so far), run the 39→32→32→2 MLP and step

    p ← p − step_mult · d · exp(exp_mult · μ) · s_p

with s_p = ``ctx.scales[i]`` (μLO: 1/fan_in on hidden matrices; SP: pass ones). step_mult is 0.01
for μLO and 0.001 for SP LO; exp_mult is 1e-3 for both (docs/reference/small_fc.md#hyper-parameters).

θ (the ``state_dict`` of :class:`~lightning_lopt.optim.architectures.SmallFCLOpt`):
``mlp.{0,1,2}.weight`` (``[out, in]``) and ``.bias``, plus the decay offsets φ ``momentum_decays``
(3), ``rms_decays`` (1) and ``adafactor_decays`` (3); decay = 1 − (1 − d₀)·exp(10·φ).

State: ``{"iteration": int64 0-d, "tensors": [{"m", "rms", "v_row", "v_col"} or {"m", "rms", "v"}]}``.

Example::

    state = init_state(theta, params)
    params, state = step(theta, params, grads, state, StepContext([1.0] * len(params), None, 1000))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lopt.optim.functional.accumulators import (
    ADAFACTOR_DECAYS,
    MOMENTUM_DECAYS,
    RMS_DECAYS,
    init_accumulators,
    update_accumulators,
    work_shape,
)
from lightning_lopt.optim.functional.context import StepContext, check_lists
from lightning_lopt.optim.functional.features import (
    Factored,
    adafactor_features,
    time_embedding,
)
from lightning_lopt.optim.functional.mlp import layers_of, normalized_mlp_forward

NUM_TENSOR_FEATURES = 28
NUM_FEATURES = NUM_TENSOR_FEATURES + 11
NUM_LAYERS = 3

State = dict[str, Any]


def decays_from_offsets(offsets: Tensor, initial: Sequence[float]) -> Tensor:
    """The meta-learned decays 1 − (1 − d₀)·exp(10·φ)
    (docs/reference/small_fc.md#meta-parameters-and-decays); φ = 0 gives d₀."""
    base = torch.tensor(initial, dtype=offsets.dtype, device=offsets.device)
    return 1 - (1 - base) * torch.exp(10.0 * offsets)


def init_state(theta: dict[str, Tensor], params: Sequence[Tensor], *, layout: str = "torch") -> State:
    """Zero accumulators and iteration 0.

    ``theta`` is unused here but accepted so that every architecture's ``init_state`` has the same
    signature (the meta-trainer resets particle states generically).
    """
    del theta
    device = params[0].device if params else None
    return {
        "iteration": torch.zeros((), dtype=torch.int64, device=device),
        "tensors": [init_accumulators(p, layout) for p in params],
    }


def tensor_features(
    p: Tensor, g: Tensor, acc: dict[str, Tensor], fac_g: Tensor, *, layout: str, factored: Factored | None = None
) -> Tensor:
    """The 28 per-element channels of
    docs/reference/small_fc.md#features (not yet normalised) from the *updated* accumulators.

    Order: g, p, m(3), rms(1), m·rsqrt(rms+1e-6)(3), rsqrt(rms+1e-6)(1), fac_g(3), then the
    Adafactor groups (15); ``factored`` as in :func:`~.features.adafactor_features`.
    """
    m, v = acc["m"], acc["rms"]
    rsqrt = torch.rsqrt(v + 1e-6)
    return torch.cat(
        [
            g.unsqueeze(-1),
            p.unsqueeze(-1),
            m,
            v,
            m * rsqrt,
            rsqrt,
            fac_g,
            *adafactor_features(acc, m, layout=layout, nonfactored_mom_eps=1e-6, factored=factored),
        ],
        dim=-1,
    )


def step(
    theta: dict[str, Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    *,
    step_mult: float = 0.01,
    exp_mult: float = 1e-3,
    layout: str = "torch",
) -> tuple[list[Tensor], State]:
    """One small_fc_lopt / μLO update; returns ``(new_params, new_state)`` without mutating inputs."""
    check_lists(params, grads, ctx)
    momentum = decays_from_offsets(theta["momentum_decays"], MOMENTUM_DECAYS)
    rms = decays_from_offsets(theta["rms_decays"], RMS_DECAYS)
    adafactor = decays_from_offsets(theta["adafactor_decays"], ADAFACTOR_DECAYS)
    layers = layers_of(theta, "mlp", NUM_LAYERS)
    iteration = state["iteration"]
    # The 11 time features are the same for every element of every tensor, so their contribution to
    # the first layer is a bias, computed once a step instead of tiling 11 channels over each element.
    (w0, b0), hidden = layers[0], layers[1:]
    w0_features = w0[:, :NUM_TENSOR_FEATURES]
    b0_time = b0 + w0[:, NUM_TENSOR_FEATURES:] @ time_embedding(iteration, w0.dtype)

    new_params: list[Tensor] = []
    new_tensors: list[dict[str, Tensor]] = []
    for p, g, acc, scale in zip(params, grads, state["tensors"], ctx.scales):
        shape = work_shape(p.shape)
        p_w = p.reshape(shape)
        # docs/reference/small_fc.md#accumulators (step 2): NaN → 0, ±inf → ±max before anything else sees the gradient.
        g_w = torch.nan_to_num(g.reshape(shape).to(p.dtype))
        acc, fac_g = update_accumulators(acc, g_w, momentum, rms, adafactor, layout)
        features = tensor_features(p_w, g_w, acc, fac_g, layout=layout)
        # The 28 channels are normalised per channel
        # (docs/reference/small_fc.md#per-tensor-normalisation); the time features are not (b0_time).
        out = normalized_mlp_forward(features, [(w0_features, b0_time), *hidden])
        delta = step_mult * out[..., 0] * torch.exp(exp_mult * out[..., 1]) * scale
        new_params.append((p_w - delta).reshape(p.shape))
        new_tensors.append(acc)
    return new_params, {"iteration": iteration + 1, "tensors": new_tensors}
