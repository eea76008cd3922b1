"""PES: the estimator's arithmetic on a hand example, and unbiasedness on a problem with a known gradient."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lopt.meta import LogUniformLengthSchedule, MetaTrainer, PES, Task
from lightning_lopt.meta.pes import meta_objective, pes_gradient, sample_perturbations, window_meta_loss
from lightning_lopt.meta.rng import generator

from meta_toys import ConstantData, LearnedSGD, Quadratic


def test_pes_gradient_credits_the_done_step_to_the_new_perturbation():
    # One pair, 4 steps: the episode ends on step 1 (done), step 2 is the masked reset step.
    delta = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    mask = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    done = torch.tensor([[0], [1], [0], [0]])
    eps = torch.tensor([[0.5, -1.0]])
    accum = torch.tensor([[2.0, 3.0]])
    std = 0.1
    grad, next_accum = pes_gradient(delta, mask, done, eps, accum, std)
    old = 1.0 / 3  # step 0 only: F is already 1 on the done step
    new = (2.0 + 4.0) / 3  # the done step and step 3; the reset step is masked
    expected = (old * (accum + eps) + new * eps) / (2 * std**2)
    torch.testing.assert_close(grad, expected[0])
    torch.testing.assert_close(next_accum, eps)  # the episode ended: restart from this window's ε


def test_pes_gradient_keeps_accumulating_within_an_episode_and_averages_pairs():
    delta = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    mask = torch.ones(2, 2)
    done = torch.zeros(2, 2, dtype=torch.long)
    eps = torch.tensor([[1.0], [2.0]])
    accum = torch.tensor([[0.5], [0.0]])
    grad, next_accum = pes_gradient(delta, mask, done, eps, accum, std=1.0)
    # pair 0: a = (1 + 3)/2 = 2, A = 1.5 → 1.5; pair 1: a = −1, A = 2 → −1; mean = 0.25
    torch.testing.assert_close(grad, torch.tensor([0.25]))
    torch.testing.assert_close(next_accum, accum + eps)


def test_window_meta_loss_is_the_masked_mean_of_both_members():
    pos = torch.tensor([[1.0], [3.0], [100.0]])
    neg = torch.tensor([[2.0], [4.0], [100.0]])
    mask = torch.tensor([[1.0], [1.0], [0.0]])
    assert float(window_meta_loss(pos, neg, mask)) == pytest.approx(2.5)


def test_perturbations_are_reproducible_per_pair_and_masked():
    gens = lambda: [generator(0, 0, j, 5, 1) for j in range(3)]  # noqa: E731
    a = sample_perturbations(10, 0.01, gens())
    b = sample_perturbations(10, 0.01, gens())
    assert torch.equal(a, b) and a.shape == (3, 10)
    assert not torch.equal(a[0], a[1])
    assert 0.005 < float(a.std()) < 0.02
    mask = torch.tensor([1.0] * 5 + [0.0] * 5)
    assert torch.all(sample_perturbations(10, 0.01, gens(), mask)[:, 5:] == 0)


def _true_window_gradient(log_lr: float, curvatures, trunc: int, window: int) -> float:
    """d/dlog_lr of the mean pre-update loss in window ``window`` of SGD on ½Σ a x², x0 = 1 (float64)."""
    lr = math.exp(log_lr)
    total = 0.0
    for t in range(window * trunc, (window + 1) * trunc):
        # f_t = ½ Σ a (1 − lr·a)^(2t); d f_t / d lr = −Σ t·a²·(1 − lr·a)^(2t−1); chain rule: · lr
        total += sum(-t * a * a * (1 - lr * a) ** (2 * t - 1) for a in curvatures) * lr
    return total / trunc


@pytest.mark.parametrize("window", [0, 1])
def test_pes_is_unbiased_on_a_quadratic_with_a_learned_step_size(window):
    curvatures = (0.5, 1.0, 2.0)
    trunc, pairs, repeats = 5, 128, 16
    estimates = []
    for seed in range(repeats):
        meta = MetaTrainer(
            LearnedSGD(log_lr=-2.0),
            tasks=[Task(Quadratic, ConstantData(), module_kwargs={"curvatures": curvatures}, loss_cap=1e6)],
            estimator=PES(num_pairs=pairs, std=0.01, trunc_length=trunc),
            truncation=LogUniformLengthSchedule(1000, 1000),
            initial_offset=0,
            seed=seed,
        )
        meta.setup("fit")
        for step in range(window + 1):  # θ is not updated: meta_gradient only estimates
            grad, _ = meta.meta_gradient(step)
        estimates.append(float(grad[0]))
    est = torch.tensor(estimates, dtype=torch.float64)
    mean, stderr = float(est.mean()), float(est.std() / math.sqrt(repeats))
    truth = _true_window_gradient(-2.0, curvatures, trunc, window)
    assert abs(truth) > 10 * stderr  # the check has power: the gradient is far from 0
    assert abs(mean - truth) < 4 * stderr + 1e-3 * abs(truth), (mean, truth, stderr)


def test_meta_objective_is_the_loss_or_its_floored_logarithm():
    losses = torch.tensor([[2.0, 0.5], [0.0, 1e-5]])  # 0: a masked reset step; 1e-5: below the floor
    assert torch.equal(meta_objective(losses, "loss"), losses)
    expected = torch.tensor([[math.log(2.0), math.log(0.5)], [math.log(1e-3), math.log(1e-3)]])
    torch.testing.assert_close(meta_objective(losses, "log"), expected)
    # The same relative gap weighs the same at a high and a low loss under "log", not under "loss".
    high, low = meta_objective(torch.tensor([2.0, 1.0]), "log"), meta_objective(torch.tensor([0.2, 0.1]), "log")
    torch.testing.assert_close(high[0] - high[1], low[0] - low[1])
    with pytest.raises(ValueError, match="meta_objective must be one of"):
        meta_objective(losses, "mse")
