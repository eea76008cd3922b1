"""Meta-weight modules: θ layout, meta-initialisation, configuration and the Haiku import."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt, VeLOLOpt
from lightning_lopt.optim.functional import StepContext

SMALL = {
    "small_fc": lambda **kw: SmallFCLOpt(**kw),
    "celo": lambda **kw: CeloLOpt(lstm_hidden_size=8, **kw),
    "velo": lambda **kw: VeLOLOpt(lstm_hidden_size=8, param_inits=4, **kw),
}


@pytest.mark.parametrize("name", SMALL)
def test_state_dict_is_theta_and_step_matches_pure_step(name):
    module = SMALL[name]()
    assert list(module.state_dict()) == list(module.theta())
    params = [torch.randn(4, 3), torch.randn(3)]
    grads = [torch.randn(4, 3), torch.randn(3)]
    ctx = StepContext([1.0, 1.0], torch.tensor(1.5), 10)
    with torch.no_grad():
        a, _ = module.step(params, grads, module.init_state(params), ctx)
        theta = dict(module.state_dict())
        b, _ = module.pure_step(theta, params, grads, module.functional.init_state(theta, params), ctx)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_meta_parameter_counts():
    assert SmallFCLOpt().num_meta_params() == 2409
    assert CeloLOpt().num_meta_params() == 35_808  # docs/reference/celo.md#meta-parameters: 37,089 stored − 1,281 dead
    h, k = 512, 256
    velo = (30 * h + h) * 2 + (2 * h * 4 * h + 4 * h) + 2 * h + (h + 1) + (h * k + k) + k * 159
    assert VeLOLOpt().num_meta_params() == velo
    assert (
        VeLOLOpt.mu().num_meta_params()
        == (30 * 16 + 16) * 2 + (32 * 64 + 64) + 32 + 17 + (16 * 8 + 8) + 8 * 159
    )


def test_meta_init_is_haiku_truncated_normal():
    module = VeLOLOpt()
    w = module.scheduler.lstm.weight  # [2048, 1024]: fan_in 1024
    sigma = 1 / math.sqrt(1024)
    assert w.abs().max() <= 2 * sigma
    # N(0, σ²) cut at ±2σ without rescaling has std ≈ 0.8796σ (docs/reference/small_fc.md#meta-parameters-and-decays,
    # docs/reference/small_fc.md#meta-initialisation).
    assert abs(w.std().item() / sigma - 0.8796) < 0.01
    for name, p in module.named_parameters():
        if name.endswith("bias") or "init_" in name:
            assert torch.count_nonzero(p) == 0, name
    lo = SmallFCLOpt()
    assert lo.mlp[0].weight.abs().max() <= 2 / math.sqrt(39)
    assert lo.mlp[2].weight.abs().max() <= 2 / math.sqrt(32)
    for offsets in (lo.momentum_decays, lo.rms_decays, lo.adafactor_decays):
        assert torch.count_nonzero(offsets) == 0
    celo = CeloLOpt()
    assert celo.mlp[0].weight.abs().max() <= 2 / math.sqrt(30)
    assert celo.mlp[1].weight.abs().max() <= 2 / math.sqrt(4)


def test_meta_init_is_reproducible_from_a_generator():
    a = CeloLOpt(generator=torch.Generator().manual_seed(3))
    b = CeloLOpt(generator=torch.Generator().manual_seed(3))
    c = CeloLOpt(generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.mlp[0].weight, c.mlp[0].weight)


def test_configs():
    mu = VeLOLOpt.mu()
    assert mu.config == {
        "lstm_hidden_size": 16,
        "param_inits": 8,
        "interp_mult": 1.0,
        "param_scale_mult": False,
        "layout": "torch",
    }
    assert VeLOLOpt(lstm_hidden_size=4, param_inits=2).step_config == {
        "interp_mult": 100.0,
        "param_scale_mult": True,
        "layout": "torch",
    }
    assert SmallFCLOpt(step_mult=0.001).step_config == {
        "step_mult": 0.001,
        "exp_mult": 1e-3,
        "layout": "torch",
    }
    assert CeloLOpt(train_phase=1).step_config == {"train_phase": 1, "layout": "torch"}
    with pytest.raises(ValueError, match="layout"):
        SmallFCLOpt(layout="tf")
    with pytest.raises(ValueError, match="train_phase"):
        CeloLOpt(train_phase=3)


def _to_haiku(module: CeloLOpt) -> dict[str, np.ndarray]:
    """The reference's θ layout (docs/reference/celo.md#meta-parameters), written independently for the test."""
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    channels = [1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3]
    w0 = sd["mlp.0.weight"].T  # (30, 4)
    out, start = {}, 0
    for k, ch in enumerate(channels):
        out[f"ff_mod_stack/~/w0__{k}"] = w0[None, start : start + ch]
        start += ch
    for k in range(3):
        if k:
            out[f"ff_mod_stack/~/w{k}"] = sd[f"mlp.{k}.weight"].T[None]
        out[f"ff_mod_stack/~/b{k}"] = sd[f"mlp.{k}.bias"][None]
    for haiku, ours in [
        ("linear_1", "mix"),
        ("linear_2", "direct"),
        ("rnn/linear", "lstm"),
        ("step_size", "step_size"),
    ]:
        out[f"rnn_params/{haiku}/w"] = sd[f"scheduler.{ours}.weight"].T
        out[f"rnn_params/{haiku}/b"] = sd[f"scheduler.{ours}.bias"]
    h = sd["scheduler.init_hidden"].shape[0]
    out["rnn_params/linear/w"], out["rnn_params/linear/b"] = np.ones((18, h)), np.ones(h)  # dead
    out["rnn_params/rnn_to_controls/w"], out["rnn_params/rnn_to_controls/b"] = np.ones((h, 1)), np.ones(1)
    out["lstm_init_state/hidden"] = sd["scheduler.init_hidden"][None]
    out["lstm_init_state/cell"] = sd["scheduler.init_cell"][None]
    return out


def test_celo_from_haiku_round_trip():
    src = CeloLOpt(lstm_hidden_size=8)
    with torch.no_grad():
        src.scheduler.init_hidden.normal_()
    got = CeloLOpt.from_haiku(_to_haiku(src), layout="jax")
    assert got.config == {"lstm_hidden_size": 8, "train_phase": 2, "layout": "jax"}
    for k, v in src.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    broken = _to_haiku(src)
    del broken["rnn_params/step_size/w"]
    with pytest.raises(KeyError, match="step_size"):
        CeloLOpt.from_haiku(broken)
