"""The torch.optim wrappers on the fused path: the same steps as the pure path, the fallback, bf16 state.

Like ``test_fused.py``, updates are compared in lockstep (both optimizers restart every step from
the pure one's parameters and state) within 1e-5 of the largest update plus one ulp of the result.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from lightning_lopt.optim import bf16_state, fast_steps, fused, tensor_step
from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt, VeLOLOpt
from lightning_lopt.optim.fused import build
from lightning_lopt.optim.learned import GLOBAL_STATE_KEY
from lightning_lopt.optim.optimizers import LO, Celo, MuLO, VeLO

SHAPES = [(), (5,), (6, 4), (3, 4, 5), (4, 3, 3, 3), (40, 40)]
MU_SCALES = [1.0, 1.0, 1 / 4, 1 / 4, 1 / 3, 1 / 40]
NUM_STEPS = 20

CASES = {
    "lo": (LO, lambda: SmallFCLOpt(step_mult=0.001), {}),
    "mulo": (MuLO, lambda: SmallFCLOpt(), {}),
    "celo": (Celo, lambda: CeloLOpt(lstm_hidden_size=8), {"num_steps": NUM_STEPS}),
}


def make_params(dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter((scale * torch.randn(s, generator=g)).to(dtype)) for s in SHAPES]
    for p, s in zip(params, MU_SCALES):
        p.lopt_update_scale = s
    return params


def grads_for(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [0.1 * torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def build_opt(name, params, **overrides):
    cls, make, kwargs = CASES[name]
    torch.manual_seed(0)
    return cls(params, meta_weights=make(), **{**kwargs, **overrides})


def step(opt, params, t):
    for p, g in zip(params, grads_for(params, t)):
        p.grad = g.clone()
    opt.step(loss=torch.tensor(2.3 - 0.1 * t))


def assert_step_close(new, ref, old, what):
    for k, (a, b, p0) in enumerate(zip(new, ref, old)):
        da, db = (a.detach() - p0).float(), (b.detach() - p0).float()
        scale = db.abs().max()
        # Both paths round p0 + Δ to p's dtype: Δs that agree to 1e-5 may still round one ulp of the
        # result apart.
        ulp = torch.finfo(a.dtype).eps * torch.maximum(a.detach().abs(), b.detach().abs()).float()
        excess = ((da - db).abs() - ulp).clamp_min(0).max()
        assert excess <= 1e-5 * scale, f"{what}: tensor {k}: {float(excess / scale):.2e}"
        if a.dtype != torch.float32:
            # The comparison only means something if the step is much larger than the ulp allowance
            # (with p ~ N(0, 1) one bf16 ulp of p covered Celo's whole update, so a step that did
            # nothing passed): the test's parameters are scaled so that this holds.
            assert float(ulp.median()) < 0.1 * float(db.abs().median()), f"{what}: tensor {k}: step below the bf16 ulp"


def lockstep(name, steps=6, dtype=torch.float32, param_scale=1.0, **kwargs):
    """Run the fused and the pure optimizer side by side, resynchronising after every step."""
    pure_params, fused_params = make_params(dtype, scale=param_scale), make_params(dtype, scale=param_scale)
    pure = build_opt(name, pure_params, fused=False, **kwargs)
    fast = build_opt(name, fused_params, fused=True, **kwargs)
    for t in range(steps):
        old = [p.detach().clone() for p in pure_params]
        step(pure, pure_params, t)
        step(fast, fused_params, t)
        assert_step_close(fused_params, pure_params, old, f"{name} step {t}")
        with torch.no_grad():
            for f, p in zip(fused_params, pure_params):
                f.copy_(p)
        fast.load_state_dict(pure.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_fused_optimizer_steps_match_the_pure_path(name):
    lockstep(name, lr=0.5, weight_decay=0.1)


# One bf16 ulp of p is 2^-7 of |p|. LO's untrained step is ~5e-5 whatever p is: parameters of size
# 1e-6 put it far above the ulp. Celo's untrained step is ~3e-6 of |p| (rounded away entirely in
# bf16): lr 1e6 makes it a few |p|.
@pytest.mark.parametrize(("name", "setup"), [("lo", {"param_scale": 1e-6}), ("celo", {"lr": 1e6})])
def test_bf16_params_on_the_fused_path(name, setup):
    lockstep(name, steps=3, dtype=torch.bfloat16, **setup)


def test_fused_is_the_default_on_cpu_float32():
    params = make_params()
    opt = build_opt("mulo", params)
    step(opt, params, 0)
    grads = [p.grad for p in params]
    chosen = tensor_step.resolve(opt.meta_weights, params, grads, tensor_step.StepOptions("MuLO"))
    assert chosen is fast_steps.FUSED_CPU
    # In place: the accumulators are the same tensors after the next step.
    before = opt.state[params[2]]["m"]
    step(opt, params, 1)
    assert opt.state[params[2]]["m"] is before


def test_skipped_and_late_parameters():
    params = make_params()
    opt = build_opt("mulo", params)
    reference = make_params()
    ref_opt = build_opt("mulo", reference, fused=False)
    active = [0, 1, 3, 4, 5]
    for t in range(2):
        for o, ps in ((opt, params), (ref_opt, reference)):
            for i, p in enumerate(ps):
                p.grad = grads_for(ps, t)[i].clone() if i in active else None
            o.step()
    assert not opt.state.get(params[2])
    old = [p.detach().clone() for p in reference]
    step(opt, params, 2)
    step(ref_opt, reference, 2)
    assert_step_close(params, reference, old, "late parameter")
    assert int(opt.state[GLOBAL_STATE_KEY]["iteration"]) == 3


@pytest.mark.parametrize("name", CASES)
def test_fused_state_dict_resume_is_bit_exact(name):
    straight = make_params()
    opt = build_opt(name, straight)
    for t in range(5):
        step(opt, straight, t)
    first = make_params()
    opt = build_opt(name, first)
    for t in range(3):
        step(opt, first, t)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_params()
    with torch.no_grad():
        for r, f in zip(resumed, first):
            r.copy_(f)
    opt = build_opt(name, resumed)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    for t in range(3, 5):
        step(opt, resumed, t)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_fused_true_where_it_cannot_run():
    with pytest.raises(ValueError, match="fused=True"):
        VeLO(make_params(), num_steps=10, meta_weights=VeLOLOpt(lstm_hidden_size=8, param_inits=4), fused=True)
    params = make_params(torch.float64)
    opt = build_opt("mulo", params, fused=True)
    with pytest.raises(RuntimeError, match="CPU float32 only"):
        step(opt, params, 0)


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path):
    """No compiler: one RuntimeWarning, then the pure step (bit for bit); fused=True raises."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LIGHTNING_LOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(fused, "_FAILURE", [])
    params, reference = make_params(), make_params()
    opt = build_opt("mulo", params)
    ref_opt = build_opt("mulo", reference, fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(3):
            step(opt, params, t)
            step(ref_opt, reference, t)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "fused CPU learned-optimizer step is unavailable" in messages[0]
    assert all(torch.equal(a, b) for a, b in zip(params, reference))
    strict_params = make_params()
    strict = build_opt("mulo", strict_params, fused=True)
    with pytest.raises(RuntimeError, match="no usable C compiler"):
        step(strict, strict_params, 0)


# -- bf16 state -----------------------------------------------------------------------------------


def test_bf16_state_is_8_bytes_per_parameter():
    params = [nn.Parameter(torch.randn(256, 128))]
    params[0].lopt_update_scale = 1.0
    opt = MuLO(params, meta_weights=SmallFCLOpt(), state_dtype=torch.bfloat16)
    step(opt, params, 0)
    acc = opt.state[params[0]]
    assert acc["m"].dtype == acc["rms"].dtype == torch.bfloat16
    assert acc["v_row"].dtype == acc["v_col"].dtype == torch.float32
    per_element = (acc["m"].nbytes + acc["rms"].nbytes) / params[0].numel()
    assert per_element == 8


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_stalls():
    """An EMA with decay 0.999 stored in bf16: round-to-nearest freezes it at a third of its target."""
    target = torch.rand(4096) + 0.5
    exact = torch.zeros(4096)
    nearest = torch.zeros(4096, dtype=torch.bfloat16)
    stochastic = torch.zeros(4096, dtype=torch.bfloat16)
    for t in range(3000):
        exact = 0.999 * exact + 0.001 * target
        nearest = (0.999 * nearest.float() + 0.001 * target).to(torch.bfloat16)
        stochastic = bf16_state.round_to_bf16(
            0.999 * stochastic.float() + 0.001 * target, bf16_state.tensor_key(t, 0), channels=1, first_channel=3
        )
    rel = lambda x: float(((x.float() - exact) / exact).mean())
    assert abs(rel(stochastic)) < 0.01
    assert rel(nearest) < -0.2


def test_bf16_state_tracks_float32_state_over_a_long_run():
    """1000 steps of stationary noisy gradients: bf16 accumulators stay within 8% of the float32 ones
    (stochastic rounding noise; round-to-nearest is off by more than 20% here)."""

    def run(state_dtype, fused_step):
        params = [nn.Parameter(torch.zeros(32, 48)), nn.Parameter(torch.zeros(48))]
        for p in params:
            p.lopt_update_scale = 1.0
        meta = SmallFCLOpt(generator=torch.Generator().manual_seed(1))
        opt = MuLO(params, meta_weights=meta, state_dtype=state_dtype, fused=fused_step)
        g = torch.Generator().manual_seed(2)
        base = [torch.randn(p.shape, generator=g) for p in params]
        for _ in range(1000):
            for p, b in zip(params, base):
                p.grad = b * (1 + 0.3 * torch.randn(p.shape, generator=g))
            opt.step()
        return [{k: v.float() for k, v in opt.state[p].items()} for p in params]

    reference = run(torch.float32, True)
    for fused_step in (True, False):
        state = run(torch.bfloat16, fused_step)
        for acc, ref in zip(state, reference):
            for key in ("m", "rms"):
                err = float((acc[key] - ref[key]).norm() / ref[key].norm())
                assert err < 0.08, f"fused={fused_step} {key}: {err:.3f}"


def test_fused_and_pure_bf16_rounding_agree():
    """Both paths draw the same random bits: from the same state, the stored bf16 values agree
    except where the two float32 values straddle a rounding threshold."""
    fused_params, pure_params = make_params(), make_params()
    fast = build_opt("mulo", fused_params, state_dtype=torch.bfloat16)
    pure = build_opt("mulo", pure_params, state_dtype=torch.bfloat16, fused=False)
    for t in range(3):
        step(fast, fused_params, t)
        step(pure, pure_params, t)
    total = differ = 0
    for f, p in zip(fused_params, pure_params):
        for key in ("m", "rms"):
            a, b = fast.state[f][key].float(), pure.state[p][key].float()
            total += a.numel()
            differ += int((a != b).sum())
    assert differ <= max(2, total // 500), f"{differ} of {total} bf16 entries differ"
