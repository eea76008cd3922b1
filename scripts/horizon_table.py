"""Per-seed training loss at several steps of the runs of a horizon evaluation, and the step of divergence.

The evaluation report ranks optimizers at each horizon; this prints the losses themselves (mean of
the 10 minibatch losses before the step, the capped value after a divergence), which is what the
long-horizon targets are stated in ("the loss at 10,000 <= the loss at 1,000"). One table per task:
a suite with several tasks (the cpu horizon suite has the MLP and the LM) is never averaged across them.

Example::

    python scripts/horizon_table.py outputs/results/horizon --steps 1000,5000,10000
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the --out folder of `train.py evaluate` (it has runs.csv)")
    parser.add_argument("--steps", default="1000,5000,10000")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    tables: dict[str, dict[str, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    with (args.out / "runs.csv").open() as f:
        for run in csv.DictReader(f):
            result = json.loads((Path(run["path"]) / "result.json").read_text())
            with (Path(run["path"]) / "curve.csv").open() as c:
                losses = np.array([float(r["train_loss"]) for r in csv.DictReader(c) if r["train_loss"]])
            cap = result["cap"]
            at = [float(losses[s - 10 : s].mean()) if len(losses) >= s else cap for s in steps]
            tables[run["task"]][run["optimizer"]].append((result["identity"]["seed"], at, result["diverged_at"]))
    for task, table in tables.items():
        print(f"\n{task}\n")
        print("| optimizer | " + " | ".join(f"loss at {s} (mean ± s.e.m.)" for s in steps) + " | diverged at |")
        print("|---|" + "---:|" * (len(steps) + 1))
        for name, rows in table.items():
            rows = sorted({(seed, tuple(at), div) for seed, at, div in rows})
            values = np.array([at for _, at, _ in rows])
            sem = values.std(0, ddof=1) / np.sqrt(len(rows)) if len(rows) > 1 else np.full(len(steps), np.nan)
            cells = [f"{m:.4g} ± {s:.2g}" for m, s in zip(values.mean(0), sem)]
            div = ", ".join(str(d) for _, _, d in rows if d is not None) or "none"
            print(f"| `{name}` | " + " | ".join(cells) + f" | {div} ({len(rows)} seeds) |")


if __name__ == "__main__":
    main()
