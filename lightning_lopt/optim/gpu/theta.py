"""θ preparation for the GPU kernels: per-particle packed MLP weights, decays, lr and iteration.

Everything per step and per particle rather than per element stays in torch, on the parameters'
device, with no host synchronisation (so a step can be captured in a CUDA graph): the decays from
their offsets, small_fc's 11 time features folded into the first-layer bias (as the pure step
does), Celo's η from its LSTM scheduler (the pure ``scheduler_step``). The MLP weights are padded
to the kernels' 32-wide tiles and stored ``[in, out]``; the first layer's rows are permuted to the
column order of the kernels' feature tile (:func:`kernels.bit_reverse5`).

Example::

    nets = small_fc_nets(lopt, {k: v.unsqueeze(0) for k, v in lopt.state_dict().items()}, iteration.reshape(1))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt
from lightning_lopt.optim.functional import celo, small_fc
from lightning_lopt.optim.functional.accumulators import ADAFACTOR_DECAYS, MOMENTUM_DECAYS, RMS_DECAYS
from lightning_lopt.optim.functional.features import _TIME_SCALES

WIDTH = 32
OUT_WIDTH = 16
_CONSTANTS: dict[tuple[str, torch.device], Tensor] = {}


def _constant(name: str, device: torch.device) -> Tensor:
    """Device constants made once (a copy inside a CUDA-graph capture would be a host sync)."""
    key = (name, device)
    if key not in _CONSTANTS:
        from lightning_lopt.optim.gpu.kernels import bit_reverse5

        values = {
            "time_scales": torch.tensor(_TIME_SCALES, dtype=torch.float32),
            "column_channel": torch.tensor([bit_reverse5(c) for c in range(WIDTH)]),
            "celo_decays": torch.tensor([*MOMENTUM_DECAYS, *RMS_DECAYS, *ADAFACTOR_DECAYS], dtype=torch.float32),
            "momentum_base": torch.tensor(MOMENTUM_DECAYS, dtype=torch.float32),
            "rms_base": torch.tensor(RMS_DECAYS, dtype=torch.float32),
            "adafactor_base": torch.tensor(ADAFACTOR_DECAYS, dtype=torch.float32),
        }[name]
        _CONSTANTS[key] = values.to(device)
    return _CONSTANTS[key]


@dataclass
class PackedNets:
    """Per-particle kernel inputs (leading axis P), contiguous float32 on the parameters' device."""

    w0: Tensor  # [P, 32, 32]: row = tile column, col = hidden unit
    b0: Tensor  # [P, 32]
    w1: Tensor  # [P, 32, 32]
    b1: Tensor  # [P, 32]
    w2: Tensor  # [P, 32, 16]
    b2: Tensor  # [P, 16]
    decays: Tensor  # [P, 7]: momentum (3), rms (1), adafactor (3)
    lr: Tensor  # [P]: small_fc step_mult; Celo η·1e-3 (1e-3 in stage 1)
    iteration: Tensor  # [P] int64: updates done so far (keys the bf16 rounding)
    exp_mult: float
    celo: bool


def _pad(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    out = x.new_zeros((x.shape[0], *shape))
    out[(slice(None), *(slice(0, s) for s in x.shape[1:]))] = x
    return out


def _pack(w0: Tensor, b0: Tensor, theta: dict[str, Tensor], decays: Tensor, lr: Tensor, iteration: Tensor,
          exp_mult: float, is_celo: bool) -> PackedNets:
    """Pad the three layers (``[P, out, in]`` in θ) to the tiles, ``[in, out]``; permute layer 0's inputs."""
    f32 = torch.float32
    w0_in_out = _pad(w0.to(f32).transpose(1, 2), (WIDTH, WIDTH))  # [P, channel, hidden]
    return PackedNets(
        w0=w0_in_out[:, _constant("column_channel", w0.device)].contiguous(),
        b0=_pad(b0.to(f32), (WIDTH,)),
        w1=_pad(theta["mlp.1.weight"].to(f32).transpose(1, 2), (WIDTH, WIDTH)),
        b1=_pad(theta["mlp.1.bias"].to(f32), (WIDTH,)),
        w2=_pad(theta["mlp.2.weight"].to(f32).transpose(1, 2), (WIDTH, OUT_WIDTH)),
        b2=_pad(theta["mlp.2.bias"].to(f32), (OUT_WIDTH,)),
        decays=decays.to(f32).contiguous(),
        lr=lr.to(f32).reshape(-1).contiguous(),
        iteration=iteration.reshape(-1).to(torch.int64).contiguous(),
        exp_mult=exp_mult,
        celo=is_celo,
    )


def _decays(offsets: Tensor, base: Tensor) -> Tensor:
    return 1 - (1 - base) * torch.exp(10.0 * offsets)  # small_fc.decays_from_offsets, on cached bases


def small_fc_nets(module: SmallFCLOpt, theta: dict[str, Tensor], iteration: Tensor) -> PackedNets:
    """θ of P particles (leading axis) → kernel inputs; the time features become a bias (as the pure step)."""
    w0 = theta["mlp.0.weight"]
    device = w0.device
    nf = small_fc.NUM_TENSOR_FEATURES
    time = torch.tanh(iteration.reshape(-1, 1).to(w0.dtype) / _constant("time_scales", device).to(w0.dtype) - 1.0)
    b0 = theta["mlp.0.bias"] + (w0[..., nf:] @ time.unsqueeze(-1)).squeeze(-1)
    decays = torch.cat(
        [
            _decays(theta["momentum_decays"], _constant("momentum_base", device)),
            _decays(theta["rms_decays"], _constant("rms_base", device)),
            _decays(theta["adafactor_decays"], _constant("adafactor_base", device)),
        ],
        dim=-1,
    )
    lr = torch.full((w0.shape[0],), module.step_mult, dtype=torch.float32, device=device)
    return _pack(w0[..., :nf], b0, theta, decays, lr, iteration, module.exp_mult, False)


def celo_nets(module: CeloLOpt, theta: dict[str, Tensor], eta: Tensor, iteration: Tensor) -> PackedNets:
    """Celo θ of P particles and their η → kernel inputs (stage 1 drops η, as the pure step)."""
    w0 = theta["mlp.0.weight"]
    p = w0.shape[0]
    lr = eta.reshape(p) * celo.STEP_MULT if module.train_phase == 2 else torch.full((p,), celo.STEP_MULT, device=w0.device)
    decays = _constant("celo_decays", w0.device).expand(p, -1)
    return _pack(w0, theta["mlp.0.bias"], theta, decays, lr, iteration, celo.EXP_MULT, True)
