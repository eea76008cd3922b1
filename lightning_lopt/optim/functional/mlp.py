"""The small per-parameter MLP every architecture applies element-wise.

Example::

    out = mlp_forward(x, [(w0, b0), (w1, b1), (w2, b2)])   # ReLU between layers, none at the end
    out = normalized_mlp_forward(features, layers)          # the same on per-channel normalised x
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from lightning_lopt.optim.functional.features import second_moment_rsqrt


def mlp_forward(x: Tensor, layers: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Linear layers (weights ``[out, in]``) with ReLU between them and no output nonlinearity."""
    for index, (weight, bias) in enumerate(layers):
        x = F.linear(x, weight, bias)
        if index < len(layers) - 1:
            x = F.relu(x)
    return x


def normalized_mlp_forward(x: Tensor, layers: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``mlp_forward`` of ``x`` second-moment normalised per trailing channel over the whole tensor.

    The normalisation x_c / sqrt(1e-5 + mean(x_c²)) (docs/reference/small_fc.md#per-tensor-normalisation,
    docs/reference/celo.md#per-parameter-features) is a per-tensor
    scaling of each input channel, so it is folded into the first layer's weight columns instead of
    materialising a normalised copy of ``x``: the same function, one pass over the features fewer.
    """
    (w0, b0), rest = layers[0], layers[1:]
    return mlp_forward(x, [(w0 * second_moment_rsqrt(x).to(w0.dtype), b0), *rest])


def layers_of(theta: dict[str, Tensor], prefix: str, n_layers: int) -> list[tuple[Tensor, Tensor]]:
    """``[(θ[prefix.k.weight], θ[prefix.k.bias]) for k < n_layers]``."""
    return [(theta[f"{prefix}.{k}.weight"], theta[f"{prefix}.{k}.bias"]) for k in range(n_layers)]
