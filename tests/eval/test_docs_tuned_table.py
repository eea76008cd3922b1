"""docs/evaluation.md lists the committed tuned baseline settings (no placeholder, none stale)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_tuned_settings_table_matches_the_committed_settings():
    doc = (ROOT / "docs" / "evaluation.md").read_text()
    assert "TUNED_TABLE" not in doc  # the placeholder the table replaces
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|.*$", doc, re.M)}
    committed = sorted((ROOT / "configs" / "eval" / "tuned" / "cpu").glob("*.yaml"))
    assert committed and {p.stem for p in committed} <= set(rows)
    for path in committed:
        tuned = yaml.safe_load(path.read_text())
        cells = rows[path.stem].split(" | ")
        for column, optimizer in ((2, "adamw"), (3, "muadam")):
            if optimizer not in tuned:  # a family tuned for its SP baseline only
                assert "not tuned" in cells[column], (path.stem, optimizer)
                continue
            # six significant digits: an extended grid's 0.3 * 0.3 / 0.1 is 0.8999999999999999
            assert f"lr {tuned[optimizer]['chosen']['lr']:.6g}," in cells[column], (path.stem, optimizer)
