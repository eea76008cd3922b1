import math

import pytest
import torch

from lightning_lopt.optim.schedules import WarmupCosine, warmup_cosine


def _reference(t: int, steps: int, warmup: int) -> float:
    """The schedule written out: (t+1)/w while warming up, then half a cosine period from 1 to 0."""
    if t < warmup:
        return (t + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / (steps - warmup))))


def test_warmup_cosine_multiplier_by_hand() -> None:
    f = warmup_cosine(100)  # warmup: round(0.05 * 100) = 5 steps
    assert [f(t) for t in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert f(5 + 95 // 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert f(100) == pytest.approx(0.0) and f(99) > 0.0
    assert f(250) == pytest.approx(0.0)  # past the horizon it stays at zero, it does not come back up
    g = warmup_cosine(40, warmup_fraction=0.0)  # no warmup still starts with one step at full rate
    assert g(0) == 1.0 and g(20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 39)))


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_warmup_cosine_refuses_a_bad_horizon(steps) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        warmup_cosine(steps)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_warmup_cosine_refuses_a_bad_warmup(fraction) -> None:
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_cosine(100, fraction)


def test_scheduler_sets_the_lr_of_every_group_each_step_and_resumes() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.5}, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 2.0}])
    schedule = WarmupCosine(opt, num_steps=60)  # warmup round(3.0) = 3 steps
    seen = []
    for _ in range(30):
        seen.extend(g["lr"] for g in opt.param_groups)
        opt.step()
        schedule.step()
    assert seen == pytest.approx([lr * _reference(t, 60, 3) for t in range(30) for lr in (0.5, 2.0)])
    # A fresh scheduler loaded from the state dict continues the same schedule.
    saved = schedule.state_dict()
    assert saved["num_steps"] == 60
    opt2 = torch.optim.SGD([{"params": [w], "lr": 0.5}, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 2.0}])
    resumed = WarmupCosine(opt2, num_steps=100)  # configured with another length: the saved one wins
    resumed.load_state_dict(saved)
    assert resumed.num_steps == 60
    opt2.step()
    resumed.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5 * _reference(31, 60, 3))
    assert opt2.param_groups[1]["lr"] == pytest.approx(2.0 * _reference(31, 60, 3))
