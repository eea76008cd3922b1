"""Per-layer initialisation against μLO's spec
(docs/reference/mup.md#parametrisation-and-update-scales) and PyTorch defaults for SP."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lopt.models import MuMLP, MuTransformerLM, MuViT

# Std of N(0, 1) truncated to [-2, 2] (no variance correction, as Haiku/Flax do in μLO): ≈ 0.8796.
_PHI2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
TRUNC_STD = math.sqrt(1 - 4 * _PHI2 / math.erf(2 / math.sqrt(2)))


def assert_trunc_normal(t: torch.Tensor, sigma: float, rel: float = 0.04) -> None:
    """Std ≈ 0.88·σ and nothing beyond 2σ."""
    assert t.float().std().item() == pytest.approx(TRUNC_STD * sigma, rel=rel)
    assert t.abs().max().item() <= 2 * sigma * (1 + 1e-6)


def assert_normal(t: torch.Tensor, sigma: float, rel: float = 0.04) -> None:
    """Untruncated: std ≈ σ and about 4.6% of the entries beyond 2σ."""
    assert t.float().std().item() == pytest.approx(sigma, rel=rel)
    assert (t.abs() > 2 * sigma).float().mean().item() == pytest.approx(0.0455, abs=0.015)


def test_trunc_std_constant():
    assert TRUNC_STD == pytest.approx(0.8796, abs=1e-4)


@pytest.mark.parametrize("width", [128, 512])
def test_mup_mlp_init(width):
    model = MuMLP((1, 8, 8), width=width, depth=3, num_classes=10)
    assert_trunc_normal(model.input_layer.weight, 1 / math.sqrt(64))
    for layer in model.hidden_layers:
        assert_trunc_normal(layer.weight, 1 / math.sqrt(width))
    assert torch.count_nonzero(model.readout.weight) == 0
    biases = torch.cat([model.input_layer.bias, *[h.bias for h in model.hidden_layers], model.readout.bias])
    assert biases.std().item() == pytest.approx(1.0, rel=0.12)
    assert biases.mean().item() == pytest.approx(0.0, abs=0.15)


def test_mup_readout_bias_is_standard_normal():
    model = MuMLP(16, width=32, depth=2, num_classes=4000)
    assert model.readout.bias.std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.count_nonzero(model.readout.weight) == 0


@pytest.mark.parametrize("width", [64, 192])
def test_mup_vit_init(width):
    model = MuViT(16, 4, width, depth=2, heads=4, mlp_ratio=4, num_classes=10, in_channels=3)
    sigma = 1 / math.sqrt(width)
    # μLO: patch kernel and position embedding use 1/sqrt(width), not 1/sqrt(C·p²) = 1/sqrt(48).
    assert_trunc_normal(model.patch_embed.weight, sigma, rel=0.06)
    assert_trunc_normal(model.pos_embed, sigma, rel=0.06)
    assert torch.count_nonzero(model.cls_token) == 0
    biases = [model.patch_embed.bias]
    for block in model.blocks:
        attn = block.attn
        for layer in (attn.query, attn.key, attn.value, attn.out, block.mlp.fc1, block.mlp.fc2):
            assert_trunc_normal(layer.weight, sigma)  # fc2 too: μLO's Dense_1 uses 1/sqrt(width)
            biases.append(layer.bias)
        for ln in (block.norm1, block.norm2):
            assert torch.equal(ln.weight, torch.ones(width)) and torch.equal(ln.bias, torch.zeros(width))
    assert torch.equal(model.norm.weight, torch.ones(width)) and torch.equal(model.norm.bias, torch.zeros(width))
    assert torch.cat(biases).std().item() == pytest.approx(1.0, rel=0.06)
    assert torch.count_nonzero(model.readout.weight) == 0


@pytest.mark.parametrize("width", [64, 256])
def test_mup_lm_init(width):
    vocab, seq_len = 2000, 512
    model = MuTransformerLM(vocab_size=vocab, seq_len=seq_len, width=width, depth=2, heads=4)
    assert_normal(model.tok_embed.weight, 1 / math.sqrt(vocab))
    assert_normal(model.pos_embed.weight, 1 / math.sqrt(seq_len))
    biases = []
    for block in model.blocks:
        attn = block.attn
        for layer in (attn.query, attn.key, attn.value, attn.out, block.mlp.fc1):
            assert_normal(layer.weight, 1 / math.sqrt(width), rel=0.06)
            biases.append(layer.bias)
        assert_normal(block.mlp.fc2.weight, 1 / math.sqrt(4 * width), rel=0.06)
        biases.append(block.mlp.fc2.bias)
        assert torch.equal(block.norm1.weight, torch.ones(width))
    assert torch.cat(biases).std().item() == pytest.approx(1.0, rel=0.06)
    assert torch.count_nonzero(model.readout.weight) == 0
    assert model.readout.bias.std().item() == pytest.approx(1.0, rel=0.08)


def test_sp_mlp_uses_pytorch_defaults():
    width = 512
    model = MuMLP(64, width=width, depth=3, num_classes=10, param="sp")
    # nn.Linear default: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)), std 1/sqrt(3·fan_in).
    bound = 1 / math.sqrt(width)
    w = model.hidden_layers[0].weight
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert w.abs().max().item() <= bound
    assert model.hidden_layers[0].bias.abs().max().item() <= bound
    assert torch.count_nonzero(model.readout.weight) > 0  # plain readout, not zero-initialised
    assert type(model.readout) is torch.nn.Linear


def test_sp_vit_and_lm_embeddings():
    vit = MuViT(16, 4, 128, 1, 4, 4, 10, param="sp")
    assert vit.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(vit.cls_token) == 0
    lm = MuTransformerLM(1000, 64, 128, 1, 4, param="sp")
    assert lm.tok_embed.weight.std().item() == pytest.approx(1.0, rel=0.03)  # nn.Embedding default
