"""The run cache: every completed run on disk, keyed by (task, optimizer, seed, config hash).

A run's *identity* is everything that decides its curve: the task (family, width, depth, steps),
the optimizer (factory, parametrization, settings, the learned-optimizer weights' file hash), the
seed and the runner's version. Its SHA-256 is the config hash. A run lives in

    <cache>/<task id>/<optimizer label>/seed<seed>-<hash>/
        result.json    identity, final numbers, divergence, wall time, device, machine
        curve.csv      step, train_loss (every step), test_loss and test_acc (at evaluation steps)

``result.json`` is written last, by renaming a finished temporary directory, so an interrupted run
leaves nothing that looks complete and a resumed suite redoes exactly the runs it lacks.

Example::

    directory = run_dir(cache_dir, "mlp_digits-w32-d3-t100", "adamw", seed=0, key=config_hash(identity))
    record = load(directory)             # None when the run is not cached
    save(directory, identity, record)
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULT_NAME = "result.json"
CURVE_NAME = "curve.csv"


@dataclass
class RunRecord:
    """The outcome of one run.

    Attributes:
        train_loss: the training-batch loss of every step (``[steps]``), capped at ``cap``; after a
            divergence every remaining step holds ``cap``.
        eval_steps: the steps at which the test batch was scored (0 = before training).
        test_loss: test loss at ``eval_steps`` (capped).
        test_acc: test accuracy at ``eval_steps``; NaN for the autoencoder and after a divergence.
        diverged_at: the step of the first non-finite or exploding loss, or ``None``.
        cap: the loss cap (1.5 x the task's reference loss).
        wall_s: seconds the run took.
        device: where it ran.
        machine: what decided its rounding (:func:`lightning_lopt.provenance.arithmetic`); runs of
            one seed pair like for like only on the same machine. Empty for runs cached before it
            was recorded.
        cached: whether it came from the cache (not stored).
    """

    train_loss: np.ndarray
    eval_steps: list[int]
    test_loss: list[float]
    test_acc: list[float]
    diverged_at: int | None
    cap: float
    wall_s: float
    device: str
    machine: str = ""
    cached: bool = field(default=False, compare=False)

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None


def config_hash(identity: dict[str, Any]) -> str:
    """The first 12 hex digits of the SHA-256 of ``identity`` as canonical JSON."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _safe(name: str) -> str:
    """A label as a directory name: ``mulo:runs/x@mup`` → ``mulo_runs_x@mup``."""
    return re.sub(r"[^A-Za-z0-9@.+=-]+", "_", name).strip("_") or "_"


def run_dir(cache_dir: str | os.PathLike[str], task_id: str, label: str, seed: int, key: str) -> Path:
    """Where a run lives in the cache."""
    return Path(cache_dir) / task_id / _safe(label) / f"seed{seed}-{key}"


def _float(value: float) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))


def save(directory: Path, identity: dict[str, Any], record: RunRecord) -> None:
    """Write ``record`` to ``directory`` atomically (see the module docstring)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    evals = dict(zip(record.eval_steps, zip(record.test_loss, record.test_acc)))
    with open(tmp / CURVE_NAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_loss", "test_loss", "test_acc"])
        for step in range(len(record.train_loss) + 1):
            train = _float(record.train_loss[step - 1]) if step else ""
            test_loss, test_acc = evals.get(step, (math.nan, math.nan))
            if train or step in evals:
                writer.writerow([step, train, _float(test_loss), _float(test_acc)])
    result = {
        "identity": identity,
        "final_train_loss": float(np.mean(record.train_loss[-10:])),
        "diverged_at": record.diverged_at,
        "cap": record.cap,
        "wall_s": record.wall_s,
        "device": record.device,
        "machine": record.machine,
    }
    (tmp / RESULT_NAME).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def load(directory: Path) -> RunRecord | None:
    """The record stored in ``directory``, or ``None`` when there is no complete one."""
    result_path = directory / RESULT_NAME
    if not result_path.is_file():
        return None
    result = json.loads(result_path.read_text())
    train: list[float] = []
    eval_steps: list[int] = []
    test_loss: list[float] = []
    test_acc: list[float] = []
    with open(directory / CURVE_NAME, newline="") as f:
        for row in csv.DictReader(f):
            if row["train_loss"]:
                train.append(float(row["train_loss"]))
            if row["test_loss"]:
                eval_steps.append(int(row["step"]))
                test_loss.append(float(row["test_loss"]))
                test_acc.append(float(row["test_acc"]) if row["test_acc"] else math.nan)
    return RunRecord(
        train_loss=np.asarray(train),
        eval_steps=eval_steps,
        test_loss=test_loss,
        test_acc=test_acc,
        diverged_at=result["diverged_at"],
        cap=result["cap"],
        wall_s=result["wall_s"],
        device=result["device"],
        machine=result.get("machine", ""),
        cached=True,
    )
