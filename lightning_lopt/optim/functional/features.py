"""Per-parameter input features shared by the learned optimizers.

- :func:`adafactor_features`: the five Adafactor feature groups (15 channels) common to all three
  architectures (docs/reference/small_fc.md#features (rows 8–12),
  docs/reference/celo.md#per-parameter-features (groups 9–13)).
- :func:`hyper_inputs`: the 30 channels of the Celo / VeLO per-parameter MLP
  (docs/reference/celo.md#per-parameter-features,
  docs/reference/velo.md#per-parameter-mlp-bank).
- :func:`second_moment_normalize`: per-channel normalisation over all elements of a tensor.
- :func:`time_embedding` (small_fc_lopt) and :func:`progress_embedding` (Celo, VeLO).

Inputs are in the work shape (scalars already reshaped to ``(1,)``); feature channels are on a
trailing axis.

Example::

    x = second_moment_normalize(torch.cat([g[..., None], p[..., None]], -1))
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lopt.optim.functional.accumulators import factored_dims, factored_scalings

_TIME_SCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000)
_PROGRESS_CENTRES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)


def second_moment_rsqrt(x: Tensor, eps: float = 1e-5) -> Tensor:
    """1 / sqrt(eps + mean(x²)) per trailing channel (shape ``[C]``), the mean over every other axis."""
    axes = tuple(range(x.dim() - 1))
    return torch.rsqrt(eps + (x * x).mean(dim=axes))


Factored = tuple[tuple[int, int], Tensor, Tensor]


def adafactor_features(
    acc: dict[str, Tensor],
    m: Tensor,
    *,
    layout: str,
    nonfactored_mom_eps: float,
    factored: Factored | None = None,
) -> list[Tensor]:
    """The 15 Adafactor channels, built from the *updated* accumulators.

    Factored (rank ≥ 2): v_row and v_col broadcast to full shape, their rsqrt(· + 1e-8), and
    m · row · col (momentum k paired with Adafactor decay k). Non-factored: v twice, rsqrt(v + 1e-8)
    twice, and m · (v + eps)^(-1/2), with eps = 1e-6 for small_fc_lopt and 0 for Celo/VeLO.

    ``factored`` = ``(dims, row, col)`` supplies the factored axes and scalings instead of deriving
    them from ``m``'s shape (the sharded step: ``m`` is a shard, the axes and the row statistic's
    mean belong to the whole tensor).
    """
    shape = m.shape
    if factored is None:
        dims = factored_dims(shape[:-1], layout)
    else:
        dims = factored[0]
    if dims is None:
        v = acc["v"]
        inv = torch.rsqrt(v + 1e-8)
        return [v, v, inv, inv, m * (v + nonfactored_mom_eps) ** -0.5]
    d1, d0 = dims
    row_feat = acc["v_row"].unsqueeze(d0).expand(shape)
    col_feat = acc["v_col"].unsqueeze(d1).expand(shape)
    if factored is None:
        row, col = factored_scalings(acc["v_row"], acc["v_col"], dims)
    else:
        row, col = factored[1], factored[2]
    return [
        row_feat,
        col_feat,
        torch.rsqrt(row_feat + 1e-8),
        torch.rsqrt(col_feat + 1e-8),
        m * row * col,
    ]


def hyper_inputs(
    p: Tensor, g: Tensor, acc: dict[str, Tensor], fac_g: Tensor, *, layout: str, factored: Factored | None = None
) -> Tensor:
    """The 30 input channels of the Celo / VeLO per-parameter MLP
    (docs/reference/celo.md#per-parameter-features), not yet normalised.

    Order: g, clip(g, ±0.1), p, m(3), rms(1), m·rsqrt(rms+1e-6)(3), rsqrt(rms+1e-6)(1), fac_g(3),
    g·rsqrt(rms+1e-6)(1), then the Adafactor groups (15). ``acc`` holds the updated accumulators;
    ``factored`` as in :func:`adafactor_features`.
    """
    m, rms = acc["m"], acc["rms"]
    gx = g.unsqueeze(-1)
    rsqrt = torch.rsqrt(rms + 1e-6)
    groups = [
        gx,
        gx.clamp(-0.1, 0.1),
        p.unsqueeze(-1),
        m,
        rms,
        m * rsqrt,
        rsqrt,
        fac_g,
        gx * rsqrt,
        *adafactor_features(acc, m, layout=layout, nonfactored_mom_eps=0.0, factored=factored),
    ]
    # Each channel is second-moment normalised over the tensor by the MLP (normalized_mlp_forward);
    # normalising the concatenation per channel equals normalising each group, the reference's way.
    return torch.cat(groups, dim=-1)


def time_embedding(iteration: Tensor, dtype: torch.dtype) -> Tensor:
    """tanh(t/τ − 1) for the 11 timescales τ of small_fc_lopt; t counts updates done so far."""
    scales = torch.tensor(_TIME_SCALES, dtype=dtype, device=iteration.device)
    return torch.tanh(iteration.to(dtype) / scales - 1.0)


def progress_embedding(iteration: Tensor, num_steps: int | Tensor, dtype: torch.dtype) -> Tensor:
    """tanh(10·(s − c)) for the 9 centres c of Celo / VeLO; s = iteration / num_steps."""
    fraction = iteration.to(dtype) / torch.as_tensor(num_steps, device=iteration.device).to(dtype)
    centres = torch.tensor(_PROGRESS_CENTRES, dtype=dtype, device=iteration.device)
    return torch.tanh((fraction - centres) * 10.0)
