"""A small convolutional classifier for the ``diverse`` suite, in μP or standard parametrization.

Celo's ``Conv_Cifar10_32x64x64`` (docs/reference/celo.md#evaluation-tasks): 3x3 convolutions with ``width, 2·width,
2·width`` channels, the first with stride 2, ReLU after each, global average pooling and a linear
head, built on the same :class:`~lightning_lopt.models.MuModel` machinery as the other optimizees.

Example::

    net = ConvNet((1, 28, 28), width=32, depth=3, num_classes=10)
    net(torch.randn(8, 1, 28, 28)).shape          # [8, 10]
    net.update_scales()["convs.1.weight"]         # 1/32: a hidden matrix, 1/fan_in (in channels)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lopt.checks import check_positive_int
from lightning_lopt.models.base import MuLOReadout, MuModel, check_output_mult, check_param, trunc_normal_


class ConvNet(MuModel):
    """``depth`` 3x3 convolutions (``width``, then ``2·width`` channels; the first with stride 2),
    ReLU, global average pooling, readout.

    ``param="mup"`` follows the library's μP convention for the other models: conv kernels truncated
    normal with σ = 1/sqrt(fan_in) (``in_channels · 9``), biases N(0, 1), the μLO readout (zero weight,
    output times ``output_mult / width``). mup derives the update scales: ``1 / in_channels`` for the
    hidden convolutions (both channel counts grow with width), 1 elsewhere. ``param="sp"``: PyTorch
    defaults.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        width: int,
        depth: int,
        num_classes: int,
        param: str = "mup",
        output_mult: float = 1.0,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"ConvNet needs [C, H, W] images, got input shape {tuple(in_shape)}")
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        check_positive_int("num_classes", num_classes)
        self.param = check_param(param)
        output_mult = check_output_mult(output_mult, param)
        self.in_shape = tuple(in_shape)
        channels = [in_shape[0], width, *([2 * width] * (depth - 1))]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2 if i == 0 else 1, padding=1)
            for i, (c_in, c_out) in enumerate(zip(channels, channels[1:]))
        )
        self.readout: nn.Linear
        if param == "mup":
            self.readout = MuLOReadout(channels[-1], num_classes, output_mult=output_mult)
            for conv in self.convs:
                trunc_normal_(conv.weight, (conv.in_channels * 9) ** -0.5)
                nn.init.normal_(conv.bias, mean=0.0, std=1.0)
        else:
            self.readout = nn.Linear(channels[-1], num_classes)
        self._finish_init(lambda w: ConvNet(in_shape, w, depth, num_classes, param="sp"), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # data modules that flatten images hand over [B, C*H*W]
            x = x.unflatten(1, self.in_shape)
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.readout(x.mean(dim=(-2, -1)))
