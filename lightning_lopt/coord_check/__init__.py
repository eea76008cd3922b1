"""The μP coordinate check: the :class:`CoordCheck` callback, the width sweep and their plots.

- :mod:`.callback`: :class:`CoordCheck`, per-layer coordinate statistics during any Lightning fit
  (also importable as ``lightning_lopt.callbacks.CoordCheck``);
- :mod:`.sweep`: :func:`run_coord_sweep`, one short fit per width, optimizer, parametrization and seed;
- :mod:`.summary`: the log-log slopes against width (``summary.json``) and their text table;
- :mod:`.plots`: the callback's and the sweep's PNGs;
- :mod:`.cli`: ``python train.py coord-check``.

Example::

    from lightning_lopt.coord_check import CoordCheck, run_coord_sweep
    result = run_coord_sweep("mlp", widths=(64, 256), optimizers=("muadam@mup", "adamw@sp"), out=None)

See ``docs/coord_check.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_lopt.coord_check.callback import CoordCheck

if TYPE_CHECKING:
    from lightning_lopt.coord_check.sweep import CoordSweepResult, run_coord_sweep

# The sweep pulls in the evaluation's data and runner: imported on first use, so that
# ``lightning_lopt.callbacks.CoordCheck`` stays as light as the callback itself.
_LAZY = {"CoordSweepResult": "sweep", "run_coord_sweep": "sweep"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"lightning_lopt.coord_check.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lightning_lopt.coord_check' has no attribute {name!r}")


__all__ = ["CoordCheck", "CoordSweepResult", "run_coord_sweep"]
