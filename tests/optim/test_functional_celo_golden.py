"""Celo's toy golden test (docs/reference/celo.md#golden-test), run on the JAX-layout tensors it was recorded with.

The η and Σ|ΔW| values need the released Celo meta-weights (``theta.state`` of amoudgl/celo),
which cannot be fetched here. Convert them once where they are available::

    import flax.serialization, numpy as np
    raw = flax.serialization.msgpack_restore(open("theta.state", "rb").read())
    flat = {}
    def walk(d, prefix=""):
        for k, v in d.items():
            walk(v, f"{prefix}{k}/") if isinstance(v, dict) else flat.__setitem__(prefix + k, np.asarray(v))
    walk(raw)
    CeloLOpt.from_haiku(flat, layout="jax").save_pretrained("celo-released")

and point ``LIGHTNING_LOPT_CELO_WEIGHTS`` at that directory (or package it as ``celo``). Without
them the weight-dependent test is skipped; the loss-feature part runs always.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lightning_lopt.optim.architectures import CeloLOpt
from lightning_lopt.optim.functional import StepContext, celo, loss_buffer
from lightning_lopt.optim.pretrained import available, from_pretrained

T = 100
LOSSES = [2.30, 2.25, 2.10, 2.12, 1.95, 1.90, 1.80, 1.85]
ETAS = [0.443601, 0.912860, 1.298316, 1.805533, 1.982471, 2.086714, 2.150381, 2.159357]
SUM_ABS_DELTA = {
    1: [0.954749, 4.8185e-6, 0.301214, 0.00256068, 0.539927, 0.369141, 0.00312978],
    8: [15.7511, 8.1997e-5, 5.02908, 0.0455262, 8.99028, 6.07931, 0.04212],
}


def golden_problem():
    rs = np.random.RandomState(0)
    params = [
        0.1 * rs.randn(64, 32),  # W1, JAX [in, out]
        np.zeros(32),  # b1
        0.2 * rs.randn(32, 10),  # W2
        0.05 * rs.randn(10),  # b2
        0.1 * rs.randn(3, 3, 8, 16),  # conv, HWIO
        0.3 * rs.randn(16, 16),  # square: the tie case
        np.asarray(0.5),  # scalar
    ]
    rg = np.random.RandomState(1)
    grads = [[0.01 * np.asarray(rg.randn(*p.shape)) for p in params] for _ in LOSSES]
    return params, grads


def test_loss_features_zero_then_minus_one():
    buf = loss_buffer.init(torch.float32, "cpu")
    emas = loss_buffer.decays(T, torch.float32, "cpu")
    for n, loss in enumerate(LOSSES, start=1):
        buf = loss_buffer.update(buf, torch.tensor(loss), torch.tensor(True), emas)
        feats = loss_buffer.features(buf, emas)
        expected = 0.0 if n <= 2 else -1.0
        torch.testing.assert_close(feats, torch.full((9,), expected))


def _released_weights():
    path = os.environ.get("LIGHTNING_LOPT_CELO_WEIGHTS")
    if path:
        return from_pretrained(path)
    if "celo" in available():
        return from_pretrained("celo")
    pytest.skip(
        "the released Celo meta-weights are not available offline; set LIGHTNING_LOPT_CELO_WEIGHTS "
        "(see this module's docstring)"
    )


def test_released_celo_reproduces_golden_numbers():
    released = _released_weights()
    assert isinstance(released, CeloLOpt)
    module = CeloLOpt(**{**released.config, "layout": "jax"}).requires_grad_(
        False
    )  # golden tensors are JAX layout
    module.load_state_dict(released.state_dict())
    theta = module.theta()
    params0, grads = golden_problem()
    params = [torch.tensor(p, dtype=torch.float32) for p in params0]
    state = module.init_state(params)
    with torch.no_grad():
        for t, (gs, loss) in enumerate(zip(grads, LOSSES), start=1):
            ctx = StepContext([1.0] * len(params), torch.tensor(loss), T)
            eta, _ = celo.scheduler_step(theta, state, ctx)
            np.testing.assert_allclose(float(eta), ETAS[t - 1], rtol=2e-5)
            params, state = module.step(
                params, [torch.tensor(g, dtype=torch.float32) for g in gs], state, ctx
            )
            if t in SUM_ABS_DELTA:
                sums = [float(np.abs(p.numpy() - p0).sum()) for p, p0 in zip(params, params0)]
                np.testing.assert_allclose(sums, SUM_ABS_DELTA[t], rtol=2e-4)
