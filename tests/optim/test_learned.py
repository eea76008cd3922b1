"""The torch.optim learned optimizers against the pure functional core they wrap.

The core's own numerics (against the reference implementations) are tested elsewhere; here every
optimizer step must equal the pure step on the same inputs, bit for bit, and the wrapper's own
behaviour (dtypes, skipped parameters, state_dict, loss handling, errors) is checked. The optimizers
are built with ``fused=False`` (the pure path); the fused path has its own tests
(``test_fused_optimizers.py``).
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from lightning_lopt import optim
from lightning_lopt.optim import pretrained
from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt, VeLOLOpt
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.learned import GLOBAL_STATE_KEY, LearnedOptimizer
from lightning_lopt.optim.optimizers import LO, Celo, MuLO, MuVeLO, VeLO

# Ranks 0 to 4; the rank-4 tensor is a Conv2d weight (OIHW), the rank-3 one a Conv1d weight.
SHAPES = [(), (5,), (6, 4), (3, 4, 5), (4, 3, 3, 3)]
MU_SCALES = [1.0, 1.0, 1 / 4, 1 / 4, 1 / 3]
NUM_STEPS = 20

# name -> (optimizer class, small meta-weights, constructor keywords)
CASES = {
    "lo": (LO, lambda: SmallFCLOpt(step_mult=0.001), {}),
    "mulo": (MuLO, lambda: SmallFCLOpt(), {}),
    "celo": (Celo, lambda: CeloLOpt(lstm_hidden_size=8), {"num_steps": NUM_STEPS}),
    "velo": (VeLO, lambda: VeLOLOpt(lstm_hidden_size=8, param_inits=4), {"num_steps": NUM_STEPS}),
    "muvelo": (MuVeLO, lambda: VeLOLOpt.mu(), {"num_steps": NUM_STEPS}),
}


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0, mu: bool = True) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    if mu:
        for p, s in zip(params, MU_SCALES):
            p.lopt_update_scale = s
    return params


def grads_for(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) * 0.1 for p in params]


def loss_at(step: int) -> torch.Tensor:
    return torch.tensor(2.3 - 0.1 * step)


def build(name: str, params, **overrides) -> tuple[LearnedOptimizer, nn.Module]:
    cls, make, kwargs = CASES[name]
    torch.manual_seed(0)
    module = make()
    return cls(params, meta_weights=module, **{"fused": False, **kwargs, **overrides}), module


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def ordered(opt: LearnedOptimizer) -> list[nn.Parameter]:
    """The parameters in the optimizer's order (μ variants group them by scale)."""
    return [p for group in opt.param_groups for p in group["params"]]


def reference_run(module, opt, params, initial, steps, *, lr=1.0, weight_decay=0.0):
    """The pure functional core from ``initial`` (values of ``params``), in the optimizer's order."""
    order = [next(i for i, q in enumerate(params) if q is p) for p in ordered(opt)]
    scale_of = {id(p): g["update_scale"] for g in opt.param_groups for p in g["params"]}
    scales = [scale_of[id(params[i])] * lr for i in order]
    theta = dict(module.state_dict())
    current = [initial[i] for i in order]
    state = module.functional.init_state(theta, current)
    for t in range(steps):
        grads = grads_for(params, t)
        ctx = StepContext(scales, loss_at(t), NUM_STEPS if opt.needs_loss else 0)
        new, state = module.pure_step(theta, current, [grads[i] for i in order], state, ctx)
        current = [n - lr * weight_decay * c if weight_decay else n for n, c in zip(new, current)]
    by_index = dict(zip(order, current))
    return [by_index[i] for i in range(len(params))], state


def run_optimizer(opt, params, steps, start=0):
    for t in range(start, start + steps):
        set_grads(params, grads_for(params, t))
        opt.step(loss=loss_at(t))


@pytest.mark.parametrize("name", CASES)
def test_step_equals_the_pure_functional_step(name):
    params = make_params(mu=CASES[name][0].mu)
    opt, module = build(name, params)
    initial = [p.detach().clone() for p in params]
    run_optimizer(opt, params, 3)
    expected, state = reference_run(module, opt, params, initial, 3)
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e), name
    assert int(opt.state[GLOBAL_STATE_KEY]["iteration"]) == 3
    for p, acc in zip(ordered(opt), state["tensors"]):
        assert opt.state[p].keys() == acc.keys()
        assert all(torch.equal(opt.state[p][k], acc[k]) for k in acc)
    assert opt.last_loss == pytest.approx(float(loss_at(2)))


@pytest.mark.parametrize("name", ["mulo", "celo"])
def test_lr_multiplies_the_step_and_weight_decay_is_decoupled(name):
    params = make_params()
    opt, module = build(name, params, lr=0.5, weight_decay=0.1)
    initial = [p.detach().clone() for p in params]
    run_optimizer(opt, params, 2)
    expected, _ = reference_run(module, opt, params, initial, 2, lr=0.5, weight_decay=0.1)
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)
    # One step from the same start: half the lr-1 step, minus lr·wd·p.
    start, full_params, half_params = make_params(), make_params(), make_params()
    run_optimizer(build(name, full_params)[0], full_params, 1)
    run_optimizer(build(name, half_params, lr=0.5, weight_decay=0.1)[0], half_params, 1)
    for p0, pf, ph in zip(start, full_params, half_params):
        expected_half = p0 + 0.5 * (pf - p0) - 0.5 * 0.1 * p0
        torch.testing.assert_close(ph.detach(), expected_half.detach(), rtol=1e-5, atol=1e-7)


def test_lr_is_per_group_and_follows_schedulers():
    params = make_params()
    opt, _ = build("mulo", params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    before = [p.detach().clone() for p in params]
    run_optimizer(opt, params, 1)
    scheduler.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # lr 0: no movement
    assert int(opt.state[GLOBAL_STATE_KEY]["iteration"]) == 1  # but the statistics advanced


@pytest.mark.parametrize("name", ["lo", "celo"])
def test_bf16_params_keep_fp32_state(name):
    params = make_params(torch.bfloat16)
    opt, module = build(name, params)
    master = [p.detach().float() for p in params]
    theta = dict(module.state_dict())
    state = module.functional.init_state(theta, master)
    for t in range(3):
        set_grads(params, grads_for(params, t))
        opt.step(loss=loss_at(t))
        # Reference: the fp32 step from the bf16 parameters, cast back to bf16 after each step.
        grads = [g.float() for g in grads_for(params, t)]
        ctx = StepContext([1.0] * len(SHAPES), loss_at(t), NUM_STEPS)
        new, state = module.pure_step(theta, master, grads, state, ctx)
        master = [n.to(torch.bfloat16).float() for n in new]
    for p, m in zip(params, master):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach().float(), m)
    for p in params:
        assert all(v.dtype == torch.float32 for v in opt.state[p].values())


def test_float64_params_compute_in_float64():
    params = make_params(torch.float64, mu=False)
    opt, _ = build("lo", params)
    run_optimizer(opt, params, 1)
    assert opt.compute_dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in opt.state[params[2]].values())


def test_params_without_grad_are_skipped():
    params = make_params(mu=False)
    opt, module = build("lo", params)
    frozen = params[2]
    before = frozen.detach().clone()
    active = [p for p in params if p is not frozen]
    for t in range(2):
        set_grads(active, grads_for(active, t))
        opt.step()
    assert torch.equal(frozen.detach(), before) and not opt.state.get(frozen)
    # The others took exactly the steps they would take without the frozen tensor.
    reference = make_params(mu=False)
    del reference[2]
    run_optimizer(build("lo", reference)[0], reference, 2)
    for p, r in zip(active, reference):
        assert torch.equal(p.detach(), r.detach())
    # A tensor that gets a gradient later starts from fresh accumulators at the global iteration.
    set_grads(params, grads_for(params, 2))
    opt.step()
    assert opt.state[frozen] and not torch.equal(frozen.detach(), before)
    assert int(opt.state[GLOBAL_STATE_KEY]["iteration"]) == 3


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = LO(emb.parameters(), meta_weights=SmallFCLOpt(step_mult=0.001))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name", ["celo", "velo", "muvelo"])
def test_missing_loss_is_a_clear_error(name):
    params = make_params()
    opt, _ = build(name, params)
    set_grads(params, grads_for(params, 0))
    with pytest.raises(ValueError, match=r"step\(loss=loss\).*closure.*LossToOptimizer"):
        opt.step()
    # small_fc_lopt does not use the loss: no error.
    mulo, _ = build("mulo", params)
    mulo.step()


def test_loss_precedence_closure_and_return_value():
    params = make_params()
    opt, _ = build("celo", params)

    def closure():
        assert torch.is_grad_enabled()
        set_grads(params, grads_for(params, 0))
        return torch.tensor(5.0)

    assert float(opt.step(closure)) == 5.0 and float(opt.last_loss) == 5.0
    opt.set_loss_hint(torch.tensor(4.0))
    assert float(opt.step(closure)) == 5.0 and float(opt.last_loss) == 4.0  # hint > closure
    opt.set_loss_hint(4.0)
    opt.step(closure, loss=torch.tensor(3.0))
    assert float(opt.last_loss) == 3.0  # explicit > hint
    opt.step(closure)
    assert float(opt.last_loss) == 5.0  # the hint was consumed
    assert float(opt.step(loss=2.0)) == 2.0  # without a closure, the loss used is returned
    with pytest.raises(ValueError, match="scalar"):
        opt.step(loss=torch.ones(2))


def test_nonfinite_loss_warns_once_and_keeps_the_scheduler_state():
    params = make_params(mu=False)
    opt, _ = build("celo", params)
    keys = ("loss_means", "loss_running_min", "loss_count", "lstm_hidden", "lstm_cell")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t, loss in enumerate([2.3, 2.2, math.nan, math.inf, 2.0]):
            before = {k: v.clone() for k, v in opt.state.get(GLOBAL_STATE_KEY, {}).items()}
            set_grads(params, grads_for(params, t))
            opt.step(loss=loss)
            after = opt.state[GLOBAL_STATE_KEY]
            if not math.isfinite(loss):
                assert all(torch.equal(after[k], before[k]) for k in keys)
                assert int(after["iteration"]) == int(before["iteration"]) + 1
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "nan" in messages[0]
    assert int(opt.state[GLOBAL_STATE_KEY]["loss_count"]) == 3
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("cls", [MuLO, MuVeLO])
def test_missing_mup_information_names_the_parameter_and_the_fix(cls):
    kwargs = {"num_steps": 10} if cls.needs_loss else {}
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"parameter 'net.fc.weight' \(shape \[4, 4\]\).*set_base_shapes"):
        cls([("net.fc.weight", w)], **kwargs)
    with pytest.raises(ValueError, match=r"parameter #0 .*allow_sp=True"):
        cls([w], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random meta-weights
        opt = cls([w], allow_sp=True, **kwargs)
        assert opt.param_groups[0]["update_scale"] == 1.0
        named = cls([("a", w)], scales={"a": 0.5}, **kwargs)
        assert named.param_groups[0]["update_scale"] == 0.5
        assert "param_names" not in named.param_groups[0]


def test_sp_variants_ignore_mup_scales_and_groups_keep_options():
    params = make_params(mu=True)
    opt, _ = build("lo", [{"params": params[:2], "lr": 0.5}, {"params": params[2:]}])
    assert [g["update_scale"] for g in opt.param_groups] == [1.0, 1.0]
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1.0]
    mulo, _ = build("mulo", params)
    extra = nn.Parameter(torch.randn(3, 3))
    extra.lopt_update_scale = 0.25
    mulo.add_param_group({"params": [extra]})
    assert mulo.param_groups[-1]["update_scale"] == 0.25


@pytest.mark.parametrize("name", CASES)
def test_state_dict_resume_is_bit_exact(name):
    n, m = 3, 2
    straight = make_params(mu=CASES[name][0].mu)
    opt, _ = build(name, straight)
    run_optimizer(opt, straight, n + m)

    first = make_params(mu=CASES[name][0].mu)
    opt, _ = build(name, first)
    run_optimizer(opt, first, n)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # only tensors and primitives

    resumed = make_params(mu=CASES[name][0].mu)
    with torch.no_grad():
        for r, f in zip(resumed, first):
            r.copy_(f)
    opt, _ = build(name, resumed)
    opt.load_state_dict(saved)
    run_optimizer(opt, resumed, m, start=n)
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach()), name


def test_bf16_state_dict_resume_keeps_fp32_state():
    straight = make_params(torch.bfloat16)
    opt, _ = build("mulo", straight)
    run_optimizer(opt, straight, 4)
    first = make_params(torch.bfloat16)
    opt, _ = build("mulo", first)
    run_optimizer(opt, first, 2)
    saved = opt.state_dict()
    resumed = [nn.Parameter(f.detach().clone()) for f in first]
    for r, s in zip(resumed, MU_SCALES):
        r.lopt_update_scale = s
    opt, _ = build("mulo", resumed)
    opt.load_state_dict(saved)
    assert all(v.dtype == torch.float32 for p in resumed for v in opt.state[p].values())
    assert opt.state[GLOBAL_STATE_KEY]["iteration"].dtype == torch.int64
    run_optimizer(opt, resumed, 2, start=2)
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())


def test_meta_weights_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PACKAGED_DIR", tmp_path / "packaged")
    params = make_params()
    # None and nothing packaged: a seeded random initialisation, with a warning.
    with pytest.warns(UserWarning, match="RANDOM meta-initialisation"):
        a = MuLO(params)
    with pytest.warns(UserWarning, match="RANDOM"):
        b = MuLO(params)
    for (name, x), y in zip(a.meta_weights.state_dict().items(), b.meta_weights.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.meta_weights.step_mult == 0.01
    with pytest.warns(UserWarning, match="RANDOM"):
        assert LO(params).meta_weights.step_mult == 0.001
    # Meta-weights are not optimizer parameters, and are frozen.
    assert {id(p) for p in ordered(a)} == {id(p) for p in params}
    assert not any(p.requires_grad for p in a.meta_weights.parameters())
    # An instance is copied: later changes to the caller's module do not leak in.
    module = SmallFCLOpt()
    opt = MuLO(params, meta_weights=module)
    with torch.no_grad():
        module.mlp[0].weight.add_(1.0)
    assert not torch.equal(opt.meta_weights.mlp[0].weight, module.mlp[0].weight)
    assert module.mlp[0].weight.requires_grad
    # A directory, and a packaged name when one exists.
    module.save_pretrained(tmp_path / "mine")
    opt = MuLO(params, meta_weights=str(tmp_path / "mine"))
    assert torch.equal(opt.meta_weights.mlp[0].weight, module.mlp[0].weight)
    module.save_pretrained(tmp_path / "packaged" / "mulo-fmnist8-w32-128")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        opt = MuLO(params)
    assert torch.equal(opt.meta_weights.mlp[0].weight, module.mlp[0].weight)
    with pytest.raises(TypeError, match="runs CeloLOpt meta-weights, got SmallFCLOpt"):
        Celo(params, num_steps=10, meta_weights=module)


@pytest.mark.parametrize("bad", [None, 0, -5, 2.5, True])
def test_num_steps_is_validated(bad):
    with pytest.raises(ValueError, match="num_steps"):
        Celo(make_params(), num_steps=bad, meta_weights=CeloLOpt(lstm_hidden_size=8))


def test_lr_and_weight_decay_are_validated():
    with pytest.raises(ValueError, match="lr"):
        LO(make_params(), lr=-1.0, meta_weights=SmallFCLOpt())
    with pytest.raises(ValueError, match="weight_decay"):
        LO(make_params(), weight_decay=-0.1, meta_weights=SmallFCLOpt())


def test_registry_builds_the_learned_optimizers():
    model = nn.Linear(4, 3)
    scales = {"weight": 0.25, "bias": 1.0}
    opt = optim.build("mulo", model.named_parameters(), scales=scales, meta_weights=SmallFCLOpt())
    assert isinstance(opt, MuLO) and sorted(g["update_scale"] for g in opt.param_groups) == [0.25, 1.0]
    opt = optim.build("lo", model.named_parameters(), scales=scales, meta_weights=SmallFCLOpt())
    assert isinstance(opt, LO) and [g["update_scale"] for g in opt.param_groups] == [1.0]
    opt = optim.build("celo", model.parameters(), num_steps=5, meta_weights=CeloLOpt(lstm_hidden_size=8))
    assert isinstance(opt, Celo) and opt.num_steps == 5


def test_rules_that_ignore_the_loss_accept_any_closure_value():
    params = make_params(mu=False)
    opt, _ = build("lo", params)
    for p in params:
        p.grad = torch.ones_like(p)
    out = opt.step(lambda: (torch.tensor(1.0), torch.zeros(3)))
    assert isinstance(out, tuple) and opt.last_loss is None


def test_velo_takes_tensors_of_rank_five_and_more():
    # Conv3d kernels have five axes longer than 1; VeLO's rank one-hot has 5 slots and, like
    # jax.nn.one_hot, encodes an out-of-range rank as all zeros instead of failing.
    p = nn.Parameter(torch.randn(2, 2, 2, 2, 2))
    opt = VeLO([p], num_steps=10, meta_weights=VeLOLOpt(lstm_hidden_size=4, param_inits=2))
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step(loss=1.0)
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)
