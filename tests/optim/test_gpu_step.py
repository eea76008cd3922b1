"""The GPU step (lightning_lopt/optim/gpu) against the pure functional step.

With a GPU these tests run on CUDA, plus the CUDA-only ones (the optimizers' default dispatch,
CUDA-graph capture, the TF32 error bound). Without one, the Triton kernels run on CPU tensors
through Triton's interpreter, which must be on before Triton is first imported (importing
lightning imports it), so ``test_gpu_step_interpreter.py`` runs this file in a fresh process with
``TRITON_INTERPRET=1``; in any other CPU process it is skipped. Shapes are tiny: the interpreter
runs every program in numpy.

Comparisons are in lockstep as in ``test_fused.py``: every step starts both implementations from
the pure step's parameters and state. Tolerances, beyond one ulp of p (the output is p − Δ rounded to
float32): ``exact`` numerics, 1e-5 of the tensor's largest update (as the CPU kernel); ``fast``
numerics (TF32 tensor cores; CUDA only, since the interpreter computes every ``tl.dot`` in
float32), 1e-2 of the update's RMS per tensor (the issue's bound).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run by test_gpu_step_interpreter.py under the interpreter", allow_module_level=True)
triton = pytest.importorskip("triton")

from lightning_lopt.optim import bf16_state  # noqa: E402
from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt  # noqa: E402
from lightning_lopt.optim.functional import StepContext  # noqa: E402
from lightning_lopt.optim.functional.accumulators import (  # noqa: E402
    update_accumulators,
    work_shape,
)
from lightning_lopt.optim.functional.features import adafactor_features  # noqa: E402
from lightning_lopt.optim.gpu import kernels, step, table  # noqa: E402
from lightning_lopt.optim.particle_step import vmapped_pure_step  # noqa: E402
import particle_problems  # noqa: E402

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# Ranks 0-4, square and non-square, conv kernels (OIHW); (5, 300) spans several element blocks.
SHAPES = [(), (7,), (6, 6), (5, 8), (3, 4, 5), (4, 3, 3, 3), (5, 300)]
SCALES = [1.0, 1.0, 1 / 6, 0.25, 0.3, 0.5, 0.1]
P = 2
N_STEPS = 2
NUM_STEPS = 40

CONFIGS = {
    "mulo": lambda layout: SmallFCLOpt(step_mult=0.01, layout=layout),
    "lo-hidden16": lambda layout: SmallFCLOpt(step_mult=0.001, hidden_size=16, layout=layout),
    "celo-stage1": lambda layout: CeloLOpt(lstm_hidden_size=8, train_phase=1, layout=layout),
    "celo-stage2": lambda layout: CeloLOpt(lstm_hidden_size=8, train_phase=2, layout=layout),
}


def stacked_problem(module, seed: int = 0):
    """θ per particle (distinct), parameters and fresh stacked state, on DEVICE."""
    return particle_problems.stacked_problem(module, SHAPES, P, seed, device=DEVICE)


def step_inputs(t: int, g: torch.Generator):
    """Gradients (a NaN at step 1) and per-particle losses of step t."""
    grads = [(0.01 + 0.1 * (i % 3)) * torch.randn(P, *s, generator=g) for i, s in enumerate(SHAPES)]
    if t == 1:
        grads[2][0].view(-1)[3] = float("nan")
    return [x.to(DEVICE) for x in grads], torch.tensor([2.3 - 0.1 * t, 2.2 - 0.08 * t], device=DEVICE)


def assert_step_close(new, ref, old, what: str, numerics: str = "exact") -> None:
    for k, (a, b, p0) in enumerate(zip(new, ref, old)):
        da, db = (a - p0).double(), (b - p0).double()
        assert db.abs().max() > 0, f"{what}: tensor {k} did not move"
        # The output is p − Δ rounded to float32: one ulp of p is not the step's error.
        ulp = torch.finfo(torch.float32).eps * p0.abs().double()
        error = ((da - db).abs() - ulp).clamp_min(0).max()
        if numerics == "exact":
            excess = float(error / db.abs().max())
            assert excess <= 1e-5, f"{what}: tensor {k} {tuple(p0.shape[1:])}: {excess:.2e} of the update"
        else:
            excess = float(error / db.pow(2).mean().sqrt())
            assert excess <= 1e-2, f"{what}: tensor {k} {tuple(p0.shape[1:])}: {excess:.2e} of the update RMS"


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


def run_lockstep(module, numerics: str, what: str) -> None:
    theta, params, state, g = stacked_problem(module)
    horizon = torch.tensor([NUM_STEPS, NUM_STEPS + 7], device=DEVICE) if isinstance(module, CeloLOpt) else NUM_STEPS
    for t in range(N_STEPS):
        grads, loss = step_inputs(t, g)
        ctx = StepContext(SCALES, loss, horizon)
        new, new_state = step.particle_step(module, theta, params, grads, state, ctx, numerics=numerics)
        ref, ref_state = vmapped_pure_step(module, theta, params, grads, state, ctx)
        assert_step_close(new, ref, params, f"{what} step {t}", numerics)
        assert_state_close(new_state, ref_state, f"{what} step {t}")
        params, state = ref, ref_state


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "layout"), [("mulo", "torch"), ("lo-hidden16", "jax"), ("celo-stage1", "torch"), ("celo-stage2", "jax")]
)
def test_particle_step_matches_the_pure_step_exactly(config, layout):
    run_lockstep(CONFIGS[config](layout), "exact", f"{config}/{layout}")


@pytest.mark.skipif(not ON_CUDA, reason="the interpreter computes every tl.dot in float32: fast == exact there")
@pytest.mark.parametrize("config", ["mulo", "celo-stage2"])
def test_fast_numerics_within_a_percent_of_the_update_rms(config):
    run_lockstep(CONFIGS[config]("torch"), "fast", f"{config}/fast")


def test_the_check_fails_on_a_wrong_step():
    """The lockstep check sees a 0.1% change of one tensor's update scale (so it can fail)."""
    module = CONFIGS["mulo"]("torch")
    theta, params, state, g = stacked_problem(module)
    grads, loss = step_inputs(0, g)
    ref, _ = vmapped_pure_step(module, theta, params, grads, state, StepContext(SCALES, loss, NUM_STEPS))
    wrong = [*SCALES[:3], SCALES[3] * 1.001, *SCALES[4:]]
    new, _ = step.particle_step(module, theta, params, grads, state, StepContext(wrong, loss, NUM_STEPS), numerics="exact")
    with pytest.raises(AssertionError, match="tensor 3"):
        assert_step_close(new, ref, params, "wrong scale")


def _reference_channel_sums(module, params, grads, acc_list):
    """Σ over elements of each MLP input channel squared, from the pure building blocks (small_fc)."""
    decays = [module.state_dict()[k].to(DEVICE) for k in ("momentum_decays", "rms_decays", "adafactor_decays")]
    from lightning_lopt.optim.functional.small_fc import decays_from_offsets
    from lightning_lopt.optim.functional.accumulators import ADAFACTOR_DECAYS, MOMENTUM_DECAYS, RMS_DECAYS

    momentum, rms, adafactor = (
        decays_from_offsets(d, base) for d, base in zip(decays, (MOMENTUM_DECAYS, RMS_DECAYS, ADAFACTOR_DECAYS))
    )
    rows = []
    for p, g, acc in zip(params, grads, acc_list):
        shape = work_shape(p.shape)
        p_w, g_w = p.reshape(shape), torch.nan_to_num(g.reshape(shape))
        new, fac_g = update_accumulators(acc, g_w, momentum, rms, adafactor, module.layout)
        m, v = new["m"], new["rms"]
        rs = torch.rsqrt(v + 1e-6)
        x = torch.cat(
            [g_w[..., None], p_w[..., None], m, v, m * rs, rs, fac_g,
             *adafactor_features(new, m, layout=module.layout, nonfactored_mom_eps=1e-6)],
            dim=-1,
        )
        rows.append(torch.nn.functional.pad((x.double() ** 2).reshape(-1, 28).sum(0), (0, 4)))
    return torch.stack(rows)


def test_statistics_pass_returns_the_channel_sums():
    """The contract the sharded step relies on: stats[i, c] = Σ_elements (channel c)², spec order."""
    module = SmallFCLOpt()
    g = torch.Generator().manual_seed(3)
    shapes = [*SHAPES, (36, 140)]  # several 2-D reduction tiles along both axes
    params = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    grads = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    state = module.init_state(params)
    # Non-zero accumulators, so every channel is exercised.
    state["tensors"] = [{k: (v + 0.1 * torch.rand(v.shape, generator=g).to(DEVICE)) for k, v in acc.items()} for acc in state["tensors"]]
    expected = _reference_channel_sums(module, params, grads, state["tensors"])

    theta = {k: v.detach().unsqueeze(0).to(DEVICE) for k, v in module.state_dict().items()}
    nets, _ = step._nets(module, theta, state, StepContext(SCALES, None, 1), particles=False)
    acc_copy = [{k: v.clone() for k, v in acc.items()} for acc in state["tensors"]]
    jobs = [table.Job(work_shape(p.shape), p.clone(), gr, acc, 1.0, 0.0, i) for i, (p, gr, acc) in enumerate(zip(params, grads, acc_copy))]
    plan = table.Plan(jobs, module.layout, celo=False)
    stats, _ = table.statistics(plan, nets)
    assert stats.shape == (len(shapes), kernels.WIDTH) and stats.dtype == torch.float32
    torch.testing.assert_close(stats.double(), expected, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(plan.numels, torch.tensor([max(1, p.numel()) for p in params], dtype=torch.float32, device=DEVICE))


#: Whole tensors split into blocks of rows: d0 on axis 0 ((5, 3): v_row replicated), d1 on it
#: ((3, 7): the mean of v_row over d1 crosses the blocks), a tie, 1 row (empty blocks), factored
#: axes off axis 0, a vector; the scalar is not split.
SHARDED_SHAPES = [(5, 3), (3, 7), (4, 4), (1, 6), (3, 2, 5, 5), (7,), ()]


def _blocks(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Rank r's rows under torch.chunk (FSDP2's split; ranks past the chunks get none)."""
    chunks = list(t.chunk(world))
    return [chunks[r].clone() if r < len(chunks) else t[:0].clone() for r in range(world)]


def _phases_on_blocks(module, world, params, grads, ctx):
    """One step of ``world`` simulated ranks through the three phases, the sums across ranks made
    between them as the all-reduces would; returns the whole tensors."""
    from lightning_lopt.optim.functional import sharded

    specs = [sharded.ShardSpec(work_shape(p.shape), split=p.dim() > 0) for p in params]
    theta = {k: v.detach().unsqueeze(0) for k, v in module.state_dict().items()}
    ranks = []
    for r in range(world):
        local = [_blocks(p, world)[r] if s.split else p.clone() for p, s in zip(params, specs)]
        local_g = [_blocks(g, world)[r] if s.split else g for g, s in zip(grads, specs)]
        acc = [
            sharded.init_accumulators(s, p.shape[0] if s.split else s.shape[0], torch.float32, DEVICE, module.layout)
            for p, s in zip(local, specs)
        ]
        state = {k: v for k, v in module.init_state([]).items() if k != "tensors"}
        nets, _ = step._nets(module, theta, {**state, "tensors": acc}, ctx, particles=False)
        jobs = [
            table.Job(work_shape(p.shape), p, g, a, float(scale), 0.0, i, total_rows=s.shape[0] if s.split else None)
            for i, (p, g, a, scale, s) in enumerate(zip(local, local_g, acc, ctx.scales, specs))
        ]
        ranks.append((table.Plan(jobs, module.layout, isinstance(module, CeloLOpt)), nets, local, jobs))
    workspaces = [table.partial_sums(plan, nets) for plan, nets, _, _ in ranks]
    k = ranks[0][0].shared_floats
    total = sum(ws[:k] for ws in workspaces)
    for ws in workspaces:
        ws[:k] = total
    stats = [table.finish_statistics(plan, nets, ws) for (plan, nets, _, _), ws in zip(ranks, workspaces)]
    rows = ranks[0][0].split_jobs
    total = sum(st[rows] for st in stats)
    for st in stats:
        st[rows] = total
    for (plan, nets, _, _), st, ws in zip(ranks, stats, workspaces):
        table.apply(plan, nets, st, ws, numerics="exact")
    return [torch.cat([rank[2][i] for rank in ranks]) if s.split else ranks[0][2][i] for i, s in enumerate(specs)]


@pytest.mark.parametrize("config", ["mulo", "celo-stage2"])
def test_the_phases_on_blocks_of_rows_equal_the_pure_step(config):
    """The contract of the sharded step: the phases on blocks of rows (3 ranks: uneven and empty
    blocks; 2 ranks run in test_sharded.py), with the workspace prefix and the split tensors' stats
    rows summed between them, give the pure step of the whole tensors."""
    module = CONFIGS[config]("torch").to(DEVICE)
    g = torch.Generator().manual_seed(11)
    params = [torch.randn(s, generator=g).to(DEVICE) for s in SHARDED_SHAPES]
    grads = [(0.1 * torch.randn(s, generator=g)).to(DEVICE) for s in SHARDED_SHAPES]
    ctx = StepContext([1.0, 0.5, 0.25, 1.0, 0.3, 0.1, 1.0], torch.tensor(2.0, device=DEVICE), 100)
    with torch.no_grad():
        ref, _ = module.step(params, grads, module.init_state(params), ctx)
    got = _phases_on_blocks(module, 3, params, grads, ctx)
    assert_step_close([x.unsqueeze(0) for x in got], [x.unsqueeze(0) for x in ref],
                      [x.unsqueeze(0) for x in params], f"{config}, 3 ranks")


def _in_place_problem(param_dtype, state_dtype, seed=5):
    module = SmallFCLOpt()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    module.to(DEVICE)
    params = [torch.randn(s, generator=g).to(DEVICE, param_dtype) for s in SHAPES]
    grads = [(0.1 * torch.randn(s, generator=g)).to(DEVICE, param_dtype) for s in SHAPES]
    state = module.init_state([p.float() for p in params])
    state["iteration"] = torch.tensor(7, device=DEVICE)
    state["tensors"] = [
        {k: (0.01 * torch.rand(v.shape, generator=g).to(DEVICE)).to(state_dtype if k in ("m", "rms") else torch.float32)
         for k, v in acc.items()}
        for acc in state["tensors"]
    ]
    return module, params, grads, state


@pytest.mark.parametrize(("param_dtype", "state_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_in_place_step_with_bf16_params_or_state(param_dtype, state_dtype):
    """The optimizers' form: in place, bf16 params rounded to nearest, bf16 state stochastically
    rounded with the pure path's bits (bf16_state), weight decay on the pre-update p."""
    module, params, grads, state = _in_place_problem(param_dtype, state_dtype)
    wds = [0.0, 0.1] * 3 + [0.0]
    ctx = StepContext(SCALES, None, 1)
    # Reference: the wrappers' pure path (float32 compute, then cast / round).
    wide = [{k: v.float() for k, v in acc.items()} for acc in state["tensors"]]
    ref_p, ref_state = module.step([p.float() for p in params], [g.float() for g in grads],
                                   {"iteration": state["iteration"], "tensors": wide}, ctx)
    work = [p.clone() for p in params]
    gpu_state = {"iteration": state["iteration"].clone(), "tensors": [{k: v.clone() for k, v in acc.items()} for acc in state["tensors"]]}
    step.step_in_place(module, work, grads, gpu_state, ctx, wds, numerics="exact")
    assert int(gpu_state["iteration"]) == 8
    for i, (w, r, p0, wd) in enumerate(zip(work, ref_p, params, wds)):
        expected = (r - wd * p0.float()).to(param_dtype)
        assert w.dtype == param_dtype
        # One rounding step of the output dtype apart at most (the float32 values differ by rounding).
        ulp = torch.finfo(param_dtype).eps * expected.float().abs() * 2 + 1e-30
        assert ((w.float() - expected.float()).abs() <= ulp).all(), f"tensor {i}"
    for i, (acc, ref) in enumerate(zip(gpu_state["tensors"], ref_state["tensors"])):
        expected = bf16_state.round_accumulators(ref, 7, i) if state_dtype == torch.bfloat16 else ref
        for key in ref:
            assert acc[key].dtype == expected[key].dtype, key
            if state_dtype == torch.bfloat16 and key in ("m", "rms"):
                # Same hash bits: equal unless the float32 inputs straddle a rounding threshold.
                same = (acc[key] == expected[key]).float().mean()
                assert same > 0.99, f"{i}.{key}: {float(same):.3f} equal"
                torch.testing.assert_close(acc[key].float(), expected[key].float(), rtol=2 ** -7, atol=0)
            else:
                torch.testing.assert_close(acc[key], expected[key], rtol=1e-5, atol=1e-12)


def test_the_plan_is_reused_when_the_lr_changes():
    """An lr schedule changes the per-tensor scales every step: same plan, new scalars."""
    module, params, grads, state = _in_place_problem(torch.float32, torch.float32)
    wds = [0.0] * len(SHAPES)
    step.step_in_place(module, params, grads, state, StepContext(SCALES, None, 1), wds, numerics="exact")
    plans = dict(table._PLANS)
    halved = [s / 2 for s in SCALES]
    with torch.no_grad():
        ref, _ = module.step(params, grads, state, StepContext(halved, None, 1))
    old = [p.clone() for p in params]
    step.step_in_place(module, params, grads, state, StepContext(halved, None, 1), wds, numerics="exact")
    assert table._PLANS == plans
    assert_step_close(params, ref, old, "halved lr")


def test_non_contiguous_inputs_are_refused():
    module, params, grads, state = _in_place_problem(torch.float32, torch.float32)
    grads[2] = grads[2].t()
    with pytest.raises(ValueError, match="contiguous"):
        step.step_in_place(module, params, grads, state, StepContext(SCALES, None, 1), [0.0] * len(SHAPES))


def test_mixed_parameter_dtypes_step_in_groups():
    """float32 and bf16 parameters in one step (bf16 weights, float32 norms): one plan per dtype."""
    module, params, grads, state = _in_place_problem(torch.float32, torch.float32)
    for i in (1, 4):
        params[i], grads[i] = params[i].to(torch.bfloat16), grads[i].to(torch.bfloat16)
    ctx = StepContext(SCALES, None, 1)
    ref_p, _ = module.step([p.float() for p in params], [g.float() for g in grads], state, ctx)
    work = [p.clone() for p in params]
    step.step_in_place(module, work, grads, state, ctx, [0.0] * len(SHAPES), numerics="exact")
    for w, r, p in zip(work, ref_p, params):
        assert w.dtype == p.dtype
        tol = torch.finfo(p.dtype).eps * r.abs() * 2 + 1e-7
        assert ((w.float() - r.to(p.dtype).float()).abs() <= tol).all()


def test_a_plan_refuses_mixed_dtypes():
    """Within one plan (one kernel compilation) dtypes must agree."""
    module, params, grads, state = _in_place_problem(torch.float32, torch.float32)
    jobs = [table.Job(work_shape(p.shape), p, g, acc, 1.0, 0.0, i) for i, (p, g, acc) in enumerate(zip(params, grads, state["tensors"]))]
    jobs[1].p = jobs[1].p.to(torch.bfloat16)
    with pytest.raises(TypeError, match="parameters"):
        table.Plan(jobs, "torch", celo=False)


# -- CUDA only --------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")


def _model_params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to("cuda", dtype)) for s in [(64, 32), (32,), (8, 4, 3, 3), (300,)]]


@cuda
@pytest.mark.parametrize("name", ["lo", "mulo", "celo"])
def test_optimizers_default_to_the_gpu_step_on_cuda(name):
    """LO / MuLO / Celo on CUDA run the GPU step by default and match fused=False (the pure step)."""
    import lightning_lopt as llo

    def build(params, fused):
        kwargs = {"meta_weights": CONFIGS["celo-stage2"]("torch") if name == "celo" else SmallFCLOpt(step_mult=0.01)}
        if name == "celo":
            return llo.Celo(params, num_steps=50, fused=fused, **kwargs)
        if name == "mulo":
            return llo.MuLO(params, allow_sp=True, fused=fused, **kwargs)
        return llo.LO(params, fused=fused, **kwargs)

    fast, pure = _model_params(), _model_params()
    opt_fast, opt_pure = build(fast, None), build(pure, False)
    opt_fast.gpu_numerics = "exact"
    g = torch.Generator(device="cuda").manual_seed(1)
    for t in range(4):
        old = [p.detach().clone() for p in pure]
        for a, b in zip(fast, pure):
            b.grad = torch.randn(b.shape, generator=g, device="cuda")
            a.grad = b.grad.clone()
        loss = torch.tensor(2.0 - 0.1 * t, device="cuda")
        opt_fast.step(loss=loss)
        opt_pure.step(loss=loss)
        assert_step_close([p.detach() for p in fast], [p.detach() for p in pure], old, f"{name} step {t}")
        with torch.no_grad():
            for a, b in zip(fast, pure):
                a.copy_(b)
        for a, b in zip(fast, pure):
            for key in opt_pure.state[b]:
                opt_fast.state[a][key].copy_(opt_pure.state[b][key])


@cuda
def test_step_captures_in_a_cuda_graph():
    """MuLO's GPU step has no host sync: captured once, replayed, it equals eager steps."""
    import lightning_lopt as llo

    eager, graphed = _model_params(), _model_params()
    g = torch.Generator(device="cuda").manual_seed(2)
    grads = [torch.randn(p.shape, generator=g, device="cuda") for p in eager]
    opts = [llo.MuLO(ps, allow_sp=True, meta_weights=SmallFCLOpt()) for ps in (eager, graphed)]
    for ps, opt in zip((eager, graphed), opts):
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt.step()  # warm-up: state, plan and kernels exist before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        opts[1].step()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        opts[0].step()
        graph.replay()
    torch.cuda.synchronize()
    assert int(opts[1].state["learned_optimizer"]["iteration"]) == 4
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b)  # float atomics: the sums' order may differ between runs
