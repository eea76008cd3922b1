"""Held-out inner training with Celo2 meta-weights against their meta-initialisation.

For each task of the CPU recipe (``configs/meta/celo2_cpu.yaml``: 8x8 MNIST, Fashion-MNIST and
digits, MLP 64-32-10, batch 64), trains fresh optimizees for ``--steps`` steps on held-out seeds
with the inner rule as meta-trained (inner lr 1e-3, Adam on biases at 20x) and reports the mean
training loss over the last 10 steps, for the meta-initialisation (``MetaTrainer``'s, seed 0) and
for each ``--weights`` directory.

    python scripts/celo2_heldout.py --weights checkpoints/meta/celo2_cpu --steps 500 --seeds 4
"""

from __future__ import annotations

import argparse
import json

import torch

from lightning_lopt.meta import ImageMLPTask
from lightning_lopt.meta.inner_eval import inner_loss_curve
from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.pretrained import from_pretrained

DATASETS = ("fashion_mnist", "mnist", "digits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", required=True, help="light checkpoint / weight directories")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--init-seed", type=int, default=0, help="MetaTrainer's seed (its meta-initialisation)")
    parser.add_argument("--no-init", action="store_true", help="skip the meta-initialisation")
    args = parser.parse_args()

    init = Celo2LOpt.meta_training()
    init.reset_parameters(torch.Generator().manual_seed(args.init_seed))
    candidates = {} if args.no_init else {"meta-init": init}
    candidates.update({w: from_pretrained(w) for w in args.weights})
    for module in candidates.values():
        module.requires_grad_(False)
    results: dict[str, dict[str, float]] = {name: {} for name in candidates}
    for dataset in DATASETS:
        task = ImageMLPTask(dataset, image_size=8, widths=[32], depth=1, param="sp", batch_size=64)
        (inst,) = task.build(lopt_is_mu=False)
        for name, module in candidates.items():
            curve = inner_loss_curve(module, inst, args.steps, range(args.seeds))
            results[name][inst.label] = float(curve[-10:].mean())
            print(f"{name:40s} {inst.label:32s} {results[name][inst.label]:.4f}", flush=True)
    print(json.dumps({"steps": args.steps, "seeds": args.seeds, "final_loss": results}, indent=1))


if __name__ == "__main__":
    main()
