"""Held-out inner training with Celo2 / MuCelo2 meta-weights against their meta-initialisation.

For each 8x8 task of the CPU recipes (MNIST, Fashion-MNIST and digits, batch 64) and each width,
trains fresh optimizees for ``--steps`` steps on held-out seeds (a key space meta-training never
draws from) with the inner rule as meta-trained (inner lr 1e-3, Adam on biases at 20x, and for
``--lopt mucelo2`` MuCelo2's μP scales read from the μP MLP) and reports the mean training loss over
the last 10 steps, for the meta-initialisation (``MetaTrainer``'s, seed 0, which is also the random
θ the optimizer classes fall back to) and for each ``--weights`` directory.

    # Celo2 (configs/meta/celo2_cpu.yaml: MLP 64-32-10, SP)
    python scripts/celo2_heldout.py --weights checkpoints/meta/celo2_cpu --steps 500 --seeds 4
    # late training: the mean loss over the 100 steps before each of --at (does the loss drift up?)
    python scripts/celo2_heldout.py --weights checkpoints/meta/celo2_cpu checkpoints/meta/celo2_cpu_long \\
        --no-init --steps 10000 --seeds 2 --at 1000 2000 4000 7000 10000
    # MuCelo2 (configs/meta/mucelo2_cpu.yaml: μP MLP 64-w-w-10)
    python scripts/celo2_heldout.py --lopt mucelo2 --param mup --depth 2 --widths 32 128 256 \\
        --weights checkpoints/meta/celo2_cpu checkpoints/meta/mucelo2_cpu --steps 1000 --seeds 4
    # MuCelo2 as its base-width-128 spectral recipes meta-train it (configs/meta/mucelo2_b128_spectral_mix16.yaml)
    python scripts/celo2_heldout.py --lopt mucelo2 --param mup --depth 2 --widths 128 --base-width 128 \\
        --hidden-norm spectral --no-init --weights checkpoints/meta/mucelo2_b128_spectral_mix16 --steps 10000 --at 1000 10000
"""

from __future__ import annotations

import argparse
import json

from lightning_lopt.meta import ImageMLPTask
from lightning_lopt.meta.catalogue import build_lopt
from lightning_lopt.meta.inner_eval import inner_loss_curve
from lightning_lopt.optim.pretrained import from_pretrained

DATASETS = ("fashion_mnist", "mnist", "digits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", required=True, help="light checkpoint / weight directories")
    parser.add_argument("--lopt", choices=("celo2", "mucelo2"), default="celo2", help="the rule (mucelo2: μP scales)")
    parser.add_argument("--param", choices=("sp", "mup"), default="sp")
    parser.add_argument("--depth", type=int, default=1, help="hidden layers")
    parser.add_argument("--widths", type=int, nargs="+", default=[32])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--base-width", type=float, default=None, help="μP scales relative to this width (MuCelo2's)")
    parser.add_argument("--hidden-norm", choices=("rms", "spectral"), default="rms", help="MuCelo2's hidden-matrix steps")
    parser.add_argument("--init-seed", type=int, default=0, help="MetaTrainer's seed (its meta-initialisation)")
    parser.add_argument("--no-init", action="store_true", help="skip the meta-initialisation")
    parser.add_argument("--at", type=int, nargs="*", default=[], help="also report the mean loss of the 100 steps before these")
    args = parser.parse_args()
    if any(not 100 <= t <= args.steps for t in args.at):
        parser.error(f"--at steps must lie in [100, --steps={args.steps}]")

    init, mu = build_lopt(args.lopt, stage=None, seed=args.init_seed)
    candidates = {} if args.no_init else {"meta-init": init}
    candidates.update({w: from_pretrained(w) for w in args.weights})
    for module in candidates.values():
        module.requires_grad_(False)
    results: dict[str, dict[str, float]] = {name: {} for name in candidates}
    before: dict[str, dict[str, dict[int, float]]] = {name: {} for name in candidates}
    for dataset in args.datasets:
        task = ImageMLPTask(dataset, image_size=8, widths=args.widths, depth=args.depth, param=args.param, batch_size=64)
        for inst in task.build(lopt_is_mu=mu, base_width=args.base_width, hidden_norm=args.hidden_norm):
            for name, module in candidates.items():
                curve = inner_loss_curve(module, inst, args.steps, range(args.seeds))
                results[name][inst.label] = float(curve[-10:].mean())
                at = before[name][inst.label] = {t: float(curve[t - 100 : t].mean()) for t in args.at}
                late = "".join(f"  {t}: {v:.4f}" for t, v in at.items())
                print(f"{name:40s} {inst.label:32s} {results[name][inst.label]:.4f}{late}", flush=True)
    keys = ("lopt", "param", "depth", "widths", "base_width", "hidden_norm", "datasets", "steps", "seeds")
    settings = {k: getattr(args, k) for k in keys}
    late = {"mean_loss_of_100_steps_before": before} if args.at else {}
    print(json.dumps({**settings, "final_loss": results, **late}, indent=1))


if __name__ == "__main__":
    main()
