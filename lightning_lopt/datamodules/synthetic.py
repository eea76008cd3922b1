"""Offline token data for language-model checks that need no download: :class:`SyntheticTokens`.

The evaluation (``data: synthetic``) and the coordinate check (``--data synthetic``, the default for
the LM) load it by name through :func:`lightning_lopt.eval.data.load_source`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SyntheticTokens"]


class SyntheticTokens:
    """Offline token data: a fixed random bigram (Markov) chain.

    Each token has ``branching`` likely successors, so there is structure to learn and the loss
    moves within a few steps. It mimics a data module's ``sample`` (``[n, batch_size, seq_len]``
    int64 inputs, targets shifted by one token) and ``split`` (a fixed test draw).

    Usage::

        data = SyntheticTokens(vocab_size=64, seq_len=32)
        x, y = data.sample(batch_size=8, n=2, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, vocab_size: int = 64, seq_len: int = 32, branching: int = 4, seed: int = 1234) -> None:
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.input_shape = (seq_len,)
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        logits = torch.full((vocab_size, vocab_size), -4.0)
        successors = torch.stack([torch.randperm(vocab_size, generator=g)[:branching] for _ in range(vocab_size)])
        logits.scatter_(1, successors, 0.0)
        self.transition = logits.softmax(-1)

    def sample(self, batch_size: int, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rows = n * batch_size
        tokens = [torch.randint(0, self.vocab_size, (rows,), generator=generator)]
        for _ in range(self.seq_len):
            tokens.append(torch.multinomial(self.transition[tokens[-1]], 1, generator=generator).squeeze(1))
        seq = torch.stack(tokens, dim=1).view(n, batch_size, self.seq_len + 1)
        return seq[..., :-1].contiguous(), seq[..., 1:].contiguous()

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """A fixed draw of 256 sequences standing in for the ``val``/``test`` split (``train`` too)."""
        x, y = self.sample(256, 1, torch.Generator().manual_seed(self.seed + 1))
        return x[0], y[0]

    def to(self, device: str | torch.device) -> SyntheticTokens:
        """Sampling happens on the CPU; batches are moved by the caller."""
        return self
