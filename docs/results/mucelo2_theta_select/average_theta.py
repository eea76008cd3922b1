"""Average the weights θ of several light checkpoints of one learned optimizer into a new one.

The θ of MuCelo2's long-run recipe started from one θ, and each seed's 400-510 meta-steps moved it by
about 0.23-0.39 (L2) in directions nearly orthogonal to each other (cosine -0.04 to 0.00), the mark
of a random walk around a small common drift. Averaging the seeds' θ keeps the common part and
shrinks the seed-specific part by about sqrt(n).

Usage::

    python docs/results/mucelo2_theta_select/average_theta.py OUT CKPT [CKPT ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_lopt.optim.pretrained import CARD_NAME, from_pretrained, save_pretrained


def average(runs: list[Path], out: Path) -> Path:
    """Write the mean θ of ``runs`` (same architecture and config) to ``out`` with a card."""
    cards = [json.loads((run / CARD_NAME).read_text()) for run in runs]
    for run, card in zip(runs[1:], cards[1:]):
        if (card["architecture"], card["config"]) != (cards[0]["architecture"], cards[0]["config"]):
            raise ValueError(f"{run}: architecture or config differs from {runs[0]}")
    modules = [from_pretrained(run) for run in runs]
    mean = {k: torch.stack([m.state_dict()[k] for m in modules]).mean(0) for k in modules[0].state_dict()}
    modules[0].load_state_dict(mean)
    first = cards[0]
    seconds = sum(card["compute"]["seconds"] for card in cards)
    return save_pretrained(
        modules[0], out, recipe=first["recipe"], meta_training_steps=max(c["meta_training_steps"] for c in cards),
        data=first["data"], tasks=first["tasks"], started_from=first.get("started_from"),
        averaged_from=[{"run": str(run), "seed": c["recipe"]["seed"], "meta_training_steps": c["meta_training_steps"]}
                       for run, c in zip(runs, cards)],
        compute={"device": "cpu", "seconds": round(seconds, 1),
                 "note": "seconds: the averaged runs' meta-training together (each on one thread)"},
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    print(average(args.runs, args.out))


if __name__ == "__main__":
    main()
