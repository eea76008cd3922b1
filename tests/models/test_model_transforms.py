"""Scales and forward survive deepcopy, pickling, state_dict round trips, functional_call and vmap."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from lightning_lopt.models import MuMLP, MuTransformerLM, MuViT, mup_update_scales, param_update_scale

FACTORIES = {
    "mlp": (lambda p: MuMLP((1, 8, 8), 32, 3, 10, param=p), lambda: torch.randn(4, 1, 8, 8)),
    "vit": (lambda p: MuViT(8, 4, 32, 2, 4, 2, 10, param=p), lambda: torch.randn(4, 1, 8, 8)),
    "lm": (lambda p: MuTransformerLM(20, 8, 32, 2, 4, param=p), lambda: torch.randint(0, 20, (4, 8))),
}
PARAMS = ["mup", "sp"]


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised readout weights values so that outputs depend on the whole network."""
    with torch.no_grad():
        model.readout.weight.normal_()
    return model


def assert_same_scales(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert a.update_scales() == b.update_scales()
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert q.lopt_update_scale == p.lopt_update_scale == param_update_scale(q), name


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("kind", FACTORIES)
def test_deepcopy_keeps_scales_shapes_and_forward(kind, param):
    make, data = FACTORIES[kind]
    model = randomized(make(param))
    clone = copy.deepcopy(model)
    assert_same_scales(model, clone)
    if param == "mup":  # mup's infshape is re-attached too, so mup tools keep working on the copy
        assert mup_update_scales(clone) == model.update_scales()
    x = data()
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", FACTORIES)
def test_torch_save_round_trip(kind):
    make, data = FACTORIES[kind]
    model = randomized(make("mup"))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_same_scales(model, loaded)
    x = data()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("kind", FACTORIES)
def test_state_dict_into_fresh_model(kind, param):
    make, data = FACTORIES[kind]
    model = randomized(make(param))
    torch.manual_seed(123)
    fresh = make(param)
    x = data()
    assert not torch.allclose(fresh(x), model(x))
    fresh.load_state_dict(model.state_dict())
    assert_same_scales(model, fresh)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("kind", FACTORIES)
def test_functional_call_with_plain_tensors(kind, param):
    make, data = FACTORIES[kind]
    model = randomized(make(param))
    plain = {name: p.detach().clone() for name, p in model.named_parameters()}  # no infshape, no attrs
    x = data()
    torch.testing.assert_close(functional_call(model, plain, (x,)), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("kind", FACTORIES)
def test_vmap_over_stacked_parameters(kind, param):
    make, data = FACTORIES[kind]
    # float64: vmapped and looped matmuls may block their float32 sums differently (AVX2 vs AVX-512
    # kernels), which moves results by a few float32 ulps; in float64 that is ~1e-15 relative.
    models = [randomized(make(param)).double() for _ in range(3)]
    stacked, _ = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = data()
    x = x.double() if x.is_floating_point() else x
    out = vmap(lambda p: functional_call(skeleton, p, (x,)))(stacked)  # training mode, randomness="error"
    ref = torch.stack([m(x) for m in models])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # Gradients through the vmapped call, as PES particles need.
    grads = vmap(torch.func.grad(lambda p: functional_call(skeleton, p, (x,)).square().mean()))(stacked)
    assert all(torch.isfinite(g).all() for g in grads.values())
