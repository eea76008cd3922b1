"""Package a meta-training run's light checkpoint as a named, offline-loadable pretrained optimizer.

Copies ``model.safetensors`` and ``card.json`` from a light checkpoint (``checkpoints/meta/<run>``,
written by :class:`lightning_lopt.meta.LightCheckpoint` or ``MetaTrainer.save_pretrained``) into
``lightning_lopt/pretrained/<name>/`` and adds the card fields a user needs to judge the weights:
``name``, ``summary`` (what they were trained on, in words), ``source_run``, when given, an
``evaluation`` file's contents, and any ``--extra`` fields (a JSON object merged into the card last,
e.g. the compute of an earlier stage or known limitations). The tensors are re-read and checked against the card's architecture.

Usage::

    python scripts/package_pretrained.py checkpoints/meta/mulo_m_cpu_warm mulo-fmnist8-w32-128 \
        --summary "μLO meta-trained on ..." [--evaluation eval.json] [--extra '{"limitations": "..."}']
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from lightning_lopt.optim.pretrained import CARD_NAME, PACKAGED_DIR, WEIGHTS_NAME, from_pretrained


def package(
    run: Path, name: str, summary: str, evaluation: Path | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Copy ``run``'s weights and card into the packaged directory ``name``; returns it."""
    from_pretrained(run)  # refuses a malformed run before anything is written
    out = PACKAGED_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / WEIGHTS_NAME, out / WEIGHTS_NAME)
    card = json.loads((run / CARD_NAME).read_text())
    card.update(name=name, summary=summary, source_run=str(run))
    if evaluation is not None:
        card["evaluation"] = json.loads(evaluation.read_text())
    card.update(extra or {})
    (out / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    from_pretrained(name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a light checkpoint directory")
    parser.add_argument("name", help="the packaged name, saying the scale honestly")
    parser.add_argument("--summary", required=True, help="what the weights were trained on, in words")
    parser.add_argument("--evaluation", type=Path, help="a JSON file of evaluation results for the card")
    parser.add_argument("--extra", type=json.loads, default=None, help="a JSON object of more card fields")
    args = parser.parse_args()
    print(package(args.run, args.name, args.summary, args.evaluation, args.extra))


if __name__ == "__main__":
    main()
