"""Episode lengths: one log-uniform range against the formula, two ranges against their mixture law."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lopt.meta import LogUniformLengthSchedule


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_one_range_is_the_floor_of_exp_of_a_uniform_log_length():
    lengths = LogUniformLengthSchedule(100, 1000).sample(1000, _generator(3))
    u = torch.rand(1000, generator=_generator(3), dtype=torch.float64).tolist()
    expected = [min(max(int(math.exp(math.log(100) + x * math.log(10))), 100), 1000) for x in u]
    assert lengths.dtype == torch.int64
    assert lengths.tolist() == expected


def test_two_ranges_draw_the_long_range_with_its_probability_and_split_the_windows_as_documented():
    n = 200_000
    schedule = LogUniformLengthSchedule(100, 10000, split_length=2000, long_probability=0.12)
    lengths = schedule.sample(n, _generator(0)).double()
    long = lengths > 2000
    short = lengths < 2000
    assert lengths.min() >= 100 and lengths.max() <= 10000
    # Binomial s.e. of the long share: sqrt(0.12 * 0.88 / n) ≈ 7e-4; five of them.
    assert abs(long.double().mean().item() - 0.12) < 0.0036
    # Each range on its own is log-uniform: its log-lengths are uniform, mean at the log-midpoint
    # (s.e. of a uniform mean: range / sqrt(12 m), about 0.002 here; the floor to int shifts by < 1e-3).
    for mask, low, high in ((short, 100, 2000), (long, 2000, 10000)):
        mean_log = lengths[mask].log().mean().item()
        assert abs(mean_log - 0.5 * (math.log(low) + math.log(high))) < 0.02
    # The docstring's share of inner steps spent in long episodes, p E[L_long] / E[L].
    mean = lambda lo, hi: (hi - lo) / math.log(hi / lo)  # noqa: E731
    share = 0.12 * mean(2000, 10000) / (0.12 * mean(2000, 10000) + 0.88 * mean(100, 2000))
    assert 0.45 < share < 0.55
    assert abs(lengths[long].sum().item() / lengths.sum().item() - share) < 0.02


@pytest.mark.parametrize("p, bound", [(0.0, "short"), (1.0, "long")])
def test_a_certain_range_gives_only_its_lengths(p, bound):
    lengths = LogUniformLengthSchedule(100, 10000, split_length=2000, long_probability=p).sample(500, _generator(1))
    assert (lengths <= 2000).all() if bound == "short" else (lengths >= 2000).all()


def test_a_split_with_probability_zero_draws_the_short_range_from_the_same_uniforms():
    plain = LogUniformLengthSchedule(100, 2000).sample(300, _generator(5))
    split = LogUniformLengthSchedule(100, 10000, split_length=2000, long_probability=0.0).sample(300, _generator(5))
    assert torch.equal(plain, split)  # same uniform draw, short range [100, 2000]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_length": 100, "max_length": 1000, "long_probability": 0.1}, "needs a split_length"),
        ({"min_length": 100, "max_length": 1000, "split_length": 50, "long_probability": 0.1}, "must lie in"),
        ({"min_length": 100, "max_length": 1000, "split_length": 2000, "long_probability": 0.1}, "must lie in"),
        ({"min_length": 100, "max_length": 1000, "split_length": 500, "long_probability": 1.5}, r"in \[0, 1\]"),
        ({"min_length": 1000, "max_length": 100}, "must not exceed"),
    ],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LogUniformLengthSchedule(**kwargs)
