"""Final losses of runs from several evaluations, paired by seed against chosen baselines.

An evaluation's report compares only the optimizers it ran. Runs of the same task and seed share
initialisations and batches whichever evaluation made them, so a new optimizer run later (e.g. on
`docs/results/width_celo2/suite.yaml`) pairs with committed baseline runs (`docs/results/width`).
This prints, per task, each optimizer's mean ± s.e.m. and, for each optimizer, the paired
difference against each baseline (mean ± paired s.e., and on how many seeds it is lower); with
``--widths``, also each optimizer's change from one width to the next of the same family. Only runs
made on the same machine pair (the ``machine`` column; a file without it counts as its own machine):
a seed's runs on two machines do not share their rounding.

Example::

    python scripts/paired_runs.py docs/results/width/runs.csv outputs/results/width_celo2/runs.csv \
        --baselines adamw,muadam --optimizers celo2,mucelo2
    # baselines re-tuned at 300 steps on family mlp_fashion_mnist_short, labelled adamw@mlp_fashion_mnist_short
    python scripts/paired_runs.py docs/results/width/runs.csv outputs/results/width_t300/runs.csv \
        --alias mlp_fashion_mnist_short=mlp_fashion_mnist --baselines adamw@mlp_fashion_mnist_short
    # does each optimizer improve from one width to the next? (w1024 -> w2048, paired by seed)
    python scripts/paired_runs.py outputs/results/width/runs.csv outputs/results/width2048/runs.csv --widths
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from lightning_lopt.eval.metrics import paired_comparison


#: What ``read_runs`` files a run under when its ``runs.csv`` has no ``machine`` column (runs made
#: before machines were recorded): the file, since the runs of one evaluation share a machine.
UNRECORDED = "not recorded: {path}"


def read_runs(paths: list[Path], aliases: dict[str, str]) -> dict[str, dict[str, dict[int, tuple[float, str]]]]:
    """task -> optimizer -> seed -> (final loss, machine), from `runs.csv` files (a later file wins a
    duplicate).

    ``aliases`` maps a family to the family whose tasks it repeats (same model, data and seeds, e.g.
    tuned at another horizon); its tasks are filed under that family, its optimizers get the suffix
    ``@<family>``.
    """
    runs: dict[str, dict[str, dict[int, tuple[float, str]]]] = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                task, optimizer = row["task"], row["optimizer"]
                family, _, rest = task.partition("-")
                if family in aliases:
                    task, optimizer = f"{aliases[family]}-{rest}", f"{optimizer}@{family}"
                machine = row.get("machine") or UNRECORDED.format(path=path)
                runs[task][optimizer][int(row["seed"])] = (float(row["final_loss"]), machine)
    return runs


def paired_cell(runs: dict[int, tuple[float, str]], base: dict[int, tuple[float, str]]) -> str:
    """``runs`` − ``base`` paired by seed, over the seeds whose two runs come from the same machine.

    The same seed on two machines does not share its rounding (``lightning_lopt.provenance.arithmetic``),
    a difference larger than the paired standard errors it would be read against, so pairs across
    machines are left out, and said to be.
    """
    common = sorted(set(runs) & set(base))
    same = [s for s in common if runs[s][1] == base[s][1]]
    if not same:
        return f"not paired: {len(common)} seeds from different machines" if common else ""
    c = paired_comparison([runs[s][0] for s in same], [base[s][0] for s in same])
    left_out = len(common) - len(same)
    note = f"; {left_out} seeds from different machines left out" if left_out else ""
    spread = f" ± {c['paired_se']:.4f}" if c["n"] > 1 else " (one seed: no s.e.)"
    return f"{c['mean_diff']:+.4f}{spread} ({c['wins']} of {c['n']}{note})"


def mean_sem(seeds: dict[int, tuple[float, str]]) -> str:
    """``mean ± s.e.m.`` of a run's final losses over its seeds (s.e.m. 0 for one seed)."""
    values = np.array([seeds[s][0] for s in sorted(seeds)])
    sem = values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else 0.0
    return f"{values.mean():.4f} ± {sem:.4f}"


WIDTH = re.compile(r"-w(\d+)(?=-|$)")


def width_groups(runs: dict[str, dict]) -> dict[str, list[tuple[int, str]]]:
    """Tasks that differ only in their width (``-w<N>`` in the task id), as ``{id with -w*: [(width,
    task), ...]}`` sorted by width; groups of one width are left out."""
    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for task in runs:
        match = WIDTH.search(task)
        if match:
            groups[WIDTH.sub("-w*", task, count=1)].append((int(match.group(1)), task))
    return {key: sorted(tasks) for key, tasks in sorted(groups.items()) if len(tasks) > 1}


def print_width_tables(runs: dict[str, dict[str, dict[int, tuple[float, str]]]], chosen: list[str]) -> None:
    """Per family and optimizer: the final loss at each width and its change from the width before,
    paired by seed (a seed draws the same batches at every width; its initialisations differ)."""
    for key, tasks in width_groups(runs).items():
        optimizers = sorted({o for _, task in tasks for o in runs[task]})
        print(f"\n## {key}: width by width\n")
        print("| optimizer | width | seeds | final loss (mean ± s.e.m.) | − the width before (paired, lower on) |")
        print("|---|---:|---:|---:|---:|")
        for name in optimizers:
            if chosen and name not in chosen:
                continue
            before: dict[int, tuple[float, str]] = {}
            for width, task in tasks:
                seeds = runs[task].get(name)
                if not seeds:
                    before = {}
                    continue
                change = paired_cell(seeds, before) if before else ""
                print(f"| `{name}` | {width} | {len(seeds)} | {mean_sem(seeds)} | {change} |")
                before = seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="runs.csv files of `train.py evaluate`")
    parser.add_argument("--baselines", default="adamw,muadam", help="comma-separated optimizer labels to pair against")
    parser.add_argument("--optimizers", default="", help="labels to compare (default: every other label)")
    parser.add_argument("--alias", action="append", default=[], metavar="FAMILY=SAME_AS", help="file FAMILY's tasks under SAME_AS's")
    parser.add_argument("--widths", action="store_true", help="also each optimizer's change from one width to the next")
    args = parser.parse_args()
    runs = read_runs(args.runs, dict(a.split("=", 1) for a in args.alias))
    baselines = [b for b in args.baselines.split(",") if b]
    chosen = [o for o in args.optimizers.split(",") if o]
    for task in sorted(runs):
        by_opt = runs[task]
        print(f"\n## {task}\n")
        print("| optimizer | seeds | final loss (mean ± s.e.m.) | " + " | ".join(f"− {b} (paired, lower on)" for b in baselines) + " |")
        print("|---|---:|---:|" + "---:|" * len(baselines))
        for name in sorted(by_opt):
            if chosen and name not in chosen and name not in baselines:
                continue
            seeds = by_opt[name]
            cells = ["" if name == base else paired_cell(seeds, by_opt.get(base, {})) for base in baselines]
            print(f"| `{name}` | {len(seeds)} | {mean_sem(seeds)} | " + " | ".join(cells) + " |")
    if args.widths:
        print_width_tables(runs, chosen)


if __name__ == "__main__":
    main()
