"""The main job's table shows the settings whole on an 80-column terminal."""

from __future__ import annotations

import io

from rich.console import Console

from lightning_lopt.quickstart import DEFAULT_OPTIMIZERS, _weights_label, summary_table


def test_the_settings_column_is_not_cut_at_80_columns():
    row = {"train_loss": 0.1234, "train_acc": 0.95, "val_loss": 0.2345, "val_acc": 0.93, "wall_time_s": 12.3}
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(summary_table("lightning_lopt main job: μP MLP w128 on digits, 300 steps, seed 0",
                                {name: row for name in DEFAULT_OPTIMIZERS}, DEFAULT_OPTIMIZERS))  # fmt: skip
    text = console.export_text()
    assert "…" not in text
    assert _weights_label("mulo").startswith("weights=mulo-") and _weights_label("mulo") in text
    assert "0.1234" in text and "12.3" in text
