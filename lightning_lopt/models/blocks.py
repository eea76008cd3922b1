"""Pre-LN transformer blocks shared by :class:`MuViT` and :class:`MuTransformerLM`.

Parameter names follow ``blocks.{i}.{norm1,attn.{query,key,value,out},norm2,mlp.{fc1,fc2}}``.
Queries, keys, values and the output projection are separate ``nn.Linear`` layers (as in μLO), so
every hidden matrix is one tensor with one update scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lopt.models.base import init_mup_linear


class SelfAttention(nn.Module):
    """Multi-head self-attention with an explicit logit scale.

    ``scale`` is ``1/d_head`` under μP (μLO and mup) and ``None`` (SDPA's ``1/sqrt(d_head)``) under SP.
    """

    def __init__(self, width: int, heads: int, scale: float | None, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.scale = scale
        self.causal = causal
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # [..., T, D] -> [..., H, T, D/H]
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)
        return self.out(y.transpose(-3, -2).flatten(-2))


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))`` with the tanh GELU, which is the default of ``jax.nn.gelu`` used by μLO."""

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN block: ``x + drop(attn(ln(x)))`` then ``x + drop(mlp(ln(x)))``."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_dim: int,
        *,
        attn_scale: float | None,
        causal: bool,
        eps: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads, attn_scale, causal)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = FeedForward(width, mlp_dim)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Skipped entirely at p=0 so that vmap never sees a random op (its default randomness="error").
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))

    def init_mup(self, attn_std: float, fc1_std: float, fc2_std: float, truncated: bool) -> None:
        """μLO's block init: the given weight stds, N(0, 1) biases; LayerNorms keep 1 / 0."""
        for layer in (self.attn.query, self.attn.key, self.attn.value, self.attn.out):
            init_mup_linear(layer, attn_std, truncated)
        init_mup_linear(self.mlp.fc1, fc1_std, truncated)
        init_mup_linear(self.mlp.fc2, fc2_std, truncated)
