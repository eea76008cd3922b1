"""One constructor for every model kind: :func:`build`.

The evaluation's tasks, the coordinate check and the meta-training tasks all build their networks
here, so a kind means the same network everywhere. A model is sized by its data: ``input_shape`` and
``num_classes`` for the image models, ``vocab_size`` and ``seq_len`` for the language model, given
as keywords or read from ``data`` (a data module or source that has them).

==========  ===================================  ====================================
``kind``    network                              sized by
==========  ===================================  ====================================
``mlp``     :class:`MuMLP`                       ``input_shape``, ``num_classes``
``ae``      :class:`MuMLP` back to the input     ``input_shape``
``vit``     :class:`MuViT`                       ``input_shape`` ``[C, H, W]``, ``num_classes``
``lm``      :class:`MuTransformerLM`             ``vocab_size``, ``seq_len``
``conv``    :class:`ConvNet`                     ``input_shape`` ``[C, H, W]``, ``num_classes``
==========  ===================================  ====================================

Example::

    from lightning_lopt import models
    net = models.build("mlp", 128, 3, "mup", input_shape=(1, 8, 8), num_classes=10)
    vit = models.build("vit", 64, 2, "sp", data=dm, heads=4)       # sized by a data module's attributes
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_lopt.models.base import MuModel
from lightning_lopt.models.convnet import ConvNet
from lightning_lopt.models.mlp import MuMLP
from lightning_lopt.models.transformer import MuTransformerLM
from lightning_lopt.models.vit import MuViT

__all__ = ["KINDS", "build"]

#: Model kinds :func:`build` knows, and the sizes each is built from.
KINDS: dict[str, tuple[str, ...]] = {
    "mlp": ("input_shape", "num_classes"),
    "ae": ("input_shape",),
    "vit": ("input_shape", "num_classes"),
    "lm": ("vocab_size", "seq_len"),
    "conv": ("input_shape", "num_classes"),
}


def build(
    kind: str,
    width: int,
    depth: int,
    param: str = "mup",
    *,
    data: Any = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    heads: int = 1,
    patch_size: int | None = None,
    mlp_ratio: float = 4.0,
    output_mult: float = 1.0,
) -> MuModel:
    """The ``kind`` network at ``width`` and ``depth`` under ``param`` (``"mup"`` or ``"sp"``).

    Sizes given as keywords win over those of ``data``. ``heads`` is for ``vit`` and ``lm``;
    ``patch_size`` defaults to a quarter of the image side (16 patches: 8x8 digits get 2x2 patches).
    Raises ``ValueError`` for an unknown kind, a missing size, or a ViT input that is not ``[C, H, W]``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    given = {"input_shape": input_shape, "num_classes": num_classes, "vocab_size": vocab_size, "seq_len": seq_len}
    sizes = {k: v if v is not None else getattr(data, k, None) for k, v in given.items()}
    missing = [k for k in KINDS[kind] if sizes[k] is None]
    if missing:
        owner = f"{type(data).__name__} lacks" if data is not None else "missing"
        raise ValueError(f"{owner} {missing}, which the {kind} model is sized by")
    shape = sizes["input_shape"]
    if kind == "mlp":
        return MuMLP(shape, width, depth, sizes["num_classes"], param, output_mult)
    if kind == "ae":
        return MuMLP(shape, width, depth, math.prod(shape), param, output_mult)
    if kind == "vit":
        if len(shape) != 3:
            raise ValueError(f"the ViT needs [C, H, W] images, the data gives {tuple(shape)}")
        channels, size = shape[0], shape[-1]
        patch = patch_size if patch_size is not None else max(1, size // 4)
        return MuViT(
            size, patch, width, depth, heads, mlp_ratio, sizes["num_classes"], param,
            in_channels=channels, output_mult=output_mult,
        )  # fmt: skip
    if kind == "lm":
        return MuTransformerLM(sizes["vocab_size"], sizes["seq_len"], width, depth, heads, param, output_mult=output_mult)
    return ConvNet(shape, width, depth, sizes["num_classes"], param, output_mult)
