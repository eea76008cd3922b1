"""Shared set-up of the evaluation tests: a tiny suite on the bundled digits (seconds per run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

TINY_FAMILIES = {
    "mlp_tiny": {"model": "mlp", "data": "digits", "data_kwargs": {"image_size": 8}, "batch_size": 32,
                 "base_width": 16, "tune_steps": 20, "eval_examples": 64},
}  # fmt: skip


def _write_suite(path: Path, groups: list[dict[str, Any]], families: dict[str, Any] | None = None) -> Path:
    data = {"description": "test suite", "families": {"cpu": families or TINY_FAMILIES}, "sizes": {"cpu": {"groups": groups}}}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def write_suite() -> Callable[..., Path]:
    """``write_suite(path, groups, families=None)``: a suite YAML with ``groups`` at size cpu and
    inline families (default: ``mlp_tiny``)."""
    return _write_suite


@pytest.fixture
def tiny_suite(tmp_path: Path) -> Path:
    """A width group of the tiny MLP at widths 16 and 32, 20 steps."""
    return _write_suite(
        tmp_path / "tiny.yaml", [{"kind": "width", "steps": 20, "tasks": [{"family": "mlp_tiny", "widths": [16, 32]}]}]
    )
