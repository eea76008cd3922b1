"""The fused CPU step (lightning_lopt/optim/fused) against the pure functional step it replaces.

Comparisons are in lockstep: at every one of 12 steps both implementations start from the same
parameters and state (the pure step's), so each step's update is compared on its own. A free-running
float32 comparison would measure float32 rounding of p (one ulp of p = 6e-8 against updates of
1e-4), not the step. Tolerance: 1e-5 of the tensor's largest update, plus one ulp of p (the output
is p − Δ rounded to float32); the accumulators within 1e-5 of their largest entry. Observed
differences are about 2e-7.

Every kernel variant this CPU can run is tested (AVX-512, AVX2 + FMA, the generic build), so the
tolerances are known to hold wherever the library runs on x86-64.
"""

from __future__ import annotations

import pytest
import torch

from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.fused import build, driver
from lightning_lopt.optim.particle_step import (
    particle_step,
    stack_state,
    vmapped_pure_step,
)

import particle_problems

# Ranks 0-4, square and non-square, conv kernels (OIHW); (12, 700) spans several work units.
SHAPES = [(), (7,), (6, 6), (5, 8), (8, 3), (3, 4, 5), (4, 3, 3, 3), (8, 8, 3, 3), (12, 700)]
SCALES = [1.0, 1.0, 1 / 6, 0.25, 1.0, 0.3, 0.5, 1 / 8, 0.1]
N_STEPS = 12
NUM_STEPS = 40
P = 2

ORDER = {"avx512": 2, "avx2": 1, "generic": 0}
ISAS = [isa for isa in build.ISAS if ORDER[isa] <= ORDER[build.native_isa()]]

CONFIGS = {
    "mulo": lambda layout: SmallFCLOpt(step_mult=0.01, layout=layout),
    "lo": lambda layout: SmallFCLOpt(step_mult=0.001, layout=layout),
    "mulo-hidden16": lambda layout: SmallFCLOpt(hidden_size=16, layout=layout),
    "celo-stage1": lambda layout: CeloLOpt(lstm_hidden_size=8, train_phase=1, layout=layout),
    "celo-stage2": lambda layout: CeloLOpt(lstm_hidden_size=8, train_phase=2, layout=layout),
}


@pytest.fixture(scope="module", params=ISAS)
def kernel(request):
    return build.load(request.param)


def stacked_problem(module, seed: int = 0):
    """θ per particle (distinct), parameters and fresh stacked state."""
    return particle_problems.stacked_problem(module, SHAPES, P, seed)


def step_inputs(t: int, g: torch.Generator):
    """Gradients (a NaN at step 4) and per-particle losses (a spike at step 6) of step t."""
    grads = [(0.01 + 0.1 * (i % 3)) * torch.randn(P, *s, generator=g) for i, s in enumerate(SHAPES)]
    if t == 4:
        grads[2][0].view(-1)[3] = float("nan")
    loss = torch.tensor([2.3 - 0.1 * t, 2.2 - 0.08 * t])
    if t == 6:
        loss = torch.tensor([40.0, 35.0])
    return grads, loss


def assert_step_close(new, ref, old, what: str) -> None:
    for k, (a, b, p0) in enumerate(zip(new, ref, old)):
        da, db = a - p0, b - p0
        scale = db.abs().max()
        assert scale > 0, f"{what}: tensor {k} did not move"
        ulp = torch.finfo(torch.float32).eps * p0.abs()
        excess = ((da - db).abs() - ulp).clamp_min(0).max()
        assert excess <= 1e-5 * scale, f"{what}: tensor {k} {tuple(p0.shape[1:])}: {float(excess / scale):.2e} of the update"


def assert_state_close(new, ref, what: str) -> None:
    assert new.keys() == ref.keys()
    for key in ref:
        if key == "tensors":
            for k, (a, b) in enumerate(zip(new[key], ref[key])):
                assert a.keys() == b.keys(), f"{what}: tensor {k}"
                for name in b:
                    torch.testing.assert_close(
                        a[name], b[name], rtol=0, atol=1e-5 * float(b[name].abs().max()), msg=f"{what}: {k}.{name}"
                    )
        else:
            assert torch.allclose(new[key].double(), ref[key].double(), rtol=1e-6, atol=0), f"{what}: {key}"


@pytest.mark.parametrize("layout", ["torch", "jax"])
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_particle_step_matches_the_pure_step(kernel, config, layout):
    module = CONFIGS[config](layout)
    theta, params, state, g = stacked_problem(module)
    # Celo: each particle its own horizon, as the meta-trainer passes it.
    horizon = torch.tensor([NUM_STEPS, NUM_STEPS + 7]) if isinstance(module, CeloLOpt) else NUM_STEPS
    for t in range(N_STEPS):
        grads, loss = step_inputs(t, g)
        ctx = StepContext(SCALES, loss, horizon)
        new, new_state = driver.particle_step(kernel, module, theta, params, grads, state, ctx)
        ref, ref_state = vmapped_pure_step(module, theta, params, grads, state, ctx)
        assert_step_close(new, ref, params, f"{config}/{layout} step {t}")
        assert_state_close(new_state, ref_state, f"{config}/{layout} step {t}")
        params, state = ref, ref_state


def test_the_check_fails_on_a_wrong_step(kernel):
    """The lockstep check is sharp enough to see a 0.1% change of the update scale of one tensor."""
    module = CONFIGS["mulo"]("torch")
    theta, params, state, g = stacked_problem(module)
    grads, loss = step_inputs(0, g)
    ref, _ = vmapped_pure_step(module, theta, params, grads, state, StepContext(SCALES, loss, NUM_STEPS))
    wrong = [*SCALES[:3], SCALES[3] * 1.001, *SCALES[4:]]
    new, _ = driver.particle_step(kernel, module, theta, params, grads, state, StepContext(wrong, loss, NUM_STEPS))
    with pytest.raises(AssertionError, match=r"tensor 3 \(5, 8\)"):
        assert_step_close(new, ref, params, "wrong scale")


def test_inputs_are_not_modified(kernel):
    module = CONFIGS["celo-stage2"]("torch")
    theta, params, state, g = stacked_problem(module)
    grads, loss = step_inputs(4, g)
    before = [x.clone() for x in (*params, *grads)], [v.clone() for acc in state["tensors"] for v in acc.values()]
    driver.particle_step(kernel, module, theta, params, grads, state, StepContext(SCALES, loss, NUM_STEPS))
    after = [*params, *grads], [v for acc in state["tensors"] for v in acc.values()]
    for xs, ys in zip(before, after):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("config", ["mulo", "celo-stage2"])
def test_thread_count_does_not_change_the_numbers(kernel, config):
    """Reductions run in a fixed block order: 1 and 2 threads give bit-identical results."""
    module = CONFIGS[config]("torch")
    shapes = [(300, 200), (70, 1000), (30000,), (16, 8, 3, 3)]  # several work units per tensor
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(1, *s, generator=g) for s in shapes]
    grads = [torch.randn(1, *s, generator=g) for s in shapes]
    theta = {k: v.detach().unsqueeze(0) for k, v in module.state_dict().items()}
    state = stack_state([module.init_state([p[0] for p in params])])
    ctx = StepContext([1.0] * len(shapes), torch.tensor([2.3]), NUM_STEPS)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(driver.particle_step(kernel, module, theta, params, grads, state, ctx))
    finally:
        torch.set_num_threads(threads)
    (p1, s1), *others = results
    for pn, sn in others:
        assert all(torch.equal(a, b) for a, b in zip(p1, pn))
        for a, b in zip(s1["tensors"], sn["tensors"]):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_seam_dispatches_to_the_fused_step():
    """``particle_step`` runs the registered fused step on CPU float32 and the vmapped reference otherwise."""
    module = CONFIGS["mulo"]("torch")
    theta, params, state, g = stacked_problem(module)
    grads, loss = step_inputs(0, g)
    ctx = StepContext(SCALES, loss, NUM_STEPS)
    via_seam, _ = particle_step(module, theta, params, grads, state, ctx)
    direct, _ = driver.particle_step(build.load(), module, theta, params, grads, state, ctx)
    assert all(torch.equal(a, b) for a, b in zip(via_seam, direct))
    # float64 has no fused implementation: the seam runs the (float64) reference.
    theta64 = {k: v.double() for k, v in theta.items()}
    state64 = {"iteration": state["iteration"], "tensors": [{k: v.double() for k, v in acc.items()} for acc in state["tensors"]]}
    ref64, _ = particle_step(module.double(), theta64, [p.double() for p in params], [x.double() for x in grads], state64, ctx)
    assert all(p.dtype == torch.float64 for p in ref64)


def test_transient_memory_stays_within_the_budget(kernel):
    """GPT-2-medium-shaped tensors: the kernel's workspace is under 5% of the parameter bytes."""
    d, vocab = 1024, 50257
    shapes = [(vocab, d), (1024, d)]
    for _ in range(24):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    param_bytes = 4 * sum(torch.Size(s).numel() for s in shapes)
    for module in (SmallFCLOpt(), CeloLOpt()):
        used = driver.workspace_bytes(kernel, module, shapes)
        assert used <= 0.05 * param_bytes, f"{type(module).__name__}: {used / param_bytes:.1%} of the parameter bytes"


def test_tensors_too_skinny_to_project_take_the_plain_path():
    """A (2, 300000) matrix: its per-entry projection table (128 B x 300000) exceeds the kernel's
    budget, so its broadcast channels go through the first layer element by element instead."""
    kernel = build.load()
    module = CONFIGS["mulo"]("torch")
    theta = {k: v.detach().unsqueeze(0) for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    params = [0.5 * torch.randn(1, 2, 300_000, generator=g)]
    state = stack_state([module.init_state([params[0][0]])])
    for t in range(2):
        grads = [0.1 * torch.randn(1, 2, 300_000, generator=g)]
        ctx = StepContext([0.5], None, NUM_STEPS)
        new, _ = driver.particle_step(kernel, module, theta, params, grads, state, ctx)
        ref, state = vmapped_pure_step(module, theta, params, grads, state, ctx)
        assert_step_close(new, ref, params, f"plain step {t}")
        params = ref
