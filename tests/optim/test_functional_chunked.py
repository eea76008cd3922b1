"""The chunked in-place evaluation (functional/chunked.py) against the pure steps it mirrors.

Chunks are forced tiny (a few rows of each tensor), so every tensor with more than one row is
evaluated in several chunks, factored statistics included; with an unbounded chunk it is one chunk.
Lockstep comparison as ``test_fused.py``: 1e-5 of the tensor's largest update beyond one ulp of p,
accumulators within 1e-5 of their largest entry.
"""

from __future__ import annotations

import pytest
import torch

from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt
from lightning_lopt.optim.functional import StepContext, chunked

SHAPES = [(), (7,), (6, 6), (5, 8), (3, 4, 5), (4, 3, 3, 3), (40, 3)]
SCALES = [1.0, 1.0, 1 / 6, 0.25, 0.3, 0.5, 0.1]
WEIGHT_DECAYS = [0.0, 0.1, 0.0, 0.0, 0.01, 0.0, 0.0]


def _module(name: str, layout: str):
    g = torch.Generator().manual_seed(4)
    module = SmallFCLOpt(layout=layout) if name == "mulo" else CeloLOpt(lstm_hidden_size=8, layout=layout)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _clone(state):
    return {
        k: [{a: b.clone() for a, b in acc.items()} for acc in v] if k == "tensors" else v.clone()
        for k, v in state.items()
    }


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])
@pytest.mark.parametrize(("name", "layout"), [("mulo", "torch"), ("mulo", "jax"), ("celo", "torch")])
def test_chunked_step_matches_the_pure_step(name, layout, chunk_bytes):
    module = _module(name, layout)
    g = torch.Generator().manual_seed(0)
    params = [0.5 * torch.randn(s, generator=g) for s in SHAPES]
    state = module.init_state(params)
    for t in range(3):
        grads = [0.1 * torch.randn(s, generator=g) for s in SHAPES]
        if t == 1:
            grads[2].view(-1)[3] = float("nan")
        ctx = StepContext(SCALES, torch.tensor(2.0 - 0.1 * t), 30)
        with torch.no_grad():
            ref, ref_state = module.step(params, grads, state, ctx)
        ref = [r - wd * p for r, p, wd in zip(ref, params, WEIGHT_DECAYS)]
        work, work_state = [p.clone() for p in params], _clone(state)
        chunked.step_in_place(module, work, grads, work_state, ctx, WEIGHT_DECAYS, chunk_bytes=chunk_bytes)
        for k, (a, b, p0) in enumerate(zip(work, ref, params)):
            db = (b - p0).abs().max()
            assert db > 0
            excess = ((a - b).abs() - torch.finfo(torch.float32).eps * p0.abs()).clamp_min(0).max()
            assert excess <= 1e-5 * db, f"step {t} tensor {k}: {float(excess / db):.2e} of the update"
        for key in ref_state:
            if key == "tensors":
                for a, b in zip(work_state[key], ref_state[key]):
                    for n in b:
                        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-5 * float(b[n].abs().max()))
            else:
                torch.testing.assert_close(work_state[key].double(), ref_state[key].double(), rtol=1e-6, atol=0)
        params, state = ref, ref_state


def test_chunks_bound_the_feature_tensor():
    """A [512, 64] tensor with a 64 KiB budget: chunks of 9 rows (9·64·28·4 B = 63 KiB)."""
    chunks = list(chunked._chunks((512, 64), 28, 4, 64 << 10))
    assert chunks[0] == (0, 9) and sum(n for _, n in chunks) == 512
    assert all(n * 64 * 28 * 4 <= 64 << 10 for _, n in chunks)
