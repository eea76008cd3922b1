"""At initialisation, μP keeps coordinates O(1) as width grows (the coordinate check at t=1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lopt.models import MuMLP, MuTransformerLM, MuViT


def output_rms(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
    stats: dict[str, float] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _a, out, name=name: stats.__setitem__(name, out.pow(2).mean().sqrt().item()))
        for name, m in modules.items()
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return stats


def assert_flat_in_width(per_width: dict[int, dict[str, float]], max_ratio: float) -> None:
    for name in next(iter(per_width.values())):
        values = [stats[name] for stats in per_width.values()]
        assert max(values) / min(values) < max_ratio, (name, values)


def test_mlp_preactivations_are_width_independent():
    x = torch.randn(256, 64)
    per_width = {}
    for width in (64, 256, 1024):
        model = MuMLP(64, width, 3, 10)
        layers = {"input": model.input_layer, **{f"hidden{i}": m for i, m in enumerate(model.hidden_layers)}}
        per_width[width] = output_rms(model, layers, x)
    assert_flat_in_width(per_width, max_ratio=1.25)
    # Sanity: these are O(1) numbers, not all tiny or huge.
    assert all(0.3 < v < 3 for stats in per_width.values() for v in stats.values())


def test_sp_readout_output_grows_relative_to_mup():
    """Correlated readout weights (what training produces) give O(1) logits only with the 1/fan_in multiplier."""
    x = torch.randn(128, 64)
    means = {}
    for param in ("mup", "sp"):
        means[param] = []
        for width in (64, 1024):
            model = MuMLP(64, width, 2, 1, param=param)
            with torch.no_grad():
                model.readout.weight.fill_(1.0)
                model.readout.bias.zero_()
                means[param].append(model(x).abs().mean().item())
    assert means["mup"][1] / means["mup"][0] == pytest.approx(1.0, rel=0.2)
    assert means["sp"][1] / means["sp"][0] > 8  # grows like width (16x here)


@pytest.mark.parametrize("kind", ["vit", "lm"])
def test_transformer_activations_are_width_independent(kind):
    per_width = {}
    for width in (128, 256, 512):
        if kind == "vit":
            model = MuViT(8, 2, width, 2, 4, 2, 10)
            x = torch.randn(16, 1, 8, 8)
        else:
            model = MuTransformerLM(64, 16, width, 2, 4)
            x = torch.randint(0, 64, (16, 16))
        modules = {}
        for i, block in enumerate(model.blocks):
            modules.update(
                {f"{i}.q": block.attn.query, f"{i}.attn": block.attn, f"{i}.fc1": block.mlp.fc1, f"{i}.mlp": block.mlp}
            )
        per_width[width] = output_rms(model, modules, x)
    assert_flat_in_width(per_width, max_ratio=1.4)
