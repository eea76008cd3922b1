"""Tests of lightning_lopt.models.build: one constructor per model kind."""

from __future__ import annotations

import pytest
import torch

from lightning_lopt import models
from lightning_lopt.datamodules import SyntheticTokens


@pytest.mark.parametrize(
    ("kind", "cls", "out"),
    [("mlp", models.MuMLP, 10), ("ae", models.MuMLP, 64), ("vit", models.MuViT, 10), ("conv", models.ConvNet, 10)],
)
def test_image_kinds_are_sized_by_their_data(kind: str, cls: type, out: int) -> None:
    net = models.build(kind, 8, 2, "sp", input_shape=(1, 8, 8), num_classes=10, heads=2)
    assert type(net) is cls
    assert net(torch.randn(3, 1, 8, 8)).reshape(3, -1).shape == (3, out)


def test_the_lm_reads_its_sizes_from_the_data_and_keywords_win() -> None:
    data = SyntheticTokens(vocab_size=16, seq_len=12)
    net = models.build("lm", 8, 1, "mup", data=data, heads=2, seq_len=6)
    assert type(net) is models.MuTransformerLM
    assert net.seq_len == 6 and net.tok_embed.num_embeddings == 16
    assert net(torch.zeros(2, 6, dtype=torch.long)).shape == (2, 6, 16)


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        ("cnn", {}, "unknown model kind 'cnn'"),
        ("mlp", {"input_shape": (1, 8, 8)}, "missing ['num_classes'], which the mlp model is sized by"),
        ("lm", {"data": object()}, "object lacks ['vocab_size', 'seq_len']"),
        ("vit", {"input_shape": (64,), "num_classes": 10}, "[C, H, W]"),
    ],
)
def test_bad_kinds_and_missing_sizes_are_named(kind: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        models.build(kind, 8, 2, **kwargs)
    assert message in str(err.value)
