"""``evaluate`` as a long job: plain progress lines when stdout is not a terminal, and Ctrl-C ends
it with one line, keeping the finished runs for the next call."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from lightning_lopt.eval import runner
from lightning_lopt.eval.evaluate import main
from lightning_lopt.progress_lines import ProgressLines, format_seconds


def test_ctrl_c_is_one_line_and_the_finished_runs_resume(
    tiny_suite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--suite", str(tiny_suite), "--optimizers", "adamw", "--seeds", "1", "--out", str(tmp_path / "out"),
            "--optimizer-kwargs", '{"adamw": {"lr": 0.01}}', "--bootstrap-reps", "100", "--no-plot"]  # fmt: skip
    real_train, calls = runner.train, []

    def interrupted_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", interrupted_second)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 130
    captured = capsys.readouterr()
    assert "interrupted: the runs that finished are cached" in captured.err and "Traceback" not in captured.err
    # stdout is not a terminal here: a plain line per finished run, no bar.
    assert re.search(r"^runs 1/2 · .*/min · ETA \S+ · last: .*(final loss|diverged)", captured.out, re.M), captured.out

    monkeypatch.setattr(runner, "train", real_train)
    main(argv)
    assert "2 runs: 1 from the cache" in (tmp_path / "out" / "report.md").read_text()


def test_progress_lines_throttle_the_inner_task_and_format_durations() -> None:
    lines: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            lines.extend(t for t in text.splitlines() if t)

        def flush(self) -> None:
            pass

    bar = ProgressLines(every_seconds=3600, stream=Sink())
    overall = bar.add_task("runs", total=3, completed=1, status="1 cached")
    inner = bar.add_task("adamw", total=100, status="")
    for step in range(100):
        bar.update(inner, completed=step, status="loss 0.5")  # within every_seconds: silent
    assert lines == []
    bar.remove_task(inner)
    bar.advance(overall)
    assert len(lines) == 1 and lines[0].startswith("runs 2/3 · ") and "1 cached" in lines[0]
    assert [format_seconds(s) for s in (5, 95, 4000)] == ["5s", "1m35s", "1h06m"]
