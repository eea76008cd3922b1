"""Pair μLO mix16's LM 10k runs (this machine) with the committed 5-seed runs of section 14.

Those files have no machine column, so ``scripts/paired_runs.py`` will not pair them; section 17 re-ran seed 0
of each on this machine and got them bit for bit, which is what makes this pairing valid.
Run from the repository root: ``python docs/results/mix16/lm10k_paired_mulo.py > docs/results/mix16/lm10k_paired_mulo.txt``.
Other runs of this machine (section 20's continued θ) pair the same way, against section 19's mix16 runs too::

    python docs/results/mix16/lm10k_paired_mulo.py docs/results/mix16_cont/lm10k_runs_mulo_cont.csv \
        mulo-cosine:checkpoints/meta/mulo_m_cpu_mix16_cont > docs/results/mix16_cont/lm10k_paired_mulo_cont.txt

A third argument names the runs' settings (default: "lr 2, wd 1e-3, hidden_lr_mult 2"); runs under any
other label are also paired with section 20's runs of the continued θ (section 21)::

    python docs/results/mix16/lm10k_paired_mulo.py docs/results/long_run_settings/lm10k_runs_v2_lr1.csv \
        mulo-cosine-lr1:checkpoints/meta/mulo_m_cpu_mix16_cont "lr 1, wd 1e-3" > docs/results/long_run_settings/lm10k_paired_v2_lr1.txt
"""
import csv
import sys

import numpy as np

from lightning_lopt.eval.metrics import paired_comparison


def load(path: str) -> dict[str, dict[int, float]]:
    """optimizer label -> seed -> final loss, from a ``runs.csv``."""
    runs: dict[str, dict[int, float]] = {}
    for r in csv.DictReader(open(path)):
        runs.setdefault(r["optimizer"], {})[int(r["seed"])] = float(r["final_loss"])
    return runs


MIX16 = ("docs/results/mix16/lm10k_runs_mulo.csv", "mulo-cosine:checkpoints/meta/mulo_m_cpu_mix16")
CONT = ("docs/results/mix16_cont/lm10k_runs_mulo_cont.csv", "mulo-cosine:checkpoints/meta/mulo_m_cpu_mix16_cont")
runs_file, label = sys.argv[1:3] if len(sys.argv) >= 3 else MIX16
settings = sys.argv[3] if len(sys.argv) >= 4 else "lr 2, wd 1e-3, hidden_lr_mult 2"
new = load(runs_file)[label]
ref = load("docs/results/horizon_diagnosis/lm10k_long4k_lr2/runs.csv")
ref.update(load("docs/results/horizon_diagnosis/lm10k_long4k_lr2/runs_hidden_lr_mult2.csv"))
names = ["mulo-cosine-long4k-lr2-hmult2", "muadam-cosine", "adamw-cosine", "muadam", "adamw"]
if label != MIX16[1]:
    ref.update(load(MIX16[0]))
    names.insert(0, MIX16[1])
if label not in (MIX16[1], CONT[1]):
    ref.update(load(CONT[0]))
    names.insert(0, CONT[1])
seeds = sorted(new)
a = [new[s] for s in seeds]
title = "mulo mix16" if label == MIX16[1] else label
print(f"{title} ({settings}): {np.mean(a):.4f} ± {np.std(a, ddof=1)/np.sqrt(len(a)):.4f}  per seed {[round(x,4) for x in a]}")
for name in names:
    b = [ref[name][s] for s in seeds]
    c = paired_comparison(a, b)
    print(f"  − {name} ({np.mean(b):.4f}): {c['mean_diff']:+.4f} ± {c['paired_se']:.4f} ({c['wins']} of {c['n']} lower), {100*(np.mean(a)/np.mean(b)-1):+.1f}%")
