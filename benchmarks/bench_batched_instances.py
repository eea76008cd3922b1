"""Meta-step time with compatible task instances batched into one unroll, against one by one.

The celo2_cpu recipe (``configs/meta/celo2_cpu.yaml``: one 8x8 MLP of width 32 on Fashion-MNIST,
MNIST and digits, 8 PES pairs each, truncation 50) is built once, and two
:class:`~lightning_lopt.meta.estimator.PESEstimator` s run it from the same seed: ``batched`` (the
three instances as one group: one vmapped loss-and-grad and one particle step per inner step for
all 48 particles) and ``one_by_one`` (three calls of each per inner step, 16 particles each, which
is what the meta-trainer did before). Each round times one ``estimate(θ, step)`` (a whole meta-step
except the meta-optimizer's update of θ) of both, alternating which goes first, so load from other
processes hits both alike. Reported: the median and every sample of both, the speed-up
(one_by_one / batched medians) and the largest difference of their estimates (they must agree).

Usage::

    python -m benchmarks.bench_batched_instances --rounds 8     # 1 thread

Writes ``benchmarks/results/batched_instances-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from benchmarks.bench_optimizer_step import machine_info, version_info
from lightning_lopt.meta import ImageMLPTask, LogUniformLengthSchedule, MetaTrainer, PES, ReparamAugmentation
from lightning_lopt.meta.estimator import PESEstimator

BENCHMARK = "batched_instances"
SCHEMA_VERSION = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "meta" / "celo2_cpu.yaml"


def build(recipe: Path) -> tuple[MetaTrainer, dict[str, PESEstimator]]:
    """The recipe's MetaTrainer and two estimators over its instances: batched and one by one."""
    cfg = yaml.safe_load(recipe.read_text())["model"]
    meta = MetaTrainer(
        cfg["lopt"], tasks=[ImageMLPTask(**t["init_args"]) for t in cfg["tasks"]], estimator=PES(**cfg["estimator"]),
        truncation=LogUniformLengthSchedule(**cfg["truncation"]), initial_offset=cfg["initial_offset"],
        augmentation=ReparamAugmentation(**cfg["augmentation"]), seed=cfg["seed"],
    )
    settings = meta.gradient_estimator.settings
    estimators = {
        name: PESEstimator(meta.lopt, meta.trainable_names, meta.instances, settings, batched)
        for name, batched in (("batched", True), ("one_by_one", False))
    }
    for est in estimators.values():
        est.prepare()
    return meta, estimators


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed meta-steps of each")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    meta, estimators = build(RECIPE)
    theta = torch.cat([meta.lopt.state_dict()[n].flatten() for n in meta.trainable_names])
    for est in estimators.values():
        est.estimate(theta, 0)  # first window: particle initialisation, not timed
    times: dict[str, list[float]] = {name: [] for name in estimators}
    max_diff = 0.0
    for step in range(1, args.rounds + 1):
        order = list(estimators) if step % 2 else list(reversed(estimators))
        grads = {}
        for name in order:
            start = time.perf_counter()
            grads[name], _ = estimators[name].estimate(theta, step)
            times[name].append(time.perf_counter() - start)
        max_diff = max(max_diff, float((grads["batched"] - grads["one_by_one"]).abs().max()))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "recipe": str(RECIPE.relative_to(RECIPE.parents[2])),
        "groups": {name: [len(g) for g in est.groups] for name, est in estimators.items()},
        "median_s_per_meta_step": medians,
        "samples_s": times,
        "speedup": medians["one_by_one"] / medians["batched"],
        "max_abs_estimate_difference": max_diff,
    }
    print(
        f"batched {medians['batched']:.3f} s/meta-step, one by one {medians['one_by_one']:.3f} s: "
        f"speed-up {result['speedup']:.2f}x (estimates differ by at most {max_diff:.2e})",
        flush=True,
    )
    report = {
        "benchmark": BENCHMARK,
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "benchmarks.bench_batched_instances", *(argv or sys.argv[1:])]),
        "device": "cpu",
        "threads": args.threads,
        "machine": machine_info(torch.device("cpu")),
        "versions": version_info(),
        "results": [result],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{BENCHMARK}-cpu-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
