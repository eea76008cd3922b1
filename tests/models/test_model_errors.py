"""Bad arguments raise ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

from lightning_lopt.models import MuMLP, MuTransformerLM, MuViT

MLP = dict(in_shape=(1, 8, 8), width=32, depth=2, num_classes=10)
VIT = dict(image_size=8, patch_size=2, width=32, depth=2, heads=4, mlp_ratio=4, num_classes=10)
LM = dict(vocab_size=50, seq_len=16, width=32, depth=2, heads=4)


@pytest.mark.parametrize(
    "cls,base,override,match",
    [
        (MuMLP, MLP, dict(width=0), "width"),
        (MuMLP, MLP, dict(width=-4), "width"),
        (MuMLP, MLP, dict(width=32.0), "width"),
        (MuMLP, MLP, dict(depth=0), "depth"),
        (MuMLP, MLP, dict(num_classes=0), "num_classes"),
        (MuMLP, MLP, dict(in_shape=(1, 0, 8)), "in_shape"),
        (MuMLP, MLP, dict(in_shape=()), "in_shape"),
        (MuMLP, MLP, dict(param="ntk"), "param"),
        (MuMLP, MLP, dict(output_mult=0.0), "output_mult"),
        (MuMLP, MLP, dict(param="sp", output_mult=2.0), "output_mult"),
        (MuViT, VIT, dict(patch_size=3), "patch_size"),
        (MuViT, VIT, dict(image_size=(8, 6), patch_size=4), "patch_size"),
        (MuViT, VIT, dict(image_size=(8, 8, 8)), "image_size"),
        (MuViT, VIT, dict(heads=5), "heads"),
        (MuViT, VIT, dict(heads=0), "heads"),
        (MuViT, VIT, dict(width=-32), "width"),
        (MuViT, VIT, dict(depth=0), "depth"),
        (MuViT, VIT, dict(mlp_ratio=0), "mlp_ratio"),
        (MuViT, VIT, dict(mlp_ratio=0.01), "mlp_ratio"),
        (MuViT, VIT, dict(num_classes=0), "num_classes"),
        (MuViT, VIT, dict(in_channels=0), "in_channels"),
        (MuViT, VIT, dict(param="SP"), "param"),
        (MuTransformerLM, LM, dict(vocab_size=0), "vocab_size"),
        (MuTransformerLM, LM, dict(seq_len=0), "seq_len"),
        (MuTransformerLM, LM, dict(width=30), "heads"),
        (MuTransformerLM, LM, dict(depth=-1), "depth"),
        (MuTransformerLM, LM, dict(dropout=1.0), "dropout"),
        (MuTransformerLM, LM, dict(dropout=-0.1), "dropout"),
        (MuTransformerLM, LM, dict(param=None), "param"),
    ],
)
def test_bad_arguments(cls, base, override, match):
    with pytest.raises(ValueError, match=match):
        cls(**{**base, **override})


def test_lm_rejects_sequences_longer_than_seq_len():
    model = MuTransformerLM(**LM)
    with pytest.raises(ValueError, match="seq_len=16"):
        model(torch.randint(0, 50, (2, 17)))


def test_sequence_arguments_from_yaml_lists_are_accepted():
    assert MuMLP(in_shape=[1, 8, 8], width=8, depth=1, num_classes=2)(torch.randn(3, 64)).shape == (3, 2)
    assert MuViT(**{**VIT, "image_size": [8, 4]})(torch.randn(2, 1, 8, 4)).shape == (2, 10)
