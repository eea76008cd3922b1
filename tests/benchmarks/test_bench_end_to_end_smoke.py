"""Smoke test of benchmarks/bench_end_to_end.py: the ``--quick`` CPU run writes well-formed JSON.

No timing is asserted: only the schema, positive finite times and finite losses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
bench = pytest.importorskip("benchmarks.bench_end_to_end")


def test_quick_run_writes_schema(tmp_path: Path) -> None:
    assert bench.main(["--quick", "--lm-optimizers", "muadam", "mulo", "--vit-optimizers", "adamw", "mulo",
                       "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("end_to_end-quick-cpu-*.json")
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["benchmark"] == "end_to_end" and record["schema_version"] == bench.SCHEMA_VERSION
    assert [c["name"] for c in record["cases"]] == ["lm", "vit"]
    for case in record["cases"]:
        assert case["results"][0]["ratio_vs_baseline"] == 1.0
        for r in case["results"]:
            assert r["ms_per_step"] > 0 and math.isfinite(r["ms_per_step"])
            assert r["losses"] and all(math.isfinite(x) for x in r["losses"])
    assert all(r["samples_per_s"] > 0 for r in record["cases"][1]["results"])
