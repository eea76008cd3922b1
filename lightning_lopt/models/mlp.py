"""μLO's MLP optimizee (``M:src/mu_mlp.py``), in μP or standard parametrization."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lopt.models.base import (
    MuLOReadout,
    MuModel,
    check_param,
    check_output_mult,
    check_positive_int,
    init_mup_linear,
)


def _in_features(in_shape: int | Sequence[int]) -> int:
    dims = [in_shape] if isinstance(in_shape, int) else list(in_shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
        raise ValueError(f"in_shape must be a positive integer or a sequence of them, got {in_shape!r}")
    return math.prod(dims)


class MuMLP(MuModel):
    """ReLU MLP with layer sizes ``[width] * depth + [num_classes]``; inputs are flattened.

    Parameters are ``input_layer`` (in → width), ``hidden_layers.{0..depth-2}`` (width → width) and
    ``readout`` (width → num_classes).

    ``param="mup"`` is μLO's parametrization
    (docs/reference/mup.md#parametrisation-and-update-scales): input and hidden weights are
    truncated normal with σ = 1/sqrt(fan_in) cut at ±2σ, every bias is N(0, 1), the readout weight
    is zero and the whole readout output, bias included, is multiplied by ``output_mult / width``.
    Hidden weights get update scale ``1 / width``. ``param="sp"`` keeps PyTorch's ``nn.Linear``
    defaults, no multipliers, all update scales 1.

    Example::

        model = MuMLP((1, 8, 8), width=128, depth=3, num_classes=10)
        logits = model(torch.randn(32, 1, 8, 8))          # [32, 10]
        model.update_scales()["hidden_layers.0.weight"]   # 1/128
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        width: int,
        depth: int,
        num_classes: int,
        param: str = "mup",
        output_mult: float = 1.0,
    ) -> None:
        super().__init__()
        in_features = _in_features(in_shape)
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        check_positive_int("num_classes", num_classes)
        self.param = check_param(param)
        output_mult = check_output_mult(output_mult, param)

        self.input_layer = nn.Linear(in_features, width)
        self.hidden_layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.readout: nn.Linear
        if param == "mup":
            self.readout = MuLOReadout(width, num_classes, output_mult=output_mult)
            init_mup_linear(self.input_layer, in_features**-0.5)
            for layer in self.hidden_layers:
                init_mup_linear(layer, width**-0.5)
        else:
            self.readout = nn.Linear(width, num_classes)
        self._finish_init(lambda w: MuMLP(in_shape, w, depth, num_classes, param="sp"), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.input_layer(x.flatten(1)))
        for layer in self.hidden_layers:
            h = F.relu(layer(h))
        return self.readout(h)
