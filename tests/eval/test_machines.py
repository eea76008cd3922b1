"""Runs record the machine that decided their rounding, and pairs across machines are refused.

Training turns a rounding difference into a different final loss (the same seed of μLO with AVX2
and AVX-512 kernels ends about a third of the seed-to-seed spread apart: ``docs/results.md``,
section 16), so a seed pairs like for like only with runs from the same machine.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np

from lightning_lopt import provenance
from lightning_lopt.eval import store
from lightning_lopt.eval.optimizers import Setting, parse_optimizer
from lightning_lopt.eval.report import machines_note
from lightning_lopt.eval.runner import RunSpec, execute
from lightning_lopt.eval.tasks import Family, Task

ROOT = Path(__file__).resolve().parents[2]
FAMILY = Family.from_dict(
    "mlp_tiny",
    {"model": "mlp", "data": "digits", "data_kwargs": {"image_size": 8}, "batch_size": 32, "base_width": 16, "eval_examples": 64},
)


def _paired_runs():  # noqa: ANN202 (a script loaded as a module)
    spec = importlib.util.spec_from_file_location("paired_runs", ROOT / "scripts" / "paired_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arithmetic_names_the_processor_its_kernels_and_torch() -> None:
    import torch

    line = provenance.arithmetic("cpu")
    assert torch.backends.cpu.get_cpu_capability() in line and torch.__version__ in line
    assert (provenance.cpu_model() or "") in line


def test_a_run_records_its_machine_and_the_cache_keeps_it(tmp_path: Path) -> None:
    run = RunSpec(Task(FAMILY, 16, 3, 5), parse_optimizer("adamw"), Setting({"lr": 1e-2}), 0)
    record = execute([run], tmp_path, progress=False)[run.key]
    assert record.machine == provenance.arithmetic("cpu")
    again = store.load(run.directory(tmp_path))
    assert again is not None and again.cached and again.machine == record.machine
    # A run cached before machines were recorded loads with an empty machine, not an error.
    result = run.directory(tmp_path) / store.RESULT_NAME
    data = json.loads(result.read_text())
    del data["machine"]
    result.write_text(json.dumps(data))
    old = store.load(run.directory(tmp_path))
    assert old is not None and old.machine == "" and np.array_equal(old.train_loss, record.train_loss)


def test_the_report_warns_only_when_runs_come_from_several_machines() -> None:
    one = machines_note([{"machine": "A"}, {"machine": "A"}])
    assert one[0] == "Machines: A (2 runs)." and not any("Warning" in line for line in one)
    mixed = machines_note([{"machine": "A"}, {"machine": "B"}, {"machine": ""}])
    assert "A (1 runs)" in mixed[0] and "not recorded" in mixed[0]
    assert any("Warning" in line for line in mixed)


def test_paired_runs_pairs_only_seeds_run_on_the_same_machine(tmp_path: Path) -> None:
    paired_runs = _paired_runs()
    same = {0: (1.0, "A"), 1: (2.0, "A"), 2: (4.0, "A")}
    base = {0: (1.5, "A"), 1: (2.0, "A"), 2: (3.0, "A")}
    # differences −0.5, 0, +1: mean 1/6, sample s.d. 0.7638, paired s.e. 0.4410, lower on 1 of 3
    assert paired_runs.paired_cell(same, base) == "+0.1667 ± 0.4410 (1 of 3)"
    other = {s: (v, "B") for s, (v, _) in base.items()}
    assert paired_runs.paired_cell(same, other) == "not paired: 3 seeds from different machines"
    mixed = {**base, 2: (3.0, "B")}
    assert paired_runs.paired_cell(same, mixed) == "-0.2500 ± 0.2500 (1 of 2; 1 seeds from different machines left out)"

    # Files without a machine column (runs made before it was recorded) count as machines of their own.
    def write(path: Path, rows: list[dict[str, object]]) -> Path:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    old = write(tmp_path / "old.csv", [{"task": "t-w1", "optimizer": "adamw", "seed": 0, "final_loss": 1.0}])
    new = write(tmp_path / "new.csv", [{"task": "t-w1", "optimizer": "mulo", "seed": 0, "final_loss": 0.5, "machine": "A"}])
    runs = paired_runs.read_runs([old, new], {})
    assert runs["t-w1"]["adamw"][0] == (1.0, paired_runs.UNRECORDED.format(path=old))
    assert paired_runs.paired_cell(runs["t-w1"]["mulo"], runs["t-w1"]["adamw"]).startswith("not paired")


def test_paired_runs_compares_each_width_with_the_width_before(capsys) -> None:  # noqa: ANN001 (pytest fixture)
    paired_runs = _paired_runs()
    runs = {
        "mlp-w128-d3-t300": {"celo2": {0: (0.40, "A"), 1: (0.30, "A")}},
        "mlp-w256-d3-t300": {"celo2": {0: (0.38, "A"), 1: (0.31, "A")}, "adamw": {0: (0.5, "A")}},
        "mlp-w1024-d3-t300": {"celo2": {0: (0.35, "A"), 1: (0.30, "B")}},
        "lm-w64-d2-t300": {"celo2": {0: (2.0, "A")}},  # one width: no table
    }
    assert paired_runs.width_groups(runs) == {
        "mlp-w*-d3-t300": [(128, "mlp-w128-d3-t300"), (256, "mlp-w256-d3-t300"), (1024, "mlp-w1024-d3-t300")]
    }
    paired_runs.print_width_tables(runs, ["celo2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    # 256 − 128: −0.02 and +0.01, mean −0.005, paired s.e. 0.015, lower on 1 of 2; 1024 − 256: seed 1
    # ran on another machine, so only seed 0 pairs, and one difference has no s.e.
    assert rows == [
        "| `celo2` | 128 | 2 | 0.3500 ± 0.0500 |  |",
        "| `celo2` | 256 | 2 | 0.3450 ± 0.0350 | -0.0050 ± 0.0150 (1 of 2) |",
        "| `celo2` | 1024 | 2 | 0.3250 ± 0.0250 | -0.0300 (one seed: no s.e.) (1 of 1; 1 seeds from different machines left out) |",
    ]
