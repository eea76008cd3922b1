"""Diagnose a long run: per-tensor RMS of the weights, of the update and of the gradient over training.

Trains one evaluation task (a family of ``configs/eval/families.yaml`` at its base width and depth)
with one optimizer, exactly as ``python train.py evaluate`` does (same initialisation, batches and
optimizer construction), and records after every ``--every`` optimizer steps, per parameter tensor:
RMS(p), RMS(Δp) of that step, max|Δp| / RMS(Δp) and RMS(grad). This is how the long-horizon failure
of the packaged μLO was found (docs/results.md §9): its input and output weights grow linearly while
its update size stays constant, until the logits blow up.

Example::

    python scripts/weight_growth.py --family mlp_fashion_mnist --optimizer mulo --steps 6000 \
        --out outputs/weight_growth/mulo.csv
    python scripts/weight_growth.py --family mlp_fashion_mnist --optimizer mulo-cosine --steps 10000 \
        --optimizer-kwargs '{"weight_decay": 0.001}' --out outputs/weight_growth/mulo_cosine_wd.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from lightning_lopt.eval.optimizers import Setting, parse_optimizer
from lightning_lopt.eval.runner import RunSpec, train
from lightning_lopt.eval.suites import load_families
from lightning_lopt.eval.tasks import Task


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="mlp_fashion_mnist")
    parser.add_argument("--size", default="cpu")
    parser.add_argument("--optimizer", default="mulo", help="an evaluation optimizer name (mulo, mulo-cosine, muadam, ...)")
    parser.add_argument("--optimizer-kwargs", default="{}", help="JSON: keyword arguments of the optimizer")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    family = load_families(args.size)[args.family]
    spec = parse_optimizer(args.optimizer)
    run = RunSpec(Task(family, family.base_width, family.depth, args.steps), spec, Setting(json.loads(args.optimizer_kwargs), "given"), args.seed)

    before: dict[int, torch.Tensor] = {}
    rows: list[dict[str, float | int | str]] = []
    count = [0]

    def pre(opt: torch.optim.Optimizer, *_: object) -> None:
        if (count[0] + 1) % args.every == 0:
            before.update({id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]})

    def post(opt: torch.optim.Optimizer, *_: object) -> None:
        count[0] += 1
        if count[0] % args.every:
            return
        for g in opt.param_groups:
            for i, p in enumerate(g["params"]):
                delta = p.detach() - before[id(p)]
                rms = _rms(delta)
                rows.append({
                    "step": count[0], "tensor": f"{i}:{'x'.join(map(str, p.shape))}", "param_rms": _rms(p),
                    "update_rms": rms, "update_max_over_rms": float(delta.abs().max()) / rms if rms > 0 else 0.0,
                    "grad_rms": _rms(p.grad) if p.grad is not None else 0.0,
                })  # fmt: skip
        before.clear()

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        record = train(run)
    finally:
        for h in handles:
            h.remove()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{args.optimizer}: diverged at {record.diverged_at}; {len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
