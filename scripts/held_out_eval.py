"""A meta-training recipe's held-out evaluation (``InnerEvaluation``) for any θ, e.g. the θ a run started from.

``InnerEvaluation`` logs ``meta/eval/<instance>`` only during a run, every ``every_n_steps``; this
script computes the same numbers (mean training loss over the last 10 of ``--steps`` inner steps,
averaged over ``--seeds`` held-out runs) for given weights on the recipe's task instances, so that
a run's metrics can be compared with its starting point.

Usage::

    python scripts/held_out_eval.py configs/meta/mulo_m_cpu_attn.yaml checkpoints/meta/mulo_m_cpu_long2 \\
        --steps 2000 --seeds 2 --only vit
"""

import argparse
import csv
import sys
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser

from lightning_lopt.meta import MetaTrainer, Task
from lightning_lopt.meta.inner_eval import inner_loss_curve


def build_tasks(config: Path) -> tuple[str, list[Task], float | None, str]:
    """The recipe's learned-optimizer name, its tasks (instantiated as ``meta-fit`` would), its base
    width (MuCelo2's relative μP scales; ``None`` when the recipe has none) and its hidden-matrix
    norm (MuCelo2's ``"spectral"`` steps; ``"rms"`` when the recipe names none)."""
    model = yaml.safe_load(config.read_text())["model"]
    parser = ArgumentParser()
    parser.add_argument("--tasks", type=list[Task])
    cfg = parser.parse_object({"tasks": model["tasks"]})
    return model["lopt"], parser.instantiate(cfg).tasks, model.get("base_width"), model.get("hidden_norm", "rms")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("weights", nargs="+", help="packaged names or weight/light-checkpoint directories")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--only", default="", help="evaluate only instances whose label contains this")
    ap.add_argument("--out", type=Path, help="append rows (weights, instance, loss) to this CSV")
    args = ap.parse_args(argv)
    lopt, tasks, base_width, hidden_norm = build_tasks(args.config)
    for weights in args.weights:
        meta = MetaTrainer(lopt, tasks=tasks, init_from=weights, base_width=base_width, hidden_norm=hidden_norm)
        for inst in meta.instances:
            if args.only not in inst.label:
                continue
            curve = inner_loss_curve(meta.lopt, inst, args.steps, range(args.seeds))
            loss = float(curve[-10:].mean())
            print(f"{weights}\t{inst.label}\t{loss:.4f}", flush=True)
            if args.out is not None:
                new = not args.out.exists()
                with args.out.open("a", newline="") as f:
                    w = csv.writer(f)
                    if new:
                        w.writerow(["weights", "instance", "steps", "seeds", "loss"])
                    w.writerow([weights, inst.label, args.steps, args.seeds, loss])


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
