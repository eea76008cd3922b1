"""The particle state machine: pairs share data, resets, inits and lengths; resets are masked; NaNs reset."""

from __future__ import annotations

import torch

from lightning_lopt.meta import ImageMLPTask, LogUniformLengthSchedule, Task
from lightning_lopt.meta.rng import generator
from lightning_lopt.meta.unroll import init_particles, normalize_loss, unroll_window
from lightning_lopt.optim.architectures import SmallFCLOpt

from meta_toys import ConstantData, LearnedSGD, Quadratic


def _keys(step):
    return lambda stream, pair, t: generator(7, 0, pair, step, int(stream), t)


def _theta(lopt, n, eps=0.0):
    flat = {k: v.detach() for k, v in lopt.state_dict().items()}
    out = {}
    for k, v in flat.items():
        noise = eps * torch.randn(n, *v.shape, generator=torch.Generator().manual_seed(1))
        out[k] = torch.cat([v + noise, v - noise])
    return out


def test_normalize_loss_clips_and_maps_nonfinite_to_the_cap():
    loss = torch.tensor([-1.0, 0.5, 9.0, float("nan"), float("inf"), float("-inf")])
    assert normalize_loss(loss, 3.0).tolist() == [0.0, 0.5, 3.0, 3.0, 3.0, 3.0]


def test_the_two_members_of_a_pair_share_data_resets_and_inits():
    inst = ImageMLPTask("digits", widths=[16], depth=2, batch_size=32).build(lopt_is_mu=True)[0]
    lopt = SmallFCLOpt()
    n, steps = 3, 40
    theta = _theta(lopt, n)  # θ+ = θ−: the members must then follow identical trajectories
    schedule = LogUniformLengthSchedule(8, 15)
    particles = init_particles(inst, lopt, theta, _keys(0), schedule, 5, None, n, dim=1)
    batches = inst.sample(steps, [generator(7, 0, j, 0, 2) for j in range(n)])
    particles, out = unroll_window(inst, lopt, theta, particles, batches, _keys(0), schedule, None)
    assert out.resets >= n  # every pair reset at least once inside the window
    torch.testing.assert_close(out.raw_losses[:, :n], out.raw_losses[:, n:], rtol=0, atol=0)
    for p in particles.params:
        assert torch.equal(p[:n], p[n:])
    # Reset steps (mask 0) are exactly the steps after a done; their loss is excluded.
    done_before = torch.cat([torch.zeros(1, n, dtype=torch.bool), out.dones[:-1]])
    assert torch.equal(~out.masks, done_before)
    assert torch.all(out.losses[:, :n][~out.masks] == 0)
    # Pairs are independent: different data and inits give different losses.
    assert not torch.equal(out.raw_losses[:, 0], out.raw_losses[:, 1])
    assert torch.all((particles.length >= 8) & (particles.length <= 15))


def test_perturbed_members_differ_but_reset_together():
    inst = ImageMLPTask("digits", widths=[16], depth=2, batch_size=32).build(lopt_is_mu=True)[0]
    lopt = SmallFCLOpt()
    n = 2
    theta = _theta(lopt, n, eps=0.05)
    schedule = LogUniformLengthSchedule(10, 10)
    particles = init_particles(inst, lopt, theta, _keys(0), schedule, 0, None, n, dim=1)
    batches = inst.sample(25, [generator(7, 0, j, 0, 2) for j in range(n)])
    _, out = unroll_window(inst, lopt, theta, particles, batches, _keys(0), schedule, None)
    assert not torch.equal(out.raw_losses[1:, :n], out.raw_losses[1:, n:])
    # The loss before the first update depends only on the shared init and batch.
    assert torch.equal(out.raw_losses[0, :n], out.raw_losses[0, n:])
    assert out.dones[:, 0].nonzero().flatten().tolist() == [9, 20]  # length 10, then a reset step


def test_a_diverging_particle_is_reset_counted_and_capped():
    task = Task(Quadratic, ConstantData(), module_kwargs={"curvatures": (1.0, 1.0)}, loss_cap=5.0)
    inst = task.build(lopt_is_mu=False)[0]
    lopt = LearnedSGD(log_lr=2.0)  # lr ≈ 7.4 on curvature 1: |x| grows 6.4× a step, overflows fast
    n = 1
    theta = _theta(lopt, n)
    schedule = LogUniformLengthSchedule(1000, 1000)
    particles = init_particles(inst, lopt, theta, _keys(0), schedule, 0, None, n, dim=1)
    batches = inst.sample(120, [generator(0)])
    particles, out = unroll_window(inst, lopt, theta, particles, batches, _keys(0), schedule, None)
    assert out.nan_resets >= 1 and out.resets >= 1
    assert torch.all(out.losses <= 5.0) and torch.all(torch.isfinite(out.losses))
    assert all(torch.isfinite(p).all() for p in particles.params)  # re-initialised after the NaN
