"""How far meta-training runs that share a start moved θ, and whether they moved the same way.

Each run's displacement is θ_run − θ_start (all weights as one vector). If the runs followed a common
meta-gradient, their displacements would share a direction and the pairwise cosines would be
clearly positive; if each run only walked on its own estimator noise, the cosines are those of
independent random directions in D dimensions: mean 0, standard deviation 1/sqrt(D).

Usage::

    python docs/results/mucelo2_p32/displacement.py START RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch

from lightning_lopt.optim.pretrained import from_pretrained


def flat_theta(path: Path) -> tuple[torch.Tensor, int | None]:
    """A checkpoint's weights as one float64 vector (state-dict order) and its meta-training steps."""
    module = from_pretrained(path)
    theta = torch.cat([v.flatten().double() for v in module.state_dict().values()])
    return theta, module.card.get("meta_training_steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("start", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    start, _ = flat_theta(args.start)
    thetas = {run.name: flat_theta(run) for run in args.runs}
    moves = {name: theta - start for name, (theta, _) in thetas.items()}
    print(f"D = {start.numel()}; independent random directions: cosine 0 ± {1 / math.sqrt(start.numel()):.3f}")
    print("| run | meta-steps | ‖θ − θ_start‖ |\n|---|---:|---:|")
    for name, (_, steps) in thetas.items():
        print(f"| {name} | {steps} | {float(moves[name].norm()):.3f} |")
    print("\n| run a | run b | cosine |\n|---|---|---:|")
    for a, b in itertools.combinations(moves, 2):
        print(f"| {a} | {b} | {float(torch.nn.functional.cosine_similarity(moves[a], moves[b], dim=0)):+.3f} |")


if __name__ == "__main__":
    main()
