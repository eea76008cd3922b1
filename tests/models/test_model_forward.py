"""Forward passes against independent references: readout multiplier, attention scale, full models."""

from __future__ import annotations

import math

import mup
import pytest
import torch
import torch.nn.functional as F

from lightning_lopt.models import MuLOReadout, MuMLP, MuTransformerLM, MuViT


def readout_input(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features entering the readout, logits)."""
    seen = []
    handle = model.readout.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    logits = model(x)
    handle.remove()
    return seen[0], logits


# name -> (model factory taking keyword arguments, input factory, width)
CASES = {
    "mlp": (lambda **kw: MuMLP((1, 8, 8), 64, 3, 10, **kw), lambda: torch.randn(5, 1, 8, 8), 64),
    "vit": (lambda **kw: MuViT(8, 2, 48, 2, 4, 4, 10, **kw), lambda: torch.randn(5, 1, 8, 8), 48),
    "lm": (lambda **kw: MuTransformerLM(40, 12, 32, 2, 4, **kw), lambda: torch.randint(0, 40, (5, 12)), 32),
}


@pytest.mark.parametrize("case", CASES)
def test_mup_logits_at_init_are_bias_over_fan_in(case):
    make, data, width = CASES[case]
    model = make(param="mup")
    logits = model(data())
    # Zero readout weight: the input-dependent part of the logits is exactly zero; what remains is
    # μLO's N(0, 1) readout bias times 1/fan_in, identical for every example and position.
    flat = logits.reshape(-1, logits.shape[-1])
    assert torch.equal(flat, flat[:1].expand_as(flat))
    torch.testing.assert_close(flat[0], model.readout.bias / width, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("output_mult", [1.0, 2.5])
def test_mup_readout_is_whole_output_over_fan_in(case, output_mult):
    make, data, width = CASES[case]
    model = make(param="mup", output_mult=output_mult)
    with torch.no_grad():
        model.readout.weight.normal_()
        model.readout.bias.normal_()
    h, logits = readout_input(model, data())
    ref = (h @ model.readout.weight.T + model.readout.bias) * output_mult / width
    torch.testing.assert_close(logits, ref)


@pytest.mark.parametrize("case", CASES)
def test_sp_readout_is_plain_linear(case):
    make, data, _ = CASES[case]
    model = make(param="sp")
    h, logits = readout_input(model, data())
    torch.testing.assert_close(logits, h @ model.readout.weight.T + model.readout.bias)


def test_mulo_readout_scales_bias_unlike_mup_readout():
    """μLO multiplies the bias too; mup's MuReadout does not
    (docs/reference/pylo.md#readout-bias-in-pylos-mup-fork, measured at 64)."""
    ours, theirs = MuLOReadout(64, 3), mup.MuReadout(64, 3)
    for layer in (ours, theirs):
        mup.set_base_shapes(layer, {"weight": [3, 1], "bias": [3]}, rescale_params=False)
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.fill_(1.0)
    x = torch.randn(2, 64)
    torch.testing.assert_close(ours(x), torch.full((2, 3), 1 / 64))
    torch.testing.assert_close(theirs(x), torch.ones(2, 3))


def test_mup_mlp_matches_reference_forward():
    model = MuMLP((1, 4, 4), 32, 3, 5)
    with torch.no_grad():
        model.readout.weight.normal_()
    x = torch.randn(7, 1, 4, 4)
    h = x.reshape(7, 16)
    for layer in [model.input_layer, *model.hidden_layers]:
        h = torch.relu(h @ layer.weight.T + layer.bias)
    ref = (h @ model.readout.weight.T + model.readout.bias) / 32
    torch.testing.assert_close(model(x), ref)


def reference_attention(attn: torch.nn.Module, x: torch.Tensor, heads: int, scale: float, causal: bool) -> torch.Tensor:
    b, t, d = x.shape

    def split(layer: torch.nn.Module) -> torch.Tensor:
        return (x @ layer.weight.T + layer.bias).reshape(b, t, heads, d // heads).permute(0, 2, 1, 3)

    q, k, v = split(attn.query), split(attn.key), split(attn.value)
    logits = q @ k.transpose(-1, -2) * scale
    if causal:
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    y = (logits.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, t, d)
    return y @ attn.out.weight.T + attn.out.bias


@pytest.mark.parametrize("param", ["mup", "sp"])
@pytest.mark.parametrize("kind", ["vit", "lm"])
def test_attention_scale(kind, param):
    width, heads = 64, 4
    d_head = width // heads
    if kind == "vit":
        model = MuViT(8, 2, width, 1, heads, 4, 10, param=param)
    else:
        model = MuTransformerLM(30, 8, width, 1, heads, param=param)
    x = torch.randn(3, 8, width) * 3  # large inputs make the 1/d vs 1/sqrt(d) difference visible
    scale = 1 / d_head if param == "mup" else 1 / math.sqrt(d_head)
    attn = model.blocks[0].attn
    ref = reference_attention(attn, x, heads, scale, causal=kind == "lm")
    torch.testing.assert_close(attn(x), ref, rtol=1e-4, atol=1e-4)
    wrong = reference_attention(attn, x, heads, 1 / math.sqrt(d_head) if param == "mup" else 1 / d_head, kind == "lm")
    assert not torch.allclose(attn(x), wrong, rtol=1e-3, atol=1e-3)


def reference_block(block: torch.nn.Module, h: torch.Tensor, heads: int, scale: float, causal: bool) -> torch.Tensor:
    def ln(m: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(z, z.shape[-1:], m.weight, m.bias, m.eps)

    h = h + reference_attention(block.attn, ln(block.norm1, h), heads, scale, causal)
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    z = ln(block.norm2, h) @ fc1.weight.T + fc1.bias
    z = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))  # tanh GELU (jax default)
    return h + z @ fc2.weight.T + fc2.bias


def test_mup_vit_matches_reference_forward():
    width, heads, patch = 32, 2, 4
    model = MuViT(8, patch, width, 2, heads, 2, 6, in_channels=3)
    with torch.no_grad():
        model.readout.weight.normal_()
        model.cls_token.normal_()
    x = torch.randn(4, 3, 8, 8)
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, C, 2, 2, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(4, 4, 3 * patch * patch)
    h = patches @ model.patch_embed.weight.reshape(width, -1).T + model.patch_embed.bias
    h = torch.cat([model.cls_token.expand(4, 1, width), h], 1) + model.pos_embed
    for block in model.blocks:
        h = reference_block(block, h, heads, 1 / (width // heads), causal=False)
    h = F.layer_norm(h[:, 0], (width,), model.norm.weight, model.norm.bias, 1e-6)
    ref = (h @ model.readout.weight.T + model.readout.bias) / width
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x.flatten(1)), model(x))  # flattened images are accepted


def test_mup_lm_matches_reference_forward():
    vocab, seq_len, width, heads = 30, 10, 32, 4
    model = MuTransformerLM(vocab, seq_len, width, 2, heads)
    with torch.no_grad():
        model.readout.weight.normal_()
    x = torch.randint(0, vocab, (3, 7))  # shorter than seq_len
    h = model.tok_embed.weight[x] + model.pos_embed.weight[:7]
    for block in model.blocks:
        h = reference_block(block, h, heads, 1 / (width // heads), causal=True)
    h = F.layer_norm(h, (width,), model.norm.weight, model.norm.bias, 1e-5)
    ref = (h @ model.readout.weight.T + model.readout.bias) / width
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_lm_dropout_is_off_by_default_and_on_when_asked():
    x = torch.randint(0, 30, (4, 8))
    model = MuTransformerLM(30, 8, 32, 2, 4)
    with torch.no_grad():
        model.readout.weight.normal_()
    assert model.training
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    noisy = MuTransformerLM(30, 8, 32, 2, 4, dropout=0.5)
    with torch.no_grad():
        noisy.readout.weight.normal_()
    assert not torch.allclose(noisy(x), noisy(x))
    noisy.eval()
    torch.testing.assert_close(noisy(x), noisy(x), rtol=0, atol=0)
