"""Tables from run records (lightning_lopt.eval.summary) and the report built on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_lopt.eval.store import RunRecord
from lightning_lopt.eval.suites import load_suite
from lightning_lopt.eval.summary import rank_columns, summarize


def record(curve: list[float], diverged_at: int | None = None) -> RunRecord:
    return RunRecord(np.asarray(curve, dtype=float), [0, len(curve)], [3.0, curve[-1]], [0.1, 0.5], diverged_at, 3.45, 0.1, "cpu")


def test_width_rank_columns_are_base_next_and_largest(tiny_suite: Path, write_suite) -> None:
    path = write_suite(tiny_suite.parent / "w.yaml", [{"kind": "width", "steps": 20, "tasks": [{"family": "mlp_tiny", "widths": [64, 16, 32]}]}])
    group = load_suite(str(path), "cpu").groups[0]
    columns = {k: [t.width for t in v] for k, v in rank_columns(group).items()}
    assert columns == {"ID (Base)": [16], "OoD (Large)": [32], "OoD (XL)": [64]}


def test_tables_from_hand_made_curves(tiny_suite: Path) -> None:
    suite = load_suite(str(tiny_suite), "cpu")  # tasks at widths 16 and 32, 20 steps
    tasks = [t.id for t in suite.tasks()]
    ref = [2.0] * 10 + [1.0] * 10  # final loss 1.0
    fast = [2.0] * 5 + [0.5] * 15  # final loss 0.5: half the reference's, reaches 1.0 early
    stuck = [2.0] * 20  # never reaches the reference
    records = {}
    for task in tasks:
        for seed in (0, 1):
            records[(task, "adamw", seed)] = record(ref)
            records[(task, "fast", seed)] = record(fast)
            records[(task, "stuck", seed)] = record(stuck, diverged_at=15 if seed == 1 else None)
    tables = summarize(suite, ["adamw", "fast", "stuck"], [0, 1], records, reference="adamw", celo_ema=0.0, bootstrap_reps=200)
    g = tables.groups[0]

    final = {(r["task"], r["optimizer"]): r for r in g.final}
    assert final[(tasks[0], "fast")]["final_loss_mean"] == pytest.approx(0.5)
    assert final[(tasks[0], "stuck")]["diverged"] == 1  # counted, not dropped
    ranks = {(r["column"], r["optimizer"]): r["rank"] for r in g.ranks}
    assert ranks[("ID (Base)", "fast")] == 1.0 and ranks[("ID (Base)", "adamw")] == 2.0 and ranks[("OoD (XL)", "stuck")] == 3.0

    aggregates = {(r["optimizer"], r["score"], r["aggregate"]): r["value"] for r in g.aggregates}
    assert aggregates[("fast", "normalized_loss", "IQM")] == pytest.approx(2.0)  # 1.0 / 0.5
    assert aggregates[("stuck", "normalized_loss", "IQM")] == pytest.approx(0.5)  # 1.0 / 2.0
    assert aggregates[("fast", "speedup", "IQM")] == pytest.approx(20 / 6)  # first at 1.0: step 6
    assert aggregates[("adamw", "speedup", "IQM")] == pytest.approx(20 / 11)
    assert aggregates[("stuck", "speedup", "IQM")] == 0.0  # never reaches the reference
    assert aggregates[("stuck", "speedup", "optimality gap")] == pytest.approx(1.0)
    assert aggregates[("fast", "normalized_loss", "optimality gap")] == pytest.approx(0.0)  # clipped at 1
    scores = [r for r in g.scores if r["optimizer"] == "stuck"]
    assert len(scores) == 4 and all(r["speedup"] == 0.0 for r in scores)


def test_no_reference_no_celo_scores(tiny_suite: Path) -> None:
    suite = load_suite(str(tiny_suite), "cpu")
    records = {(t.id, "mulo", 0): record([1.0] * 20) for t in suite.tasks()}
    g = summarize(suite, ["mulo"], [0], records).groups[0]
    assert g.final and g.ranks and not g.aggregates and not g.scores
