"""μLO's decoder-only language model optimizee (``M:src/mu_transformer.py``), μP or SP."""

from __future__ import annotations

import torch
from torch import nn

from lightning_lopt.models.base import (
    MuLOReadout,
    MuModel,
    check_heads,
    check_output_mult,
    check_param,
    check_positive_int,
)
from lightning_lopt.models.blocks import Block

# μLO's MLP block widens by 4 (MuDenseBlock's widening_factor).
_MLP_RATIO = 4


class MuTransformerLM(MuModel):
    """Pre-LN causal decoder: token embedding + learned positions, blocks, final LN, readout.

    Parameters: ``tok_embed``, ``pos_embed``, ``blocks.{i}.{norm1,attn.{query,key,value,out},norm2,
    mlp.{fc1,fc2}}``, ``norm``, ``readout``. ``forward(x)`` maps ``[B, T]`` token ids (``T <= seq_len``)
    to ``[B, T, vocab_size]`` logits.

    ``param="mup"`` follows μLO's μTransformer
    (docs/reference/mup.md#parametrisation-and-update-scales): the token embedding is an
    *untruncated* normal with σ = 1/sqrt(vocab_size) (Haiku's Embed fan-in), block matrices are
    untruncated normal with σ = 1/sqrt(fan_in) (query/key/value/out/fc1: width, fc2: 4·width), all
    biases N(0, 1), LayerNorms 1/0, attention logits scaled by 1/d_head, readout zero weight and
    N(0, 1) bias with the whole output multiplied by ``output_mult / width``. Update scales are
    ``1/width`` for query, key, value, out and fc1 weights and ``1/(4·width)`` for fc2 weights.
    ``param="sp"``: PyTorch defaults (embeddings N(0, 1)), 1/sqrt(d_head) attention, plain readout.

    Differences from μLO, on purpose:

    - μLO's model has no position embedding (order reaches it only through the causal mask). Ours is
      learned, initialised like the token embedding by Haiku's rule, N(0, 1/seq_len): an input
      weight whose scale does not depend on width, as μP requires.
    - ``dropout`` (after attention and after the MLP, where μLO had it) defaults to 0. μLO ran 0.1
      and left it on even at test time; 0 keeps meta-training under ``vmap`` deterministic and free
      of random ops. Pass ``dropout=0.1`` to reproduce μLO.
    - No padding mask: our text data has no pad tokens.

    Example::

        model = MuTransformerLM(vocab_size=256, seq_len=64, width=128, depth=2, heads=4)
        logits = model(torch.randint(0, 256, (8, 64)))     # [8, 64, 256]
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        width: int,
        depth: int,
        heads: int,
        param: str = "mup",
        dropout: float = 0.0,
        output_mult: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        self.seq_len = check_positive_int("seq_len", seq_len)
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        check_heads(width, heads)
        self.param = check_param(param)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        output_mult = check_output_mult(output_mult, param)
        mup_ = param == "mup"
        mlp_dim = _MLP_RATIO * width

        self.tok_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Embedding(seq_len, width)
        d_head = width // heads
        self.blocks = nn.ModuleList(
            Block(
                width,
                heads,
                mlp_dim,
                attn_scale=1.0 / d_head if mup_ else None,
                causal=True,
                eps=1e-5,  # Haiku's LayerNorm default
                dropout=float(dropout),
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.readout: nn.Linear
        if mup_:
            self.readout = MuLOReadout(width, vocab_size, output_mult=output_mult)
            nn.init.normal_(self.tok_embed.weight, mean=0.0, std=vocab_size**-0.5)
            nn.init.normal_(self.pos_embed.weight, mean=0.0, std=seq_len**-0.5)
            for block in self.blocks:
                # Haiku VarianceScaling(1, "fan_in", "normal"): untruncated, unlike μLO's MLP and ViT.
                block.init_mup(attn_std=width**-0.5, fc1_std=width**-0.5, fc2_std=mlp_dim**-0.5, truncated=False)
        else:
            self.readout = nn.Linear(width, vocab_size)
        self._finish_init(lambda w: MuTransformerLM(vocab_size, seq_len, w, depth, heads, "sp", dropout), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        if length > self.seq_len:
            raise ValueError(f"input has {length} tokens, more than seq_len={self.seq_len}")
        h = self.tok_embed(x) + self.pos_embed.weight[:length]
        for block in self.blocks:
            h = block(h)
        return self.readout(self.norm(h))
