"""How much of a PES meta-gradient is noise: the 8-pair and 32-pair runs of MuCelo2's long-run recipe.

With P antithetic pairs per task instance, the estimate ĝ has E‖ĝ‖² = ‖g‖² + N/P, where g is the true
meta-gradient and N the noise of one pair (summed over θ's coordinates). The runs log ‖ĝ‖
(``meta/grad_norm``) every 5 meta-steps; the mean of ‖ĝ‖² over a window of meta-steps where θ has not
moved far, in runs with 8 and with 32 pairs, gives two equations in ‖g‖² and N. The window leaves
out the first meta-steps, whose PES particles have only just started.

Usage::

    python docs/results/mucelo2_theta_select/gradient_noise.py --p8 A.csv B.csv --p32 C.csv D.csv --steps 20 150
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path


def squared_norms(paths: list[Path], first: int, last: int) -> list[float]:
    """‖ĝ‖² at the logged meta-steps ``first <= step < last`` of each run."""
    values = []
    for path in paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("meta/grad_norm") and first <= int(row["step"]) < last:
                    values.append(float(row["meta/grad_norm"]) ** 2)
    return values


def mean_sem(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p8", type=Path, nargs="+", required=True, help="metrics.csv of 8-pair runs")
    parser.add_argument("--p32", type=Path, nargs="+", required=True, help="metrics.csv of 32-pair runs")
    parser.add_argument("--steps", type=int, nargs=2, default=(20, 150), metavar=("FIRST", "LAST"))
    args = parser.parse_args()
    norms8, norms32 = (squared_norms(p, *args.steps) for p in (args.p8, args.p32))
    (m8, s8), (m32, s32) = mean_sem(norms8), mean_sem(norms32)
    noise = (m8 - m32) * 32 / 3  # N from m8 = G + N/8 and m32 = G + N/32
    signal = m32 - noise / 32
    noise_se = math.hypot(s8, s32) * 32 / 3
    signal_se = math.hypot(4 * s32, s8) / 3  # G = (4·m32 − m8) / 3
    print(f"meta-steps {args.steps[0]}-{args.steps[1] - 1}")
    print(f"mean |g_hat|^2, 8 pairs:  {m8:.2f} ± {s8:.2f} ({len(norms8)} logged steps)")
    print(f"mean |g_hat|^2, 32 pairs: {m32:.2f} ± {s32:.2f} ({len(norms32)} logged steps)")
    print(f"noise of one pair N = {noise:.1f} ± {noise_se:.1f}; |g|^2 = {signal:.1f} ± {signal_se:.1f}")
    # The signal is small against its error, so bound it: at most two s.e. above its estimate.
    bound = max(signal, 0.0) + 2 * signal_se
    for pairs in (8, 32):
        share = noise / pairs / (bound + noise / pairs)
        print(f"with {pairs} pairs, noise is at least {share:.2f} of E|g_hat|^2 (|g|^2 at most {bound:.0f})")


if __name__ == "__main__":
    main()
