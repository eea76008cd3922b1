"""μLO's Vision Transformer optimizee (``M:src/mu_vit.py``), in μP or standard parametrization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_lopt.models.base import (
    MuLOReadout,
    MuModel,
    check_heads,
    check_output_mult,
    check_param,
    check_positive_float,
    check_positive_int,
    trunc_normal_,
)
from lightning_lopt.models.blocks import Block

# Flax's LayerNorm default, which μLO's ViT uses.
_LN_EPS = 1e-6


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    dims = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
    if len(dims) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
        raise ValueError(f"image_size must be a positive integer or a (height, width) pair, got {image_size!r}")
    return dims[0], dims[1]


class MuViT(MuModel):
    """Pre-LN Vision Transformer with a cls token, classifying from the cls token.

    Parameters: ``patch_embed`` (a ``patch_size``-strided conv), ``cls_token``, ``pos_embed``,
    ``blocks.{i}.{norm1,attn.{query,key,value,out},norm2,mlp.{fc1,fc2}}``, ``norm``, ``readout``.
    ``mlp_dim = int(mlp_ratio * width)``. Inputs are ``[B, C, H, W]`` or flattened ``[B, C*H*W]``.

    ``param="mup"`` follows μLO's μViT
    (docs/reference/mup.md#parametrisation-and-update-scales): the patch-embedding kernel, position
    embedding and every block matrix are truncated normal (±2σ) with σ = 1/sqrt(width), all biases
    N(0, 1), cls token zero, LayerNorms 1/0, attention logits scaled by 1/d_head, readout zero weight
    and N(0, 1) bias with the whole output multiplied by ``output_mult / width``. Update scales are
    ``1/width`` for query, key, value, out and fc1 weights and ``1/mlp_dim`` for fc2 weights.
    ``param="sp"``: PyTorch defaults for conv/linear/LayerNorm, position embedding N(0, 0.02²)
    (BERT/ViT), cls token zero, 1/sqrt(d_head) attention, plain readout, all update scales 1.

    Example::

        model = MuViT(image_size=8, patch_size=2, width=64, depth=2, heads=4, mlp_ratio=4, num_classes=10)
        logits = model(torch.randn(32, 1, 8, 8))          # [32, 10]
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        num_classes: int,
        param: str = "mup",
        in_channels: int = 1,
        output_mult: float = 1.0,
    ) -> None:
        super().__init__()
        height, im_width = _image_hw(image_size)
        check_positive_int("patch_size", patch_size)
        if height % patch_size or im_width % patch_size:
            raise ValueError(f"patch_size ({patch_size}) must divide image_size ({height}x{im_width})")
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        check_heads(width, heads)
        mlp_dim = int(check_positive_float("mlp_ratio", mlp_ratio) * width)
        if mlp_dim < 1:
            raise ValueError(f"mlp_ratio ({mlp_ratio}) times width ({width}) must be at least 1")
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        self.param = check_param(param)
        output_mult = check_output_mult(output_mult, param)
        self.image_shape = (in_channels, height, im_width)
        num_tokens = (height // patch_size) * (im_width // patch_size) + 1
        mup_ = param == "mup"

        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, width))
        d_head = width // heads
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_dim, attn_scale=1.0 / d_head if mup_ else None, causal=False, eps=_LN_EPS)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=_LN_EPS)
        self.readout: nn.Linear
        if mup_:
            self.readout = MuLOReadout(width, num_classes, output_mult=output_mult)
            std = width**-0.5
            # μLO initialises the patch kernel with 1/sqrt(width), not 1/sqrt(fan_in = C·p²).
            trunc_normal_(self.patch_embed.weight, std)
            nn.init.normal_(self.patch_embed.bias, mean=0.0, std=1.0)
            trunc_normal_(self.pos_embed, std)
            for block in self.blocks:
                # μLO initialises fc2 (Flax Dense_1, fan_in = mlp_dim) with 1/sqrt(width) too; at a
                # fixed mlp_ratio that is the fan-in rule up to a constant, so it is kept as run.
                block.init_mup(attn_std=std, fc1_std=std, fc2_std=std, truncated=True)
            # Update scales (derived from mup shapes in _finish_init) are 1/fan_in for every hidden
            # matrix. μLO differs for the attention output projection: it read the scale from
            # kernel.shape[1] of Flax's [heads, head_dim, width] kernel, i.e. 1/head_dim. That is a
            # layout artefact with no torch counterpart (our out weight is [width, width]), and
            # 1/head_dim does not shrink with width at fixed head_dim, so we use 1/width.
        else:
            self.readout = nn.Linear(width, num_classes)
            nn.init.normal_(self.pos_embed, mean=0.0, std=0.02)
        self._finish_init(
            lambda w: MuViT(image_size, patch_size, w, depth, heads, mlp_ratio, num_classes, "sp", in_channels),
            width,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # data modules that flatten images hand over [B, C*H*W]
            x = x.unflatten(1, self.image_shape)
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.readout(self.norm(h[:, 0]))
