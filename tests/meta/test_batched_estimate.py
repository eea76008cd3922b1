"""Batching compatible task instances into one unroll leaves the PES estimate as it was."""

from __future__ import annotations

import copy

import torch

from lightning_lopt.meta import ImageMLPTask, LogUniformLengthSchedule, MetaTrainer, PES, ReparamAugmentation
from lightning_lopt.meta.estimator import EstimatorSettings, PESEstimator


def _estimators():
    # Instances 0 and 2 share an architecture and batch shape (one group); 1 (width 8) and 3
    # (batch 8) are incompatible with them and run alone.
    tasks = [
        ImageMLPTask("digits", widths=[16, 8], depth=1, param="sp", batch_size=16),
        ImageMLPTask("digits", widths=[16], depth=1, param="sp", batch_size=16),
        ImageMLPTask("digits", widths=[16], depth=1, param="sp", batch_size=8),
    ]
    meta = MetaTrainer("celo2", tasks=tasks, estimator=PES(num_pairs=2, trunc_length=5))
    settings = EstimatorSettings(
        PES(num_pairs=2, std=0.01, trunc_length=5), LogUniformLengthSchedule(6, 12), 5,
        ReparamAugmentation("global", 1e-3, 1e3), seed=3,
    )
    batched, alone = (PESEstimator(meta.lopt, meta.trainable_names, meta.instances, settings, b) for b in (True, False))
    return meta, batched, alone


def test_batched_estimate_equals_the_instance_by_instance_one():
    meta, batched, alone = _estimators()
    batched.prepare()
    alone.prepare()
    assert [[w.index for w in g] for g in batched.groups] == [[0, 2], [1], [3]]
    assert [[w.index for w in g] for g in alone.groups] == [[0], [1], [2], [3]]
    theta = torch.cat([p.detach().flatten() for p in meta.lopt.parameters()])
    resets = 0.0
    for step in range(4):  # episodes of 6-12 steps, 5 per window: resets happen inside windows
        grad_b, logs_b = batched.estimate(theta, step)
        grad_a, logs_a = alone.estimate(theta, step)
        assert logs_b.keys() == logs_a.keys()
        assert logs_b["meta/resets"] == logs_a["meta/resets"]
        resets += logs_a["meta/resets"]
        # The group's vmapped matmuls may sum in another order (on this CPU they are bit-identical):
        # every loss then agrees to a few float32 ulps of a loss ≈ 2.3, δ ≈ 1e-6, and the estimate
        # Σ Δloss·ε/(2σ²) turns that into δ·|ε|/(2σ²) ≈ 1e-6·0.01/2e-4 = 5e-5 per entry (σ = 0.01),
        # against entries of 1e-2 to 1 here. Mixing up two instances' rows changes them by ~5e-2.
        for k in logs_a:
            assert abs(logs_b[k] - logs_a[k]) <= 1e-5 * max(1.0, abs(logs_a[k])), k
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-4)
        assert grad_a.abs().max() > 1e-2  # a non-trivial estimate is compared
    assert resets > 0
    # Each worker keeps its own particles (own storage: checkpoints hold only their own rows).
    for wb, wa in zip(batched.workers, alone.workers):
        sb, sa = wb.state_dict(), wa.state_dict()
        assert sb.keys() == sa.keys()
        for pb, pa in zip(sb["params"], sa["params"]):
            assert pb.untyped_storage().size() == pb.numel() * pb.element_size()
            torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5)


def test_batched_particles_restore_into_an_instance_by_instance_run():
    meta, batched, alone = _estimators()
    batched.prepare()
    alone.prepare()
    theta = torch.cat([p.detach().flatten() for p in meta.lopt.parameters()])
    batched.estimate(theta, 0)
    # A checkpoint (a copy, as torch.save makes) of a batched run resumes instance by instance.
    alone.load_state_dict(copy.deepcopy(batched.state_dict()))
    grad_b, _ = batched.estimate(theta, 1)
    grad_a, _ = alone.estimate(theta, 1)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-4)
