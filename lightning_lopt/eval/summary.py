"""The tables of an evaluation, computed from run records with the pure functions of
:mod:`lightning_lopt.eval.metrics`, and written as CSV and JSON.

For every group of a suite:

* **final losses**: per task and optimizer, the mean, standard deviation and standard error over
  seeds of the final training loss (mean of the last 10 batches, after ``ema``), the number of
  diverged runs (counted at the cap, never dropped), and the last test loss and accuracy;
* **ranks** (μLO Table 2): at each horizon, optimizers ranked on each family by the seed-mean loss
  at that step, ranks averaged over families. A ``width`` group has three columns per horizon:
  ``ID (Base)`` (the family's base width, where the baselines were tuned), ``OoD (Large)`` (the next
  width above it) and ``OoD (XL)`` (the largest); other groups have one, ``all``, over their tasks;
* **Celo scores**, when a tuned AdamW reference is among the optimizers: per run, the normalised
  final loss ``L_ref / L_opt`` and the speedup ``T / t*`` (0 when the reference's final loss is
  never reached), both on curves smoothed with ``celo_ema``, with ``L_ref`` the reference's final
  loss averaged over seeds; and over the group's tasks, IQM, median and optimality gap of each with
  95% stratified-bootstrap intervals;
* **paired comparisons**, when ``baselines`` are given: per task, every other optimizer against each
  baseline on the same seeds: the mean per-seed difference of final losses, its paired standard
  error and "wins k of n" (:func:`metrics.paired_comparison`).

Example::

    tables = summarize(suite, ["mulo", "adamw"], [0, 1], records, reference="adamw")
    tables.ranks[0].rows                  # [{"group": ..., "horizon": 1000, "column": "ID (Base)", ...}]
    write_tables(tables, Path("outputs/eval/ci"), paths)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_lopt.eval import metrics
from lightning_lopt.eval.store import RunRecord
from lightning_lopt.eval.suites import Group, Suite
from lightning_lopt.eval.tasks import Task

Records = Mapping[tuple[str, str, int], RunRecord]


@dataclass
class GroupTables:
    """The tables of one group. Rows are plain dicts, ready for CSV."""

    name: str
    group: Group
    final: list[dict[str, Any]] = field(default_factory=list)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    aggregates: list[dict[str, Any]] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Summary:
    """Every group's tables, and the evaluation's optimizers, seeds and metric settings."""

    groups: list[GroupTables]
    optimizers: list[str]
    seeds: list[int]
    reference: str | None
    ema: float
    celo_ema: float
    bootstrap_reps: int
    runs: list[dict[str, Any]] = field(default_factory=list)


def group_names(suite: Suite) -> list[str]:
    """``width``, ``depth``, ... with a counter where a kind repeats (``width-2``)."""
    seen: dict[str, int] = {}
    names = []
    for g in suite.groups:
        seen[g.kind] = seen.get(g.kind, 0) + 1
        names.append(g.kind if seen[g.kind] == 1 else f"{g.kind}-{seen[g.kind]}")
    return names


def rank_columns(group: Group) -> dict[str, list[Task]]:
    """The tasks of each rank-table column: one per family and column (see the module docstring)."""
    if group.kind != "width":
        return {"all": list(group.tasks)}
    by_family: dict[str, list[Task]] = {}
    for task in group.tasks:
        by_family.setdefault(task.family.name, []).append(task)
    columns: dict[str, list[Task]] = {"ID (Base)": [], "OoD (Large)": [], "OoD (XL)": []}
    for tasks in by_family.values():
        tasks = sorted(tasks, key=lambda t: t.width)
        base = tasks[0].family.base_width
        at_base = [t for t in tasks if t.width == base]
        above = [t for t in tasks if t.width > base]
        if at_base:
            columns["ID (Base)"].append(at_base[0])
        if above:
            columns["OoD (Large)"].append(above[0])
            columns["OoD (XL)"].append(above[-1])
    return {k: v for k, v in columns.items() if v}


def _final(record: RunRecord, ema: float, at_step: int | None = None) -> float:
    return metrics.final_loss(record.train_loss, at_step=at_step, ema_alpha=ema)


def _group_tables(
    name: str, group: Group, optimizers: Sequence[str], seeds: Sequence[int], records: Records,
    reference: str | None, ema: float, celo_ema: float, reps: int, baselines: Sequence[str] = (),
) -> GroupTables:  # fmt: skip
    out = GroupTables(name, group)
    for task in group.tasks:
        per_seed = {o: [_final(records[(task.id, o, s)], ema) for s in seeds] for o in optimizers}
        for base in baselines:
            for opt in optimizers:
                if opt != base:
                    out.paired.append({"group": name, "task": task.id, "optimizer": opt, "baseline": base,
                                       **metrics.paired_comparison(per_seed[opt], per_seed[base])})  # fmt: skip
        for opt in optimizers:
            recs = [records[(task.id, opt, s)] for s in seeds]
            finals = np.array(per_seed[opt])
            acc = [r.test_acc[-1] for r in recs]
            out.final.append(
                {
                    "group": name, "task": task.id, "family": task.family.name, "width": task.width,
                    "depth": task.depth, "steps": task.steps, "optimizer": opt, "seeds": len(recs),
                    "final_loss_mean": float(finals.mean()),
                    "final_loss_std": float(finals.std(ddof=1)) if len(recs) > 1 else 0.0,
                    "final_loss_sem": float(finals.std(ddof=1) / math.sqrt(len(recs))) if len(recs) > 1 else 0.0,
                    "diverged": sum(r.diverged for r in recs),
                    "test_loss_mean": float(np.mean([r.test_loss[-1] for r in recs])),
                    "test_acc_mean": float(np.mean(acc)) if not all(math.isnan(a) for a in acc) else math.nan,
                }  # fmt: skip
            )
    for horizon in group.horizons:
        for column, tasks in rank_columns(group).items():
            values = {
                t.id: {o: float(np.mean([_final(records[(t.id, o, s)], ema, horizon) for s in seeds])) for o in optimizers}
                for t in tasks
            }
            for opt, rank in metrics.average_ranks(values).items():
                out.ranks.append({"group": name, "horizon": horizon, "column": column, "optimizer": opt,
                                  "rank": rank, "tasks": len(tasks)})  # fmt: skip
    if reference is not None:
        _celo_scores(out, name, group, optimizers, seeds, records, reference, celo_ema, reps)
    return out


def _celo_scores(
    out: GroupTables, name: str, group: Group, optimizers: Sequence[str], seeds: Sequence[int], records: Records,
    reference: str, celo_ema: float, reps: int,
) -> None:  # fmt: skip
    matrices: dict[tuple[str, str], np.ndarray] = {}
    for opt in optimizers:
        loss_scores = np.zeros((len(seeds), len(group.tasks)))
        speed_scores = np.zeros_like(loss_scores)
        for m, task in enumerate(group.tasks):
            target = float(np.mean([_final(records[(task.id, reference, s)], celo_ema) for s in seeds]))
            for n, seed in enumerate(seeds):
                record = records[(task.id, opt, seed)]
                loss_scores[n, m] = metrics.normalized_loss(target, _final(record, celo_ema))
                speed_scores[n, m] = metrics.speedup(record.train_loss, target, ema_alpha=celo_ema)
                out.scores.append({"group": name, "task": task.id, "optimizer": opt, "seed": seed,
                                   "normalized_loss": float(loss_scores[n, m]), "speedup": float(speed_scores[n, m])})  # fmt: skip
        matrices[(opt, "normalized_loss")] = loss_scores
        matrices[(opt, "speedup")] = speed_scores
    for (opt, score), matrix in matrices.items():
        for aggregate, statistic in metrics.AGGREGATES.items():
            point, (low, high) = metrics.interval_estimate(matrix, statistic, reps=reps, seed=0)
            out.aggregates.append({"group": name, "score": score, "aggregate": aggregate, "optimizer": opt,
                                   "value": point, "ci_low": low, "ci_high": high})  # fmt: skip


def summarize(
    suite: Suite,
    optimizers: Sequence[str],
    seeds: Sequence[int],
    records: Records,
    *,
    reference: str | None = None,
    ema: float = 0.0,
    celo_ema: float = 0.9,
    bootstrap_reps: int = metrics.BOOTSTRAP_REPS,
    baselines: Sequence[str] = (),
) -> Summary:
    """All tables of an evaluation; ``records[(task id, optimizer label, seed)]`` must be complete.
    ``baselines``: the optimizers every other one is compared with seed by seed (the tuned ones)."""
    unknown = [b for b in baselines if b not in optimizers]
    if unknown:
        raise ValueError(f"baselines {unknown} are not among the optimizers {list(optimizers)}")
    groups = [
        _group_tables(name, g, optimizers, seeds, records, reference, ema, celo_ema, bootstrap_reps, baselines)
        for name, g in zip(group_names(suite), suite.groups)
    ]
    runs = [
        {
            "task": task_id, "optimizer": opt, "seed": seed, "final_loss": _final(r, ema),
            "diverged_at": r.diverged_at, "wall_s": round(r.wall_s, 3), "cached": r.cached, "device": r.device,
            "machine": r.machine,
        }  # fmt: skip
        for (task_id, opt, seed), r in records.items()
    ]
    return Summary(groups, list(optimizers), list(seeds), reference, ema, celo_ema, bootstrap_reps, runs)


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_tables(tables: Summary, out: Path, run_paths: Mapping[tuple[str, str, int], Path]) -> list[Path]:
    """Write ``final_losses.csv``, ``ranks.csv``, ``scores.csv``, ``aggregates.csv``, ``paired.csv``, ``runs.csv``
    (with each run's cache directory) and ``summary.json`` to ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("final", "ranks", "scores", "aggregates", "paired"):
        rows = [r for g in tables.groups for r in getattr(g, name)]
        if rows:
            path = out / f"{'final_losses' if name == 'final' else name}.csv"
            _write_csv(rows, path)
            written.append(path)
    runs = [{**r, "path": str(run_paths[(r["task"], r["optimizer"], r["seed"])])} for r in tables.runs]
    _write_csv(runs, out / "runs.csv")
    payload = {
        "optimizers": tables.optimizers, "seeds": tables.seeds, "reference": tables.reference,
        "ema": tables.ema, "celo_ema": tables.celo_ema, "bootstrap_reps": tables.bootstrap_reps,
        "groups": [{"name": g.name, "kind": g.group.kind, "final": g.final, "ranks": g.ranks, "aggregates": g.aggregates,
                    "paired": g.paired}
                   for g in tables.groups],
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
    return [*written, out / "runs.csv", out / "summary.json"]
