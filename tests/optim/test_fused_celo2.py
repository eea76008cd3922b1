"""Celo2's fused CPU step (kernel.c's elementwise part + torch, fused/celo2_step.py) against the pure step.

Two levels, each over 12 steps in lockstep (both sides restart every step from the pure side's
parameters and state):

- the elementwise part: the kernel's accumulators and its MLP output d (RMS-normalised, no
  Newton–Schulz) against the pure :func:`~lightning_lopt.optim.functional.celo2.learned_direction`,
  within 1e-5 relative, ranks 0–4, both layouts, NaN / inf / 1e30 gradients included;
- the optimizers: every update within 1e-5 of the tensor's largest update plus one float32 ulp of
  the result, except updates that went through Newton–Schulz: the kernel's sums run in another
  order than torch's (double partials, FMA), so d differs by float32 rounding (~2e-7), and the
  quintic iteration amplifies an input perturbation on small singular values by up to
  a⁵ = 3.4445⁵ ≈ 490, so those are held to 1e-4.
"""

from __future__ import annotations

import ctypes
import pathlib
import sys

import numpy as np
import pytest
import torch
from torch import nn

from lightning_lopt.optim import fast_steps, fused, tensor_step
from lightning_lopt.optim.celo2 import Celo2, Celo2Base, MuCelo2
from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.functional import StepContext, celo2
from lightning_lopt.optim.functional.accumulators import work_shape
from lightning_lopt.optim.fused import driver
from lightning_lopt.optim.learned import GLOBAL_STATE_KEY
from lightning_lopt.optim.particle_step import (
    implementation,
    particle_step,
    vmapped_pure_step,
)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import particle_problems

# Ranks 0–4; a square matrix (the Adafactor tie); more than one kernel work unit (150·130 > 16384);
# rank ≥ 3 tensors normalised per slice, whose factored axes are their matrix axes (the kernel
# projects the broadcast channels per slice: (4, 3, 3, 3) in the torch layout, the other three in
# the JAX layout) or are not (all 30 inputs per element: the others; (3, 2, 6, 7) torch has 42 slices).
SHAPES = [(), (5,), (6, 4), (7, 7), (3, 4, 5), (4, 3, 3, 3), (2, 3, 5, 5), (3, 2, 6, 7), (150, 130)]
NUM_STEPS = 12
TOL = 1e-5
NS_TOL = 1e-4  # see the module docstring

# The base-width case has no readout to mark among these bare tensors; MuCelo2 warns so.
pytestmark = pytest.mark.filterwarnings("ignore:.*attach_readout_bases")

CASES = {
    "celo2": (Celo2, Celo2LOpt, {}),
    "celo2-jax-layout": (Celo2, lambda **kw: Celo2LOpt(layout="jax", **kw), {}),
    "celo2-base": (Celo2Base, Celo2LOpt.base, {}),
    "celo2-meta-training-adam": (Celo2, Celo2LOpt, {"adam_mode": "meta_training", "adam_lr_mult": 20.0}),
    "mucelo2": (MuCelo2, Celo2LOpt, {"base_width": None}),
    # base-width-relative: 4 × the absolute scales on matrices (no readout is marked here)
    "mucelo2-base-width": (MuCelo2, Celo2LOpt, {"base_width": 4}),
    # every matrix is hidden here (scale 1/fan_in), so every one takes the spectral normalisation
    "mucelo2-spectral": (MuCelo2, Celo2LOpt, {"base_width": 4, "hidden_norm": "spectral"}),
}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    for p in params:
        p.lopt_update_scale = 1.0 / p.shape[-1] if p.dim() >= 2 else 1.0  # MuCelo2's μP scales
    return params


def gradients(params, t, pathological=False):
    """N(0, 1) gradients; ``pathological`` adds NaN, ±inf, 1e30 and an all-zero tensor."""
    g = torch.Generator().manual_seed(1000 + t)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    if pathological:
        for k, grad in enumerate(grads):
            flat = grad.view(-1)
            if flat.numel() > 3:
                flat[(t + k) % flat.numel()] = float("nan")
                flat[(t + 2 * k + 1) % flat.numel()] = float("inf") if t % 2 else -1e30
                flat[(3 * t + k + 2) % flat.numel()] = 1e30
        grads[2].zero_()
    return grads


def build(name, params, **overrides):
    cls, make, kwargs = CASES[name]
    return cls(params, lr=1e-2, weight_decay=0.1, meta_weights=make(generator=torch.Generator().manual_seed(3)),
               **{**kwargs, **overrides})


def assert_step_close(new, ref, old, what, orthogonalized):
    for k, (a, b, p0) in enumerate(zip(new, ref, old)):
        tol = NS_TOL if orthogonalized and a.dim() >= 2 else TOL
        da, db = a.detach() - p0, b.detach() - p0
        assert torch.isfinite(da).all() and torch.isfinite(db).all(), f"{what}: tensor {k} not finite"
        scale = db.abs().max()
        ulp = torch.finfo(torch.float32).eps * torch.maximum(a.detach().abs(), b.detach().abs())
        excess = ((da - db).abs() - ulp).clamp_min(0).max()
        assert excess <= tol * scale, f"{what}: tensor {k} {list(a.shape)}: {float(excess / scale):.2e}"


def lockstep(name, pathological=False):
    pure_params, fused_params = make_params(), make_params()
    pure = build(name, pure_params, fused=False)
    fast = build(name, fused_params, fused=True)
    for t in range(NUM_STEPS):
        old = [p.detach().clone() for p in pure_params]
        for ps in (pure_params, fused_params):
            for p, g in zip(ps, gradients(ps, t, pathological)):
                p.grad = g
        pure.step()
        fast.step()
        assert_step_close(fused_params, pure_params, old, f"{name} step {t}", pure.orthogonalize)
        with torch.no_grad():
            for f, p in zip(fused_params, pure_params):
                f.copy_(p)
        fast.load_state_dict(pure.state_dict())


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("pathological", [False, True])
@pytest.mark.parametrize("layout", ["torch", "jax"])
def test_the_elementwise_part_matches_the_pure_step(layout, pathological):
    module = Celo2LOpt(layout=layout, generator=torch.Generator().manual_seed(3))
    theta = module.state_dict()
    params = [p.detach() for p in make_params()]
    accumulators = module.init_state(params, adam=[False] * len(params))["tensors"]
    kernel = fused.kernel()
    for t in range(NUM_STEPS):
        grads = gradients(params, t, pathological)
        kernel_acc = [{k: v.clone() for k, v in acc.items()} for acc in accumulators]
        directions = driver.celo2_directions(
            kernel, module, params, grads, kernel_acc, range(len(params)), torch.tensor(t)
        )
        for i, (p, g, d) in enumerate(zip(params, grads, directions)):
            shape = work_shape(p.shape)
            u, accumulators[i] = celo2.learned_direction(
                theta, p.reshape(shape), g.reshape(shape), accumulators[i], orthogonalize_matrices=False, layout=layout
            )
            u_kernel = celo2.output_direction(d, orthogonalize_matrices=False, layout=layout)
            what = f"step {t}, tensor {list(p.shape)}"
            assert relative_error(u_kernel, u) <= TOL, f"{what}: d {relative_error(u_kernel, u):.1e}"
            for key, value in accumulators[i].items():
                assert relative_error(kernel_acc[i][key], value) <= TOL, f"{what}: {key}"
            params[i] = p - 1e-2 * u.reshape(p.shape)


@pytest.mark.parametrize("name", CASES)
def test_fused_celo2_matches_the_pure_step(name):
    lockstep(name)


@pytest.mark.parametrize("name", ["celo2", "celo2-base"])
def test_fused_celo2_handles_nonfinite_and_huge_gradients_as_the_pure_step(name):
    lockstep(name, pathological=True)


def test_fused_is_the_default_for_celo2_on_cpu_float32():
    params = make_params()
    opt = build("celo2", params)
    for p, g in zip(params, gradients(params, 0)):
        p.grad = g
    opt.step()
    chosen = tensor_step.resolve(opt.meta_weights, params, [p.grad for p in params], opt._step_options())
    assert chosen is fast_steps.FUSED_CPU
    before = opt.state[params[3]]["m"]
    opt.step()
    assert opt.state[params[3]]["m"] is before  # the kernel writes the accumulators in place
    assert int(opt.state[GLOBAL_STATE_KEY]["iteration"]) == 2


def test_thread_count_does_not_change_celo2_numbers():
    """The per-slice statistics are summed in a fixed order: 1 and 2 threads agree bit for bit."""
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params = make_params()
            opt = build("celo2-base", params)
            for t in range(2):
                for p, g in zip(params, gradients(params, t)):
                    p.grad = g
                opt.step()
            results.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_fused_true_where_celo2_cannot_run():
    params = [nn.Parameter(torch.randn(4, 3, dtype=torch.float64))]
    params[0].grad = torch.randn(4, 3, dtype=torch.float64)
    opt = Celo2(params, meta_weights=Celo2LOpt(), fused=True)
    with pytest.raises(RuntimeError, match=r"Celo2\(fused=True\).*CPU float32 only"):
        opt.step()


def test_the_kernel_refuses_an_inconsistent_normalisation_view():
    """kernel.c checks the slice view against the tensor's size before touching memory."""
    kernel = fused.kernel()
    p, g = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    acc = Celo2LOpt().init_state([p], adam=[False])["tensors"][0]
    job = driver._Job((3, 4, 5), "torch", p, torch.empty(60), g, acc, acc, 0.0, 0.0, 0, (1, 12, 4))
    nets = driver._celo2_nets({k: v.unsqueeze(0) for k, v in Celo2LOpt().state_dict().items()}, torch.zeros(1))
    before = {k: v.clone() for k, v in acc.items()}
    with pytest.raises(ValueError, match="refused its arguments"):
        driver._launch(kernel, Celo2LOpt(), nets, [job])
    assert all(torch.equal(before[k], acc[k]) for k in acc)


def test_the_kernel_refuses_an_unknown_rule():
    kernel = fused.kernel()
    call = driver._Call(rule=7, n_particles=1, n_tensors=1, n_threads=1)
    descriptor = np.zeros((1, 23), dtype=np.int64)
    call.tensors = descriptor.ctypes.data
    assert kernel.lib.lopt_step(ctypes.byref(call)) == -2


def test_wrong_state_is_refused_before_the_kernel_runs():
    params = make_params()
    opt = build("celo2-base", params)
    for p, g in zip(params, gradients(params, 0)):
        p.grad = g
    opt.step()
    opt.state[params[3]]["v_row"] = torch.zeros(2, 3)  # the wrong size for a (7, 7) matrix
    with pytest.raises(ValueError, match="'v_row' has 6 elements"):
        opt.step()


class _Subclass(torch.Tensor):
    """A tensor subclass (as DTensor is): its memory is not the kernel's to address."""


def _broken(what: str, job: driver._Job) -> None:
    """Replace one buffer of ``job`` with one kernel.c must not be handed."""
    if what == "float64 gradient":
        job.g = job.g.double()
    elif what == "sparse gradient":
        job.g = job.g.to_sparse()
    elif what == "meta parameter":
        job.p_in = torch.empty_like(job.p_in, device="meta")
    elif what == "subclass parameter output":
        job.p_out = job.p_out.as_subclass(_Subclass)
    elif what == "non-contiguous state 'm'":
        m = job.acc_in["m"]
        job.acc_in["m"] = torch.empty(m.shape[::-1]).t()
    elif what == "short state output 'rms'":
        job.acc_out["rms"] = job.acc_out["rms"][:-1]
    elif what == "float64 state output 'v'":
        job.acc_out["v"] = job.acc_out["v"].double()
    elif what == "missing state key":
        del job.acc_in["rms"]


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "out-of-place"])
@pytest.mark.parametrize(
    "what, error, message",
    [
        ("float64 gradient", TypeError, "the gradient is torch.float64, expected torch.float32"),
        ("sparse gradient", TypeError, "plain dense CPU tensors; the gradient is a torch.sparse_coo"),
        ("meta parameter", TypeError, "plain dense CPU tensors; the parameter is a torch.strided on meta"),
        ("subclass parameter output", TypeError, "plain dense CPU tensors; the parameter( output)? is a _Subclass"),
        ("non-contiguous state 'm'", ValueError, "needs contiguous"),
        ("short state output 'rms'", ValueError, r"the state( output)? 'rms' has 47 elements, expected 48"),
        ("float64 state output 'v'", TypeError, r"the state( output)? 'v' is torch.float64"),
        ("missing state key", ValueError, r"state keys \['m', 'v'\] do not match"),
    ],
)
def test_every_buffer_is_checked_before_the_kernel_runs(in_place, what, error, message):
    """kernel.c trusts raw pointers and sizes: each buffer of a job, read or written, in-place (the
    optimizers) or not (the particle step), is refused with a message naming it, and nothing is written."""
    p, g = torch.randn(48), torch.randn(48)  # a vector: one unfactored 'v'
    acc = Celo2LOpt.base().init_state([p], adam=[False])["tensors"][0]
    acc_out = acc if in_place else {k: torch.empty_like(v) for k, v in acc.items()}
    p_out = p if in_place else torch.empty_like(p)
    job = driver._Job((48,), "torch", p, p_out, g, acc, acc_out, 0.0, 0.0, 0, (1, 48, 1))
    nets = driver._celo2_nets({k: v.unsqueeze(0) for k, v in Celo2LOpt.base().state_dict().items()}, torch.zeros(1))
    driver._launch(fused.kernel(), Celo2LOpt.base(), nets, [job])  # the intact job runs
    _broken(what, job)
    before = [t.clone() for t in (p, *acc.values())]
    with pytest.raises(error, match=message):
        driver._launch(fused.kernel(), Celo2LOpt.base(), nets, [job])
    assert all(torch.equal(a, b) for a, b in zip(before, (p, *acc.values())))


PARTICLE_CONFIGS = {
    "celo2-meta-training": lambda: Celo2LOpt.meta_training(generator=torch.Generator().manual_seed(4)),
    "celo2-base-jax-layout": lambda: Celo2LOpt.base(step_mult=1e-3, layout="jax", generator=torch.Generator().manual_seed(4)),
}


@pytest.mark.parametrize("spectral", [False, True], ids=["rms", "spectral"])
@pytest.mark.parametrize("config", PARTICLE_CONFIGS)
def test_the_particle_form_matches_the_vmapped_pure_step(config, spectral):
    """The meta-training seam: 3 particles, each its own θ, 12 steps in lockstep (with and without
    MuCelo2's spectral targets on the matrices)."""
    module = PARTICLE_CONFIGS[config]()
    assert implementation(Celo2LOpt) is not None
    theta, params, state, g = particle_problems.stacked_problem(module, SHAPES, 3)
    scales = [0.5] * len(SHAPES)
    targets = [2.0 if len(shape) >= 2 else None for shape in SHAPES] if spectral else None
    for t in range(NUM_STEPS):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        grads[3].view(-1)[t] = float("nan") if t % 3 == 0 else 1e30
        ctx = StepContext(scales, None, 0, targets)
        new, new_state = particle_step(module, theta, params, grads, state, ctx)
        ref, ref_state = vmapped_pure_step(module, theta, params, grads, state, ctx)
        assert_step_close(new, ref, params, f"{config} step {t}", module.orthogonalize)
        assert torch.equal(new_state["iteration"], ref_state["iteration"])
        for acc, ref_acc in zip(new_state["tensors"], ref_state["tensors"]):
            assert acc.keys() == ref_acc.keys()
            for key in acc:
                assert relative_error(acc[key], ref_acc[key]) <= TOL, f"{config} step {t}: {key}"
        params, state = ref, ref_state
