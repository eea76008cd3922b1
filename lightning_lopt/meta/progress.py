"""Progress of a meta-training fit, counted in meta-steps (resumed runs included).

Lightning's bars count the batches of the current epoch ("Epoch 0/-2" for a step-bounded fit, and
0 after a light resume). :class:`MetaStepBar` shows meta-steps done out of ``max_steps`` on a
terminal; :class:`MetaStepLines` prints a plain line every ``every_seconds`` when the output is a
file or a pipe, where a live bar only shows up garbled at the end. :func:`meta_progress_callback`
picks one.

Example::

    L.Trainer(max_steps=300, callbacks=[meta_progress_callback()]).fit(meta)
    # not a terminal: "meta-step 40/300 | meta/loss 1.873 | 3.1 steps/s | ETA 1m24s"
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from lightning_lopt.progress_lines import format_seconds


class MetaStepBar(RichProgressBar):
    """Lightning's rich bar, counting meta-steps (``global_step``) out of ``max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else float("inf")

    @property
    def train_batch_idx(self) -> int:
        return self.trainer.global_step

    def _get_train_description(self, current_epoch: int) -> str:
        return "meta-steps"


class MetaStepLines(ProgressBar):
    """Plain progress lines: meta-step, meta-loss, rate and ETA, at most every ``every_seconds``.

    Args:
        every_seconds: the least time between two lines (the last step always prints).
        stream: where to write (default ``sys.stdout``).
    """

    def __init__(self, every_seconds: float = 30.0, stream: Any = None) -> None:
        super().__init__()
        self.every_seconds = every_seconds
        self.stream = stream
        self._enabled = True
        self._start: tuple[float, int] | None = None
        self._last_print = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)
        self._last_print = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.monotonic()
        last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if self._enabled and (last or now - self._last_print >= self.every_seconds):
            self._last_print = now
            print(self.line(trainer, now), file=self.stream or sys.stdout, flush=True)

    def line(self, trainer: L.Trainer, now: float) -> str:
        """``meta-step 40/300 | meta/loss 1.873 | 3.1 steps/s | ETA 1m24s``."""
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"meta-step {step}/{total}" if total > 0 else f"meta-step {step}"]
        loss = trainer.callback_metrics.get("meta/loss")
        if loss is not None:
            parts.append(f"meta/loss {float(loss):.4g}")
        started, first = self._start or (now, step)
        if now > started and step > first:
            rate = (step - first) / (now - started)
            parts.append(f"{rate:.3g} steps/s")
            if total > 0:
                parts.append(f"ETA {format_seconds((total - step) / rate)}")
        return " | ".join(parts)


def meta_progress_callback(stream: Any = None) -> ProgressBar:
    """A :class:`MetaStepBar` when ``stream`` (default stdout) is a terminal, else :class:`MetaStepLines`."""
    out = stream or sys.stdout
    return MetaStepBar() if out.isatty() else MetaStepLines(stream=stream)
