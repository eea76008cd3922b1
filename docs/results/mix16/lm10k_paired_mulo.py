"""Pair μLO mix16's LM 10k runs (this machine) with the committed 5-seed runs of section 14.

Those files have no machine column, so ``scripts/paired_runs.py`` will not pair them; section 17 re-ran seed 0
of each on this machine and got them bit for bit, which is what makes this pairing valid.
Run from the repository root: ``python docs/results/mix16/lm10k_paired_mulo.py > docs/results/mix16/lm10k_paired_mulo.txt``.
"""
import csv

import numpy as np

from lightning_lopt.eval.metrics import paired_comparison


def load(path: str) -> dict[str, dict[int, float]]:
    """optimizer label -> seed -> final loss, from a ``runs.csv``."""
    runs: dict[str, dict[int, float]] = {}
    for r in csv.DictReader(open(path)):
        runs.setdefault(r["optimizer"], {})[int(r["seed"])] = float(r["final_loss"])
    return runs


new = load("docs/results/mix16/lm10k_runs_mulo.csv")["mulo-cosine:checkpoints/meta/mulo_m_cpu_mix16"]
ref = load("docs/results/horizon_diagnosis/lm10k_long4k_lr2/runs.csv")
ref.update(load("docs/results/horizon_diagnosis/lm10k_long4k_lr2/runs_hidden_lr_mult2.csv"))
seeds = sorted(new)
a = [new[s] for s in seeds]
print(f"mulo mix16 (lr 2, wd 1e-3, hidden_lr_mult 2): {np.mean(a):.4f} ± {np.std(a, ddof=1)/np.sqrt(len(a)):.4f}  per seed {[round(x,4) for x in a]}")
for name in ["mulo-cosine-long4k-lr2-hmult2", "muadam-cosine", "adamw-cosine", "muadam", "adamw"]:
    b = [ref[name][s] for s in seeds]
    c = paired_comparison(a, b)
    print(f"  − {name} ({np.mean(b):.4f}): {c['mean_diff']:+.4f} ± {c['paired_se']:.4f} ({c['wins']} of {c['n']} lower), {100*(np.mean(a)/np.mean(b)-1):+.1f}%")
