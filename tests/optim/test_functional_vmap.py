"""The pure steps under ``torch.func.vmap`` over 8 particles equal 8 separate calls
(docs/reference/design.md#contract-1-a-functional-core)."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt, VeLOLOpt
from lightning_lopt.optim.functional import StepContext

N_PARTICLES = 8
SHAPES = [(), (5,), (4, 4), (3, 6), (4, 2, 3, 3)]
SCALES = [1.0, 1.0, 0.25, 1 / 6, 1.0]


def stack(trees):
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(trees)
    if isinstance(first, dict):
        return {k: stack([t[k] for t in trees]) for k in first}
    return [stack([t[i] for t in trees]) for i in range(len(first))]


def pick(tree, i):
    if isinstance(tree, torch.Tensor):
        return tree[i]
    if isinstance(tree, dict):
        return {k: pick(v, i) for k, v in tree.items()}
    return [pick(v, i) for v in tree]


def assert_trees_close(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_trees_close(a[k], b[k])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_trees_close(x, y)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SmallFCLOpt(),
        lambda: CeloLOpt(lstm_hidden_size=8),
        lambda: VeLOLOpt(lstm_hidden_size=8, param_inits=4),
        lambda: VeLOLOpt.mu(lstm_hidden_size=8, param_inits=4),
    ],
    ids=["small_fc", "celo", "velo", "muvelo"],
)
def test_vmap_over_particles_equals_separate_calls(make):
    module = make().double()
    g = torch.Generator().manual_seed(0)
    base = {k: v.detach() for k, v in module.state_dict().items()}
    thetas = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()}
        for _ in range(N_PARTICLES)
    ]
    params = [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(N_PARTICLES)]
    states = [module.functional.init_state(th, ps, layout=module.layout) for th, ps in zip(thetas, params)]
    horizons = torch.tensor([20, 50, 100, 200, 400, 800, 1600, 2000])  # one per particle
    step = module.pure_step

    def one(theta, ps, gs, state, loss, horizon):
        return step(theta, ps, gs, state, StepContext(SCALES, loss, horizon))

    batched = vmap(one)
    b_params, b_states = stack(params), stack(states)
    for t in range(4):
        grads = [
            [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(N_PARTICLES)
        ]
        losses = 2.0 - 0.1 * t + torch.rand(N_PARTICLES, generator=g, dtype=torch.float64)
        b_params, b_states = batched(stack(thetas), b_params, stack(grads), b_states, losses, horizons)
        for i in range(N_PARTICLES):
            params[i], states[i] = one(thetas[i], params[i], grads[i], states[i], losses[i], horizons[i])
    for i in range(N_PARTICLES):
        assert_trees_close(pick(b_params, i), params[i])
        assert_trees_close(pick(b_states, i), states[i])
    # Different θ, data and horizons give different particles: the check above is not vacuous.
    assert not torch.allclose(pick(b_params, 0)[2], pick(b_params, 1)[2])
