"""Celo's recipe: two stages that freeze complementary parts of θ, task augmentation, the horizon."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_lopt.meta import ImageMLPTask, LogUniformLengthSchedule, MetaTrainer, PES, ReparamAugmentation, Task
from lightning_lopt.meta.rng import generator
from lightning_lopt.meta.unroll import init_particles, unroll_window
from lightning_lopt.optim.architectures import CeloLOpt

from meta_toys import ConstantData, LearnedSGD, Quadratic

SMALL = {"estimator": PES(num_pairs=2, trunc_length=5), "truncation": LogUniformLengthSchedule(8, 30), "initial_offset": 5}


def _celo(stage, **kwargs):
    task = ImageMLPTask("digits", widths=[16], depth=1, param="sp", batch_size=16)
    aug = ReparamAugmentation("global", 1e-3, 1e3)
    return MetaTrainer("celo", tasks=[task], stage=stage, augmentation=aug, **{**SMALL, **kwargs})


def test_stage_one_trains_the_rule_and_stage_two_the_scheduler(tmp_path, fit_kwargs):
    stage1 = _celo(1)
    assert isinstance(stage1.lopt, CeloLOpt) and stage1.lopt.train_phase == 1
    before = {k: v.clone() for k, v in stage1.lopt.state_dict().items()}
    L.Trainer(**fit_kwargs(tmp_path / "s1", 3)).fit(stage1)
    after = stage1.lopt.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("scheduler."))
    assert not torch.equal(after["mlp.0.weight"], before["mlp.0.weight"])
    stage1.save_pretrained(tmp_path / "stage1")

    stage2 = _celo(2, init_from=str(tmp_path / "stage1"))
    assert stage2.lopt.train_phase == 2
    start = {k: v.clone() for k, v in stage2.lopt.state_dict().items()}
    assert all(torch.equal(start[k], after[k]) for k in after)
    L.Trainer(**fit_kwargs(tmp_path / "s2", 3)).fit(stage2)
    end = stage2.lopt.state_dict()
    assert all(torch.equal(end[k], start[k]) for k in start if not k.startswith("scheduler."))
    assert not torch.equal(end["scheduler.lstm.weight"], start["scheduler.lstm.weight"])


def test_stage_is_required_to_make_sense():
    task = ImageMLPTask("digits", widths=[8], depth=1, param="sp", batch_size=16)
    with pytest.raises(ValueError, match="stage must be"):
        MetaTrainer("celo", tasks=[task], stage=3)


def test_augmentation_rescales_stored_params_and_gradients_not_the_function():
    # SGD with step η on L(τθ): the stored θ moves by η·τ·∇L, so the network weight τθ moves by ητ²∇L.
    task = Task(Quadratic, ConstantData(), module_kwargs={"curvatures": (1.0,), "start": 2.0}, loss_cap=1e6)
    inst = task.build(lopt_is_mu=False)[0]
    lopt = LearnedSGD(log_lr=-3.0)
    theta = {k: v.detach().expand(2, *v.shape) for k, v in lopt.state_dict().items()}
    keys = lambda stream, pair, t: generator(1, pair, int(stream), t)  # noqa: E731
    aug = ReparamAugmentation("global", 0.1, 10.0)
    schedule = LogUniformLengthSchedule(1000, 1000)
    particles = init_particles(inst, lopt, theta, keys, schedule, 0, aug, 1, dim=1)
    tau = float(particles.tau[0].reshape(()))
    assert 0.1 <= tau <= 10.0
    torch.testing.assert_close(particles.params[0][0], torch.tensor([2.0 / tau]))  # stored θ0/τ
    batches = inst.sample(2, [generator(0)])
    _, out = unroll_window(inst, lopt, theta, particles, batches, keys, schedule, aug)
    eta = torch.exp(torch.tensor(-3.0))
    x0 = 2.0
    x1 = x0 - float(eta) * tau**2 * x0
    torch.testing.assert_close(out.raw_losses[:, 0], torch.tensor([0.5 * x0**2, 0.5 * x1**2]))  # the true loss


def test_celo_sees_each_particles_sampled_horizon(monkeypatch):
    from lightning_lopt.meta import unroll

    seen = []
    real = unroll.particle_step

    def spy(module, theta, params, grads, state, ctx):
        seen.append((ctx.num_steps.clone(), ctx.loss.clone()))
        return real(module, theta, params, grads, state, ctx)

    monkeypatch.setattr(unroll, "particle_step", spy)
    task = ImageMLPTask("digits", widths=[8], depth=1, param="sp", batch_size=16)
    meta = MetaTrainer("celo", tasks=[task], stage=2, estimator=PES(num_pairs=2, trunc_length=5),
                       truncation=LogUniformLengthSchedule(8, 30), initial_offset=0)
    meta.setup("fit")
    meta.meta_gradient(0)
    horizon, loss = seen[0]
    particles = meta.gradient_estimator.workers[0].particles
    # Both members of a pair get the pair's sampled episode length as Celo's horizon, and the loss.
    assert horizon.shape == (4,) and torch.equal(horizon[:2], horizon[2:])
    assert torch.all((horizon >= 8) & (horizon <= 30))
    assert torch.all(torch.isfinite(loss)) and loss.shape == (4,)
    assert particles.opt_state["iteration"].max() == 5
