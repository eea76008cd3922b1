"""μP optimizees built with mup: an MLP, a Vision Transformer, a Transformer language model and a
conv net, each built by kind with :func:`build` (``models.build("mlp", width, depth, ...)``).

Each model takes ``param="mup"`` (μLO's parametrization, the default) or ``param="sp"`` (PyTorch
defaults, the baseline) and exposes ``update_scales()``: per-tensor floats keyed by
``named_parameters()`` names, ``1/fan_in`` for hidden matrices under μP and ``1.0`` otherwise. The
same floats sit on every parameter as ``p.lopt_update_scale``.

Example::

    from lightning_lopt.models import MuMLP, update_scales_of
    model = MuMLP((1, 8, 8), width=128, depth=3, num_classes=10)
    update_scales_of(model)["hidden_layers.0.weight"]    # 0.0078125
"""

from lightning_lopt.models.base import MuLOReadout, MuModel
from lightning_lopt.models.convnet import ConvNet
from lightning_lopt.models.factory import KINDS, build
from lightning_lopt.models.mlp import MuMLP
from lightning_lopt.models.scales import (
    attach_readout_bases,
    attach_update_scales,
    is_hidden_matrix,
    mup_update_scales,
    param_update_scale,
    readout_base,
    relative_update_scale,
    update_scales_of,
)
from lightning_lopt.models.transformer import MuTransformerLM
from lightning_lopt.models.vit import MuViT

__all__ = [
    "KINDS",
    "ConvNet",
    "MuLOReadout",
    "MuMLP",
    "MuModel",
    "MuTransformerLM",
    "MuViT",
    "attach_readout_bases",
    "attach_update_scales",
    "build",
    "is_hidden_matrix",
    "mup_update_scales",
    "param_update_scale",
    "readout_base",
    "relative_update_scale",
    "update_scales_of",
]
