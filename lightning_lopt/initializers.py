"""Initializers shared by the optimizees and the learned optimizers' meta-weights.

Example::

    haiku_trunc_normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
"""

from __future__ import annotations

import torch
from torch import nn


def haiku_trunc_normal_(tensor: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normal(0, std²) truncated at ±2·std *without* variance correction, as Haiku and Flax do.

    torch's ``trunc_normal_`` takes absolute bounds, so they are passed as ±2·std
    (docs/reference/small_fc.md#meta-initialisation);
    the resulting standard deviation is about 0.88·std.
    """
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std, generator=generator)
