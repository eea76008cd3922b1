"""Pure metric functions of the evaluation: final loss, ranks, Celo's normalised scores and rliable's
aggregates with stratified bootstrap confidence intervals.

Everything here takes and returns NumPy arrays or plain Python values and has no side effects, so
every number in a report can be recomputed from the stored curves.

* :func:`final_loss`: the mean of the last 10 training-batch losses (μLO, Celo), optionally after
  EMA smoothing (:func:`ema`), read at the end of a curve or at an earlier step.
* :func:`average_ranks`: μLO Table 2: rank the optimizers on each task (ties share the mean rank),
  then average the ranks over tasks.
* :func:`normalized_loss` and :func:`speedup`: Celo §4's per-run scores against a reference (tuned
  AdamW): ``L_ref / L_opt`` and ``T / t*`` with ``t*`` the first step at which the smoothed curve
  reaches ``L_ref`` (0 when it never does).
* :func:`iqm`, :func:`median_of_means`, :func:`optimality_gap`: rliable's ``aggregate_iqm``,
  ``aggregate_median`` and ``aggregate_optimality_gap`` over a ``[runs, tasks]`` score matrix.
* :func:`paired_comparison`: two optimizers on the same seeds (same initialisations and batches):
  the mean per-seed difference, its paired standard error and how many seeds each wins.
* :func:`interval_estimate`: rliable's ``get_interval_estimates``: the statistic on the scores and a
  95% percentile confidence interval from a stratified bootstrap (runs resampled within each task,
  tasks kept fixed).

rliable itself does not import here (its ``arch`` dependency fails against pandas 3), so the
aggregates use SciPy as rliable does underneath: IQM is ``scipy.stats.trim_mean(x, 0.25,
axis=None)``, which drops ``floor(0.25 N)`` values from each end with no interpolation, and the
stratified bootstrap is ``scipy.stats.bootstrap`` with one sample per task and ``paired=False``
(each task's runs resampled independently), ``method="percentile"``.

Example::

    import numpy as np
    from lightning_lopt.eval import metrics
    scores = np.array([[1.2, 0.9, 1.0], [1.1, 0.8, 1.4]])      # [seeds, tasks]
    metrics.iqm(scores)                                         # 1.05
    metrics.interval_estimate(scores, metrics.iqm, reps=2000, seed=0)   # (1.05, (lo, hi))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.signal
import scipy.stats

#: Batches averaged for the final loss (μLO's and Celo's ``last_eval_batches``).
FINAL_BATCHES = 10
#: rliable's default number of bootstrap replicates for interval estimates.
BOOTSTRAP_REPS = 50_000

Statistic = Callable[[np.ndarray], float]


def ema(values: Sequence[float] | np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average ``y_0 = x_0``, ``y_t = alpha * y_{t-1} + (1 - alpha) * x_t``.

    This is learned_optimization's ``baselines.normalizers.ema`` (no bias correction), computed as
    a linear filter. ``alpha = 0`` returns the values unchanged.

    Example::

        ema([4.0, 2.0], 0.5)     # array([4., 3.])
    """
    x = np.asarray(values, dtype=np.float64)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"ema: alpha must be in [0, 1), got {alpha!r}")
    if x.size == 0 or alpha == 0.0:
        return x.copy()
    # lfilter's initial condition alpha * x_0 makes the first output exactly x_0.
    y, _ = scipy.signal.lfilter([1.0 - alpha], [1.0, -alpha], x, zi=[alpha * x[0]])
    return y


def final_loss(
    curve: Sequence[float] | np.ndarray,
    *,
    at_step: int | None = None,
    last: int = FINAL_BATCHES,
    ema_alpha: float = 0.0,
) -> float:
    """The mean of the last ``last`` training losses up to ``at_step`` (default: the whole curve).

    ``curve[i]`` is the loss of the batch of step ``i + 1`` (before that update), so ``at_step=1000``
    averages the losses of steps 991..1000. With ``ema_alpha`` the curve is smoothed first (Celo).

    Example::

        final_loss(range(20))               # 14.5: the mean of 10..19
        final_loss(range(20), at_step=10)   # 4.5
    """
    x = np.asarray(curve, dtype=np.float64)
    end = x.size if at_step is None else at_step
    if not 0 < end <= x.size:
        raise ValueError(f"final_loss: at_step must be in 1..{x.size}, got {at_step!r}")
    smoothed = ema(x[:end], ema_alpha)
    return float(smoothed[-min(last, end) :].mean())


def average_ranks(values: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """μLO Table 2's average rank: ``values[task][optimizer]`` is a loss (lower is better).

    On each task the optimizers are ranked 1..K with ``scipy.stats.rankdata`` (ties share the mean
    of their ranks), then each optimizer's ranks are averaged over the tasks. Every task must have
    a value for the same optimizers.

    Example::

        average_ranks({"t1": {"a": 1.0, "b": 1.0, "c": 2.0}, "t2": {"a": 3.0, "b": 1.0, "c": 2.0}})
        # {"a": 2.25, "b": 1.25, "c": 2.5}
    """
    if not values:
        return {}
    optimizers = list(next(iter(values.values())))
    ranks = []
    for task, by_opt in values.items():
        if sorted(by_opt) != sorted(optimizers):
            raise ValueError(f"average_ranks: task {task!r} has optimizers {sorted(by_opt)}, expected {sorted(optimizers)}")
        ranks.append(scipy.stats.rankdata([by_opt[o] for o in optimizers], method="average"))
    mean = np.mean(ranks, axis=0)
    return {o: float(r) for o, r in zip(optimizers, mean)}


def normalized_loss(reference: float, loss: float | np.ndarray) -> float | np.ndarray:
    """Celo's normalised final-loss score ``reference / loss``: above 1 beats the reference.

    Losses are positive here (capped, never NaN); a zero loss scores ``inf``.
    """
    loss_arr = np.asarray(loss, dtype=np.float64)
    with np.errstate(divide="ignore"):
        score = np.float64(reference) / loss_arr
    return float(score) if score.ndim == 0 else score


def speedup(curve: Sequence[float] | np.ndarray, target: float, *, ema_alpha: float = 0.0) -> float:
    """Celo's speedup score ``T / t*``: ``T`` the curve's length, ``t*`` the first step at which the
    (EMA-smoothed) curve is at or below ``target``; ``0.0`` when it never gets there.

    Steps count from 1: reaching the target on the last step scores 1.

    Example::

        speedup([4.0, 3.0, 2.0, 1.0], target=2.0)   # 4 / 3
        speedup([4.0, 3.0], target=1.0)             # 0.0
    """
    smoothed = ema(curve, ema_alpha)
    hits = np.flatnonzero(smoothed <= target)
    if hits.size == 0:
        return 0.0
    return smoothed.size / float(hits[0] + 1)


def iqm(scores: np.ndarray) -> float:
    """rliable's interquartile mean over all runs and tasks: ``trim_mean(scores, 0.25, axis=None)``.

    ``floor(0.25 N)`` values are dropped from each end of the ``N`` sorted scores, with no
    fractional weighting: with N = 6, one from each end, and the middle 4 are averaged.
    """
    return float(scipy.stats.trim_mean(np.asarray(scores, dtype=np.float64), 0.25, axis=None))


def median_of_means(scores: np.ndarray) -> float:
    """rliable's ``aggregate_median``: the median over tasks of each task's mean over runs."""
    return float(np.median(np.mean(np.asarray(scores, dtype=np.float64), axis=0)))


def optimality_gap(scores: np.ndarray, gamma: float = 1.0) -> float:
    """rliable's ``aggregate_optimality_gap``: ``gamma - mean(min(scores, gamma))`` over all runs and
    tasks: the average shortfall below the reference. Scores above ``gamma`` count as ``gamma``."""
    return float(gamma - np.mean(np.minimum(np.asarray(scores, dtype=np.float64), gamma)))


#: The aggregates reported for every score matrix, by name.
AGGREGATES: dict[str, Statistic] = {"IQM": iqm, "median": median_of_means, "optimality gap": optimality_gap}


def _stacked(columns: tuple[np.ndarray, ...], axis: int) -> np.ndarray:
    """SciPy's per-task samples (each ``[..., runs]``) as one ``[..., runs, tasks]`` array."""
    return np.stack([np.moveaxis(c, axis, -1) for c in columns], axis=-1)


def _vectorized(statistic: Statistic) -> Callable[..., np.ndarray]:
    """``statistic`` of a ``[runs, tasks]`` matrix as SciPy's vectorised multi-sample statistic.

    The three aggregates have closed forms over the replicate axes; any other statistic is applied
    to one replicate at a time.
    """
    if statistic is iqm:
        return lambda *c, axis=-1: scipy.stats.trim_mean(_stacked(c, axis).reshape(*c[0].shape[:-1], -1), 0.25, axis=-1)
    if statistic is median_of_means:
        return lambda *c, axis=-1: np.median(_stacked(c, axis).mean(axis=-2), axis=-1)
    if statistic is optimality_gap:
        return lambda *c, axis=-1: 1.0 - np.minimum(_stacked(c, axis), 1.0).mean(axis=(-2, -1))

    def per_replicate(*columns: np.ndarray, axis: int = -1) -> np.ndarray:
        stacked = _stacked(columns, axis)
        flat = stacked.reshape(-1, *stacked.shape[-2:])
        return np.array([statistic(m) for m in flat]).reshape(stacked.shape[:-2])

    return per_replicate


def interval_estimate(
    scores: np.ndarray,
    statistic: Statistic,
    *,
    reps: int = BOOTSTRAP_REPS,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """The statistic of a ``[runs, tasks]`` score matrix and its stratified-bootstrap CI.

    As rliable's ``get_interval_estimates`` (``method="percentile"``, ``task_bootstrap=False``): each
    replicate redraws, for every task separately, its runs with replacement; tasks are kept fixed.
    The interval is the ``(1 ± confidence) / 2`` percentiles of the replicates. The same ``seed``
    gives the same interval (rliable draws from NumPy's global generator instead). With a single run
    per task nothing can be resampled and the interval has zero width, as in rliable.

    Example::

        point, (low, high) = interval_estimate(scores, iqm, reps=2000, seed=0)
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"interval_estimate: expected a non-empty [runs, tasks] matrix, got shape {x.shape}")
    point = float(statistic(x))
    if x.shape[0] < 2 or not np.isfinite(x).all():
        return point, (point, point)
    result = scipy.stats.bootstrap(
        [x[:, m] for m in range(x.shape[1])],
        _vectorized(statistic),
        n_resamples=reps,
        batch=min(reps, 10_000),
        vectorized=True,
        paired=False,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    # Every replicate equal (e.g. identical runs): SciPy returns NaN bounds; the interval is the point.
    if math.isnan(low) or math.isnan(high):
        return point, (point, point)
    return point, (low, high)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log(y)`` against ``log(x)``; NaN when a ``y`` is not positive.

    The coordinate check's summary statistic: under μP a layer's coordinates do not grow with
    width (slope near 0).
    """
    if len(xs) < 2 or any(not (y > 0 and math.isfinite(y)) for y in ys):
        return math.nan
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def paired_comparison(losses: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """Per-seed comparison of final losses (lower is better) run on the same seeds.

    Returns ``mean_diff`` (mean of ``losses − baseline``; negative: ``losses`` is lower),
    ``paired_se`` (standard error of that mean, ``std(diff, ddof=1) / √n``; 0 for one seed),
    ``wins`` (seeds where ``losses`` is strictly lower), ``ties`` and ``n``. Seeds share
    initialisations and batches, so the paired s.e. removes the seed-to-seed variation that
    the two s.e.m.s of the means both carry; a difference inside about two paired s.e. is noise.

    Example::

        paired_comparison([0.40, 0.41, 0.39], [0.41, 0.40, 0.42])
        # {"mean_diff": -0.01, "paired_se": 0.0115..., "wins": 2, "ties": 0, "n": 3}
    """
    a = np.asarray(losses, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_comparison: need two equal-length, non-empty 1-d sequences, got {a.shape} and {b.shape}")
    diff = a - b
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
    return {"mean_diff": float(diff.mean()), "paired_se": se, "wins": int((diff < 0).sum()), "ties": int((diff == 0).sum()), "n": int(diff.size)}
