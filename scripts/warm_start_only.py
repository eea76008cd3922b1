"""The warm-start-only θ of a warm-started recipe: what the learned optimizer is before its first PES
meta-step, to measure what PES adds (docs/results.md, "Warm start").

Builds the recipe's tasks and ``MetaTrainer`` exactly as ``meta-fit`` does, runs only the warm start
(deterministic: it reproduces the relative errors recorded on the packaged card) and saves θ.

Usage::

    python scripts/warm_start_only.py mulo_m_cpu_warm lo_m_cpu_warm   # -> checkpoints/meta/<recipe>-warm-only
"""

import sys
from pathlib import Path

import torch
import yaml

from lightning_lopt.meta import ImageMLPTask, MetaTrainer
from lightning_lopt.meta.warm_start import WarmStart, warm_start


def warm_start_only(recipe: str, out: Path) -> dict[str, float]:
    """Run ``configs/meta/<recipe>.yaml``'s warm start alone, save θ to ``out``; returns the fit's
    final relative error per task instance."""
    cfg = yaml.safe_load(Path(f"configs/meta/{recipe}.yaml").read_text())["model"]
    tasks = [ImageMLPTask(**t["init_args"]) for t in cfg["tasks"]]
    settings = WarmStart(**cfg["warm_start"])
    meta = MetaTrainer(cfg["lopt"], tasks=tasks, seed=cfg["seed"], warm_start=settings)
    meta.warm_start_report = warm_start(meta.lopt, meta.instances, settings, mu=meta.mu)
    meta.save_pretrained(out)
    return meta.warm_start_report["relative_error_end"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:]:
        print(name, warm_start_only(name, Path(f"checkpoints/meta/{name}-warm-only")))
