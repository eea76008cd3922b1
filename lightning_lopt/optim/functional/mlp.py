"""The small per-parameter MLP every architecture applies element-wise.

Example::

    out = mlp_forward(x, [(w0, b0), (w1, b1), (w2, b2)])   # ReLU between layers, none at the end
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def mlp_forward(x: Tensor, layers: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Linear layers (weights ``[out, in]``) with ReLU between them and no output nonlinearity."""
    for index, (weight, bias) in enumerate(layers):
        x = F.linear(x, weight, bias)
        if index < len(layers) - 1:
            x = F.relu(x)
    return x


def layers_of(theta: dict[str, Tensor], prefix: str, n_layers: int) -> list[tuple[Tensor, Tensor]]:
    """``[(θ[prefix.k.weight], θ[prefix.k.bias]) for k < n_layers]``."""
    return [(theta[f"{prefix}.{k}.weight"], theta[f"{prefix}.{k}.bias"]) for k in range(n_layers)]
