"""Smoke test of benchmarks/bench_optimizer_step.py: the ``--quick`` run writes well-formed JSON.

No timing is asserted: only the schema, and that every ratio and byte count is positive and finite.
The script is loaded from its path, so the test does not depend on ``benchmarks`` being importable.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_lopt.optim import registry

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_optimizer_step.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script, imported from its path."""
    spec = importlib.util.spec_from_file_location("bench_optimizer_step_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _positive_finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_run_writes_schema(bench: ModuleType, tmp_path: Path) -> None:
    assert bench.main(["--quick", "--repeats", "2", "--out", str(tmp_path)]) == 0

    (path,) = tmp_path.glob("optimizer_step-quick-cpu-*.json")
    record = json.loads(path.read_text(encoding="utf-8"))

    assert record["benchmark"] == "optimizer_step"
    assert record["schema_version"] == bench.SCHEMA_VERSION
    machine = record["machine"]
    for key in ("platform", "cpu_count", "cpu_model", "gpu", "loadavg_start", "loadavg_end", "torch_num_threads"):
        assert key in machine
    for key in ("python", "torch", "lightning_lopt", "git_commit"):
        assert key in record["versions"]
    config = record["config"]
    assert config["device"] == "cpu" and config["repeats"] == 2 and config["preset"] == "quick"

    assert [c["name"] for c in record["cases"]] == config["cases"]
    for case in record["cases"]:
        assert case["num_params"] > 0 and case["num_tensors"] > 0
        assert case["reference"] == "adamw-foreach"
        by_name = {r["optimizer"]: r for r in case["results"]}
        assert list(by_name) == config["optimizers"]
        for name, r in by_name.items():
            assert r["status"] == "ok", (case["name"], name, r)
            assert len(r["samples_ms"]) == 2
            for key in ("median_ms", "p10_ms", "p90_ms", "min_ms", "ratio_vs_adamw", "state_bytes_per_param"):
                assert _positive_finite(r[key]), (case["name"], name, key, r[key])
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert r["state_bytes"] == pytest.approx(r["state_bytes_per_param"] * case["num_params"])
            assert r["peak_step_extra_bytes"] is None  # measured on CUDA only
        assert by_name["adamw-foreach"]["ratio_vs_adamw"] == 1.0
        # AdamW keeps exp_avg and exp_avg_sq (8 B/param) plus a 4-byte step counter per tensor.
        expected = 8 + 4 * case["num_tensors"] / case["num_params"]
        assert by_name["adamw-foreach"]["state_bytes_per_param"] == pytest.approx(expected)


def test_percentile_matches_linear_interpolation(bench: ModuleType) -> None:
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 10) == pytest.approx(1.4)
    assert bench.percentile([7.0], 90) == 7.0


def test_failing_optimizer_is_recorded_and_others_go_on(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    class FailsOnSecondStep(torch.optim.SGD):
        def __init__(self, params: object) -> None:
            super().__init__(params, lr=0.1)
            self.calls = 0

        def step(self, closure: object = None) -> None:  # type: ignore[override]
            self.calls += 1
            if self.calls == 2:  # the warm-up step passes, the first timed step fails
                raise RuntimeError("out of memory (simulated)")

    monkeypatch.setitem(registry._REGISTRY, "bench-test-fails", FailsOnSecondStep)
    monkeypatch.setitem(bench.OPTIMIZERS, "fails", bench.OptimizerSpec("bench-test-fails"))
    params = bench.make_params(bench.CASES["mlp-w32"].specs(), torch.device("cpu"), seed=0)
    results = bench.run_batch(
        ["adamw-foreach", "fails"], params, torch.tensor(2.3), device=torch.device("cpu"), warmup=1, repeats=3, log=print
    )
    assert results["fails"] == {"optimizer": "fails", "status": "error", "error": "RuntimeError: out of memory (simulated)"}
    assert results["adamw-foreach"]["status"] == "ok" and len(results["adamw-foreach"]["samples_ms"]) == 3
