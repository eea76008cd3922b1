"""Plain progress lines for output that is not a terminal (a log file, a pipe, a CI job).

A live bar written to a file shows nothing for minutes and then a garbled frame. :class:`ProgressLines`
takes the calls the commands make on a ``rich.progress.Progress`` (``add_task``, ``update``,
``advance``, ``remove_task``, used as a context manager) and prints one line per finished unit of
the first task (runs done / total, rate, ETA, status), and otherwise at most every ``every_seconds``.

Example::

    with ProgressLines() as bar:
        runs = bar.add_task("runs", total=20, completed=2, status="2 cached")
        ...
        bar.advance(runs)      # "runs 3/20 · 1.5/min · ETA 11m20s · last: adamw lr=0.01: final loss 0.31"
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any


def format_seconds(seconds: float) -> str:
    """``95`` → ``"1m35s"``; ``4000`` → ``"1h06m"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    initial: float = 0.0


class ProgressLines:
    """The subset of ``rich.progress.Progress`` the commands use, printing plain lines.

    Args:
        every_seconds: the least time between two lines about the task in progress.
        stream: where to write (default ``sys.stdout``).
    """

    def __init__(self, every_seconds: float = 30.0, stream: Any = None) -> None:
        self.every_seconds = every_seconds
        self.stream = stream
        self._tasks: dict[int, _Task] = {}
        self._next = 0
        self._last_print = time.monotonic()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        task_id, self._next = self._next, self._next + 1
        self._tasks[task_id] = _Task(description, total, completed, dict(fields), initial=completed)
        return task_id

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def update(self, task_id: int, *, completed: float | None = None, advance: float | None = None, **fields: Any) -> None:
        task = self._tasks[task_id]
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        task.fields.update(fields)
        if time.monotonic() - self._last_print >= self.every_seconds:
            self._print()

    def advance(self, task_id: int, advance: float = 1) -> None:
        self._tasks[task_id].completed += advance
        if task_id == min(self._tasks):
            self._print()  # a unit of the overall task finished
        elif time.monotonic() - self._last_print >= self.every_seconds:
            self._print()

    def _print(self) -> None:
        self._last_print = time.monotonic()
        print(" | ".join(self.line(t) for t in self._tasks.values()), file=self.stream or sys.stdout, flush=True)

    @staticmethod
    def line(task: _Task) -> str:
        """``runs 3/20 · 1.5/min · ETA 11m20s · status`` for one task (tasks are joined by `` | ``)."""
        count = f"{task.completed:g}/{task.total:g}" if task.total is not None else f"{task.completed:g}"
        parts = [f"{task.description} {count}"]
        elapsed = time.monotonic() - task.started
        done = task.completed - task.initial
        if done > 0 and elapsed > 0:
            per_minute = 60 * done / elapsed
            parts.append(f"{per_minute:.3g}/min")
            if task.total is not None:
                parts.append(f"ETA {format_seconds((task.total - task.completed) / per_minute * 60)}")
        status = task.fields.get("status")
        if status:
            parts.append(str(status))
        return " · ".join(parts)
