"""The single-optimizer step seam (optim/tensor_step.py): registration, dispatch, the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lopt.optim import bf16_state, fast_steps, tensor_step
from lightning_lopt.optim.architectures import SmallFCLOpt
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.learned import GLOBAL_STATE_KEY
from lightning_lopt.optim.optimizers import MuLO

SHAPES = [(5,), (6, 4), (3, 4, 5)]
SCALES = [1.0, 0.25, 0.2]


def _module() -> SmallFCLOpt:
    torch.manual_seed(0)
    return SmallFCLOpt()


def _params(dtype=torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    for p, s in zip(params, SCALES):
        p.lopt_update_scale = s
    return params


def _grads(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


class _Fake:
    """A registered implementation that records what the seam asked of it."""

    def __init__(self, name: str, accepts: bool, kernel: bool = False) -> None:
        self.name, self.accepts, self.kernel = name, accepts, kernel
        self.asked = self.ran = 0

    def supports(self, module, params, grads, options):
        self.asked += 1
        return self.accepts

    def refusal(self, module, params, grads, options):
        return f"{self.name} refuses"

    def step_in_place(self, module, params, grads, state, ctx, weight_decays, options):
        self.ran += 1
        return state


@pytest.fixture
def only(monkeypatch):
    """Replace the registry (defaults included) for one test."""

    def install(*implementations):
        monkeypatch.setattr(tensor_step, "_IMPLEMENTATIONS", [])
        monkeypatch.setattr(tensor_step, "_DEFAULTS_REGISTERED", [True])
        for implementation in implementations:
            tensor_step.register(implementation)

    return install


def test_the_defaults_come_first_in_order_and_registration_appends(monkeypatch):
    monkeypatch.setattr(tensor_step, "_IMPLEMENTATIONS", [])
    monkeypatch.setattr(tensor_step, "_DEFAULTS_REGISTERED", [])
    extra = _Fake("extra", accepts=True)
    tensor_step.register(extra)
    assert tensor_step.implementations() == (
        fast_steps.TRITON_CUDA, fast_steps.CHUNKED_CUDA, fast_steps.FUSED_CPU, extra
    )
    tensor_step.register_default_steps()  # once only
    assert len(tensor_step.implementations()) == 4


def test_a_refusal_falls_through_to_the_next_and_fused_filters(only):
    first, second = _Fake("first", accepts=False), _Fake("second", accepts=True)
    only(first, second)
    module, params = _module(), _params()
    grads = _grads(params)
    state = {"iteration": torch.tensor(0), "tensors": []}
    ctx = StepContext(SCALES, None, 0)
    tensor_step.step_in_place(module, params, grads, state, ctx, [0.0] * 3, tensor_step.StepOptions("T"))
    assert (first.asked, first.ran, second.asked, second.ran) == (1, 0, 1, 1)
    # Nothing supports the step: the reference.
    only(_Fake("no", accepts=False))
    assert tensor_step.resolve(module, params, grads, tensor_step.StepOptions("T")) is tensor_step.PURE_STEP
    # fused=False never asks a kernel; fused=True asks only kernels and fails with their reasons.
    kernel, plain = _Fake("k", accepts=True, kernel=True), _Fake("p", accepts=True)
    only(kernel, plain)
    assert tensor_step.resolve(module, params, grads, tensor_step.StepOptions("T", fused=False)) is plain
    assert tensor_step.resolve(module, params, grads, tensor_step.StepOptions("T", fused=True)) is kernel
    only(_Fake("k1", accepts=False, kernel=True), _Fake("p", accepts=True), _Fake("k2", accepts=False, kernel=True))
    with pytest.raises(RuntimeError, match=r"^T\(fused=True\): the fused step cannot run: k1 refuses; k2 refuses$"):
        tensor_step.resolve(module, params, grads, tensor_step.StepOptions("T", fused=True))


def _by_hand(module, params, grads, state, ctx, decay, state_dtype):
    """The step written out: module.step, decoupled decay on the old p, bf16 rounding of m / rms."""
    wide = {**state, "tensors": [{k: v.float() for k, v in acc.items()} for acc in state["tensors"]]}
    new, new_state = module.step(params, grads, wide, ctx)
    new = [n - decay * p for n, p in zip(new, params)]
    if state_dtype == torch.bfloat16:
        iteration = int(state["iteration"])
        new_state["tensors"] = [bf16_state.round_accumulators(a, iteration, i) for i, a in enumerate(new_state["tensors"])]
    return new, new_state


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_the_reference_is_what_the_optimizer_does_with_fused_false(state_dtype):
    """Two steps of MuLO(fused=False, lr, weight decay), PURE_STEP and the step written out agree bit for bit."""
    params, reference = _params(), _params()
    opt = MuLO(params, lr=0.5, weight_decay=0.1, meta_weights=_module(), fused=False, state_dtype=state_dtype)
    module = _module()
    init = module.init_state([p.detach() for p in reference])
    init["tensors"] = [{k: v.to(state_dtype) if k in ("m", "rms") else v for k, v in acc.items()} for acc in init["tensors"]]
    state = expected_state = init
    expected = [p.detach().clone() for p in reference]
    options = tensor_step.StepOptions("MuLO", fused=False, state_dtype=state_dtype)
    for t in range(2):
        grads = _grads(params, seed=t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ctx = StepContext([0.5 * s for s in SCALES], None, 0)
        with torch.no_grad():  # as the seam runs it
            state = tensor_step.PURE_STEP.step_in_place(module, reference, grads, state, ctx, [0.05] * 3, options)
            expected, expected_state = _by_hand(module, expected, grads, expected_state, ctx, 0.05, state_dtype)
        assert all(torch.equal(a, b) for a, b in zip(params, reference)), f"optimizer, step {t}"
        assert all(torch.equal(a, b) for a, b in zip(reference, expected)), f"by hand, step {t}"
    assert torch.equal(opt.state[GLOBAL_STATE_KEY]["iteration"], state["iteration"])
    for p, acc, want in zip(params, state["tensors"], expected_state["tensors"]):
        assert opt.state[p].keys() == acc.keys() == want.keys()
        for k in acc:
            assert opt.state[p][k].dtype == acc[k].dtype == want[k].dtype
            assert torch.equal(opt.state[p][k], acc[k]) and torch.equal(acc[k], want[k])


@pytest.mark.parametrize("implementation", [fast_steps.CHUNKED_CUDA, fast_steps.FUSED_CPU], ids=lambda i: i.name)
def test_in_place_marshalling_copies_writes_back_and_bumps_versions(implementation):
    """Run directly on CPU: a non-contiguous bf16 parameter goes through a float32 copy written back,
    a contiguous float32 one is written in place with its autograd version bumped; both match the reference."""
    module = _module()
    contiguous = torch.randn(6, 4)
    strided = torch.randn(5, 3).t().to(torch.bfloat16)  # non-contiguous, bf16
    params, reference = [contiguous, strided], [contiguous.clone(), strided.clone()]
    grads = _grads(params)
    state = module.init_state([p.float() for p in params])
    ref_state = module.init_state([p.float() for p in params])
    ctx = StepContext([0.5, 1000.0], None, 0)  # the bf16 tensor's update well above its rounding
    options = tensor_step.StepOptions("T")
    version = contiguous._version
    old = [p.clone() for p in params]
    with torch.no_grad():
        new_state = implementation.step_in_place(module, params, grads, state, ctx, [0.1, 0.0], options)
        tensor_step.PURE_STEP.step_in_place(module, reference, grads, ref_state, ctx, [0.1, 0.0], options)
    assert contiguous._version > version
    assert strided.dtype == torch.bfloat16 and not strided.is_contiguous()
    for a, b, p0 in zip(params, reference, old):
        # 1e-5 of the update (the kernels' tolerance) beyond one rounding of p (float32, or bf16 on write-back).
        a, b, p0, eps = a.float(), b.float(), p0.float(), torch.finfo(a.dtype).eps
        update = (b - p0).abs().max()
        assert update > 10 * eps * b.abs().max()
        assert ((a - b).abs() - eps * b.abs()).clamp_min(0).max() <= 1e-5 * update
    assert all(v.is_contiguous() for acc in new_state["tensors"] for v in acc.values())
    assert int(new_state["iteration"]) == 1
