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


def test_paired_comparison_by_hand() -> None:
    from lightning_lopt.eval.metrics import paired_comparison

    out = paired_comparison([0.40, 0.41, 0.39, 0.50], [0.41, 0.40, 0.42, 0.50])
    diffs = [-0.01, 0.01, -0.03, 0.0]  # written out: mean -0.0075, sample std 0.01708
    assert out["mean_diff"] == pytest.approx(sum(diffs) / 4)
    assert out["paired_se"] == pytest.approx(0.017078251 / 2, rel=1e-6)
    assert (out["wins"], out["ties"], out["n"]) == (2, 1, 4)
    assert paired_comparison([1.0], [2.0]) == {"mean_diff": -1.0, "paired_se": 0.0, "wins": 1, "ties": 0, "n": 1}
    with pytest.raises(ValueError, match="equal-length"):
        paired_comparison([1.0, 2.0], [1.0])


def test_paired_rows_and_report_cells(tiny_suite: Path) -> None:
    """A seed-to-seed spread much larger than a consistent gap: the paired s.e. sees the gap."""
    from lightning_lopt.eval.report import paired_table

    suite = load_suite(str(tiny_suite), "cpu")
    records = {}
    for t in suite.tasks():
        for seed, level in enumerate([1.0, 2.0, 3.0]):
            records[(t.id, "adamw", seed)] = record([level] * 20)
            records[(t.id, "mulo", seed)] = record([level - 0.1] * 20)  # lower on every seed
            records[(t.id, "lo", seed)] = record([level + (0.1 if seed else -0.1)] * 20)  # wins 1 of 3
    g = summarize(suite, ["mulo", "lo", "adamw"], [0, 1, 2], records, baselines=["adamw"]).groups[0]
    rows = {(r["task"], r["optimizer"]): r for r in g.paired}
    assert {r["baseline"] for r in g.paired} == {"adamw"} and len(g.paired) == 2 * len(suite.tasks())
    task = suite.tasks()[0].id
    assert rows[(task, "mulo")]["mean_diff"] == pytest.approx(-0.1) and rows[(task, "mulo")]["paired_se"] == pytest.approx(0.0, abs=1e-12)
    assert rows[(task, "mulo")]["wins"] == 3 and rows[(task, "lo")]["wins"] == 1
    cells = "\n".join(paired_table(g))
    assert "wins 3 of 3 |" in cells and "wins 3 of 3 (noise)" not in cells  # a consistent gap is no noise
    assert "wins 1 of 3 (noise)" in cells  # +0.033 ± 0.067
    with pytest.raises(ValueError, match="baselines"):
        summarize(suite, ["mulo"], [0, 1, 2], records, baselines=["adamw"])
