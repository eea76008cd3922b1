"""Quality target 1 of the pretrained weights: in distribution, at the meta-training horizon.

Trains depth-3 MLPs for 1000 steps (the longest meta-training episode) with learned optimizers
(``--learned``: the packaged μLO and LO by default, or ``name:weights``) and with AdamW and μAdam
(μLO's warm-start teacher) over learning-rate grids, on the meta-training data (Fashion-MNIST at 8x8, width 128,
batch 128) and on digits (8x8, width 64, batch 64), and writes the final training loss (mean of the
last 10 minibatches) per seed to JSON. μLO and μAdam train μP models, AdamW standard-parametrized ones.

Usage::

    python scripts/in_distribution.py --out docs/results/in_distribution.json
    python scripts/in_distribution.py --learned mulo:checkpoints/meta/mulo_m_cpu_warm-warm-only --adamw-lrs "" --muadam-lrs "" --out /tmp/w.json
    python scripts/in_distribution.py --learned "" --adamw-lrs "" --out docs/results/in_distribution_muadam.json   # μAdam only
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightning_lopt.datamodules import DigitsDataModule, FashionMNISTDataModule
from lightning_lopt.models import MuMLP
from lightning_lopt.models.scales import update_scales_of
from lightning_lopt.optim import build

TASKS = {
    "fashion_mnist8-w128": (lambda seed: FashionMNISTDataModule(batch_size=128, seed=seed, image_size=8), 128, 128),
    "digits-w64": (lambda seed: DigitsDataModule(batch_size=64, seed=seed), 64, 64),
}
ADAMW_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
#: μAdam around its lr tuned on the meta-training task (0.1: configs/meta/mulo_m_cpu_warm.yaml).
MUADAM_LRS = (0.03, 0.1, 0.3, 1.0)


def final_loss(task: str, optimizer: str, seed: int, steps: int, **kwargs: Any) -> float:
    make_data, width, batch = TASKS[task]
    torch.manual_seed(seed)
    data = make_data(seed)
    param = "mup" if optimizer.startswith("mu") else "sp"
    model = MuMLP(data.input_shape, width=width, depth=3, num_classes=data.num_classes, param=param)
    opt = build(optimizer, model.named_parameters(), scales=update_scales_of(model), **kwargs)
    xs, ys = data.sample(batch, steps, torch.Generator().manual_seed(seed))
    losses = []
    for x, y in zip(xs, ys):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--learned", default="mulo,lo", help="learned optimizers: name or name:weights, comma-separated")
    parser.add_argument("--adamw-lrs", default=",".join(map(str, ADAMW_LRS)), help="AdamW learning rates ('' for none)")
    parser.add_argument("--muadam-lrs", default=",".join(map(str, MUADAM_LRS)), help="μAdam learning rates ('' for none)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {list(TASKS)}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lrs = {name: [float(v) for v in text.split(",") if v] for name, text in (("adamw", args.adamw_lrs), ("muadam", args.muadam_lrs))}
    results: dict[str, dict[str, list[float]]] = {}
    for task in args.tasks.split(","):
        runs = {}
        for entry in filter(None, args.learned.split(",")):
            name, _, weights = entry.partition(":")
            kwargs = {"meta_weights": weights} if weights else {}
            runs[entry] = [final_loss(task, name, s, args.steps, **kwargs) for s in range(args.seeds)]
        for name, grid in lrs.items():
            for lr in grid:
                runs[f"{name} lr={lr:g}"] = [final_loss(task, name, s, args.steps, lr=lr) for s in range(args.seeds)]
        results[task] = runs
        print(task, {k: round(statistics.mean(v), 4) for k, v in runs.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "final_loss": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
