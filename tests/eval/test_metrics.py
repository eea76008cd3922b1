"""The evaluation's pure metrics against hand-computed examples (lightning_lopt.eval.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_lopt.eval import metrics


def test_ema_is_learned_optimizations_recurrence() -> None:
    # y0 = x0; y1 = 0.5 * 4 + 0.5 * 2 = 3; y2 = 0.5 * 3 + 0.5 * 0 = 1.5
    assert metrics.ema([4.0, 2.0, 0.0], 0.5) == pytest.approx([4.0, 3.0, 1.5])
    assert metrics.ema([4.0, 2.0], 0.0) == pytest.approx([4.0, 2.0])
    with pytest.raises(ValueError, match="alpha"):
        metrics.ema([1.0], 1.0)


def test_final_loss_is_the_mean_of_the_last_ten_batches() -> None:
    curve = np.arange(20.0)
    assert metrics.final_loss(curve) == pytest.approx(14.5)  # mean of 10..19
    assert metrics.final_loss(curve, at_step=10) == pytest.approx(4.5)  # mean of 0..9
    assert metrics.final_loss(curve, at_step=4) == pytest.approx(1.5)  # fewer than 10 steps: all of them
    # With an EMA of 0.5 the curve [4, 2, 0] becomes [4, 3, 1.5].
    assert metrics.final_loss([4.0, 2.0, 0.0], ema_alpha=0.5) == pytest.approx((4 + 3 + 1.5) / 3)
    with pytest.raises(ValueError, match="at_step"):
        metrics.final_loss(curve, at_step=21)


def test_iqm_drops_floor_of_a_quarter_when_n_is_not_divisible_by_4() -> None:
    # N = 6: floor(1.5) = 1 value dropped from each end, no fractional weights: mean(2, 3, 4, 5).
    assert metrics.iqm(np.array([[100.0, 2.0, 3.0], [4.0, 5.0, 1.0]])) == pytest.approx(3.5)
    # N = 5: floor(1.25) = 1 from each end: mean(2, 3, 4).
    assert metrics.iqm(np.array([[5.0, 1.0, 3.0, 2.0, 4.0]])) == pytest.approx(3.0)
    # N = 7: floor(1.75) = 1 from each end; a fractional trim would weight 2 and 60 by 0.25.
    assert metrics.iqm(np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 70.0]])) == pytest.approx(4.0)


def test_median_averages_runs_before_taking_the_median_over_tasks() -> None:
    scores = np.array([[1.0, 10.0, 0.0], [3.0, 20.0, 100.0]])  # task means 2, 15, 50
    assert metrics.median_of_means(scores) == pytest.approx(15.0)


def test_optimality_gap_clips_scores_above_the_reference() -> None:
    # min(x, 1) = [0.5, 1, 1]: gap = 1 - 2.5 / 3
    assert metrics.optimality_gap(np.array([[0.5, 1.5, 2.0]])) == pytest.approx(1 / 6)
    assert metrics.optimality_gap(np.array([[3.0, 4.0]])) == 0.0
    assert metrics.optimality_gap(np.array([[0.5, 1.5]]), gamma=2.0) == pytest.approx(1.0)


def test_speedup_is_horizon_over_first_step_reaching_the_target() -> None:
    assert metrics.speedup([4.0, 3.0, 2.0, 1.0], target=2.0) == pytest.approx(4 / 3)  # reached at step 3
    assert metrics.speedup([4.0, 3.0, 2.0, 1.0], target=1.0) == pytest.approx(1.0)  # at the last step
    assert metrics.speedup([1.0, 3.0], target=2.0) == pytest.approx(2.0)  # at step 1


def test_speedup_is_zero_when_the_target_is_never_reached() -> None:
    assert metrics.speedup([4.0, 3.0, 2.5], target=2.0) == 0.0
    # The raw curve dips to 1.0 once, but the EMA (0.5) gives 4, 2.5, 2.75: never at 2.
    assert metrics.speedup([4.0, 1.0, 3.0], target=2.0, ema_alpha=0.5) == 0.0
    assert metrics.speedup([4.0, 1.0, 3.0], target=2.0) == pytest.approx(1.5)


def test_normalized_loss() -> None:
    assert metrics.normalized_loss(2.0, 4.0) == pytest.approx(0.5)
    assert metrics.normalized_loss(2.0, np.array([1.0, 2.0])) == pytest.approx([2.0, 1.0])
    assert metrics.normalized_loss(2.0, 0.0) == math.inf


def test_average_ranks_share_the_mean_rank_on_ties() -> None:
    values = {
        "t1": {"a": 1.0, "b": 1.0, "c": 2.0},  # a, b tie for 1st and 2nd: 1.5 each; c 3
        "t2": {"a": 3.0, "b": 1.0, "c": 2.0},  # b 1, c 2, a 3
        "t3": {"a": 5.0, "b": 5.0, "c": 5.0},  # all tie: 2 each
    }
    assert metrics.average_ranks(values) == pytest.approx({"a": (1.5 + 3 + 2) / 3, "b": (1.5 + 1 + 2) / 3, "c": (3 + 2 + 2) / 3})
    with pytest.raises(ValueError, match="t2"):
        metrics.average_ranks({"t1": {"a": 1.0, "b": 2.0}, "t2": {"a": 1.0}})


def test_bootstrap_is_deterministic_under_a_seed() -> None:
    scores = np.random.default_rng(0).normal(1.0, 0.3, size=(5, 7))
    first = metrics.interval_estimate(scores, metrics.iqm, reps=2000, seed=3)
    again = metrics.interval_estimate(scores, metrics.iqm, reps=2000, seed=3)
    other = metrics.interval_estimate(scores, metrics.iqm, reps=2000, seed=4)
    assert first == again
    assert first[1] != other[1]
    point, (low, high) = first
    assert point == pytest.approx(metrics.iqm(scores))
    assert low < point < high


def test_bootstrap_resamples_runs_within_each_task_and_keeps_tasks() -> None:
    # Every task's runs are identical, so resampling runs within a task changes nothing: the interval
    # has zero width. A bootstrap that also resampled tasks would spread between 1 and 3.
    scores = np.array([[1.0, 2.0, 3.0]] * 4)
    for statistic in (metrics.iqm, metrics.median_of_means, metrics.optimality_gap):
        point, (low, high) = metrics.interval_estimate(scores, statistic, reps=500, seed=0)
        assert low == pytest.approx(point) and high == pytest.approx(point)


def test_bootstrap_closed_forms_match_the_statistic_per_replicate() -> None:
    # The vectorised aggregates and an arbitrary statistic applied replicate by replicate see the
    # same resamples under the same seed, so IQM through a lambda gives the same interval.
    scores = np.random.default_rng(1).gamma(2.0, size=(4, 5))
    fast = metrics.interval_estimate(scores, metrics.iqm, reps=300, seed=0)
    slow = metrics.interval_estimate(scores, lambda s: metrics.iqm(s), reps=300, seed=0)
    assert fast[0] == pytest.approx(slow[0])
    assert fast[1] == pytest.approx(slow[1])


def test_one_run_per_task_gives_a_degenerate_interval() -> None:
    # N = 3: floor(0.75) = 0 values trimmed, so the IQM is the plain mean.
    point, (low, high) = metrics.interval_estimate(np.array([[1.0, 2.0, 4.0]]), metrics.iqm, reps=100)
    assert low == high == point == pytest.approx(7 / 3)


def test_loglog_slope() -> None:
    assert metrics.loglog_slope([8, 16, 64], [3 * w**0.5 for w in (8, 16, 64)]) == pytest.approx(0.5)
    assert math.isnan(metrics.loglog_slope([8, 16], [0.0, 1.0]))
