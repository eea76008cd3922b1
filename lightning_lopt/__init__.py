"""lightning_lopt: μP learned optimizers (μLO, Celo, VeLO) for PyTorch Lightning.

Quick start::

    import lightning_lopt as llo
    trainer = llo.Trainer(optimizer="mulo", max_steps=300)
    trainer.fit(llo.OptimizeeModule(llo.models.MuMLP((1, 8, 8), 128, 3, 10)), llo.datamodules.DigitsDataModule())

Public names are imported lazily so that ``import lightning_lopt`` stays cheap and so that
``--optimizer lightning_lopt.MuLO`` resolves in LightningCLI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Trainer": "lightning_lopt.trainer",
    "configure_optimizer": "lightning_lopt.trainer",
    "LossToOptimizer": "lightning_lopt.trainer",
    "with_horizon": "lightning_lopt.trainer",
    "OptimizeeModule": "lightning_lopt.optimizee",
    "MuAdam": "lightning_lopt.optim.baselines",
    "LO": "lightning_lopt.optim.optimizers",
    "MuLO": "lightning_lopt.optim.optimizers",
    "Celo": "lightning_lopt.optim.optimizers",
    "VeLO": "lightning_lopt.optim.optimizers",
    "MuVeLO": "lightning_lopt.optim.optimizers",
    "Celo2": "lightning_lopt.optim.celo2",
    "Celo2Base": "lightning_lopt.optim.celo2",
    "MuCelo2": "lightning_lopt.optim.celo2",
    "CoordCheck": "lightning_lopt.callbacks",
}
_SUBPACKAGES = ("models", "datamodules", "optim", "callbacks", "meta", "eval")

__all__ = sorted([*_EXPORTS, *_SUBPACKAGES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"lightning_lopt.{name}")
    raise AttributeError(f"module 'lightning_lopt' has no attribute {name!r}")
