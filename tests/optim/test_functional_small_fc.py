"""small_fc_lopt / μLO specifics: θ size, decay reparametrisation, time features, factored axes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_lopt.optim.architectures import SmallFCLOpt
from lightning_lopt.optim.functional import StepContext, small_fc
from lightning_lopt.optim.functional.accumulators import factored_dims
from lightning_lopt.optim.functional.features import time_embedding


def test_meta_parameter_count_is_2409():
    # 39·32 + 32 + 32·32 + 32 + 32·2 + 2 + 7 (docs/reference/small_fc.md#meta-parameters-and-decays)
    assert SmallFCLOpt().num_meta_params() == 2409


def test_decay_reparametrisation():
    base = small_fc.MOMENTUM_DECAYS
    torch.testing.assert_close(
        small_fc.decays_from_offsets(torch.zeros(3, dtype=torch.float64), base),
        torch.tensor(base, dtype=torch.float64),
    )
    phi = torch.full((3,), math.log(2) / 10, dtype=torch.float64)  # e^{10φ} = 2
    expected = torch.tensor([1 - 2 * (1 - d) for d in base], dtype=torch.float64)
    torch.testing.assert_close(small_fc.decays_from_offsets(phi, base), expected)


def test_time_features_values():
    taus = [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]
    for t in (0, 1, 10, 12345):
        got = time_embedding(torch.tensor(t), torch.float64)
        torch.testing.assert_close(
            got, torch.tensor([math.tanh(t / tau - 1) for tau in taus], dtype=torch.float64)
        )


def test_step_uses_iteration_before_increment():
    """With the 28 normalised features switched off the output is the MLP of tanh(t/τ − 1), t = 0, 1, ..."""
    module = SmallFCLOpt(step_mult=0.5).double()
    with torch.no_grad():
        module.mlp[0].weight[:, :28] = 0.0
        module.mlp[0].bias.fill_(0.1)
    theta = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    params = [torch.zeros(3, dtype=torch.float64)]
    state = module.init_state(params)
    taus = np.array([1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000], dtype=np.float64)
    for t in range(3):
        x = np.tanh(t / taus - 1.0)
        for k in range(3):
            weight = theta[f"mlp.{k}.weight"][:, 28:] if k == 0 else theta[f"mlp.{k}.weight"]
            x = x @ weight.T + theta[f"mlp.{k}.bias"]
            x = np.maximum(x, 0) if k < 2 else x
        expected = -0.5 * x[0] * math.exp(1e-3 * x[1])
        new, state = module.step(
            params, [torch.ones(3, dtype=torch.float64)], state, StepContext([1.0], None, 100)
        )
        np.testing.assert_allclose((new[0] - params[0]).detach().numpy(), np.full(3, expected), rtol=1e-12)
        params = [new[0].detach()]
        assert int(state["iteration"]) == t + 1


@pytest.mark.parametrize(
    ("shape", "torch_dims", "jax_dims"),
    [
        ((6, 6), (1, 0), (0, 1)),  # square: d1 = the JAX in-axis = PyTorch axis 1
        ((5, 8), (0, 1), (0, 1)),  # by size, layout-independent: d0 = the longest axis
        ((8, 3), (1, 0), (1, 0)),
        ((4, 3, 3, 3), (1, 0), (3, 0)),  # OIHW; its HWIO view (3,3,3,4) ties H, W and I
        ((8, 8, 3, 3), (1, 0), (0, 1)),  # OIHW with in == out
        ((4, 4, 3), (1, 0), (0, 1)),  # Conv1d [out, in, k]: JAX [k, in, out]
        ((7,), None, None),
        ((), None, None),
    ],
)
def test_factored_dims_follow_the_jax_view(shape, torch_dims, jax_dims):
    assert factored_dims(shape, "torch") == torch_dims
    assert factored_dims(shape, "jax") == jax_dims


def test_nan_gradient_entries_count_as_zero():
    module = SmallFCLOpt().double()
    g = torch.Generator().manual_seed(1)
    p = [torch.randn(4, 5, generator=g, dtype=torch.float64)]
    grad = torch.randn(4, 5, generator=g, dtype=torch.float64)
    with_nan, with_zero = grad.clone(), grad.clone()
    with_nan[1, 2], with_zero[1, 2] = math.nan, 0.0
    ctx = StepContext([1.0], None, 10)
    a, sa = module.step(p, [with_nan], module.init_state(p), ctx)
    b, sb = module.step(p, [with_zero], module.init_state(p), ctx)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(sa["tensors"][0]["m"], sb["tensors"][0]["m"])


def test_step_is_pure_and_keeps_shapes():
    module = SmallFCLOpt()
    shapes = [(), (3,), (4, 4), (2, 3, 4), (2, 3, 3, 3)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    state = module.init_state(params)
    saved = (
        [p.clone() for p in params],
        [g.clone() for g in grads],
        [{k: v.clone() for k, v in t.items()} for t in state["tensors"]],
    )
    with torch.no_grad():
        new, new_state = module.step(params, grads, state, StepContext([1.0] * 5, None, 10))
    assert [tuple(p.shape) for p in new] == shapes
    for a, b in zip(params + grads, saved[0] + saved[1]):
        assert torch.equal(a, b)
    for t, s in zip(state["tensors"], saved[2]):
        assert all(torch.equal(t[k], s[k]) for k in s)
    assert int(state["iteration"]) == 0 and int(new_state["iteration"]) == 1


def test_mismatched_lists_are_an_error():
    module = SmallFCLOpt()
    params = [torch.zeros(2), torch.zeros(3)]
    with pytest.raises(ValueError, match="one entry per tensor"):
        module.step(
            params, [torch.zeros(2), torch.zeros(3)], module.init_state(params), StepContext([1.0], None, 1)
        )
