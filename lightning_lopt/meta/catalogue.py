"""The learned optimizers that :class:`~lightning_lopt.meta.MetaTrainer` builds by name, and Celo's stages.

Example::

    lopt, mu = build_lopt("mulo", stage=None, seed=0)     # SmallFCLOpt(step_mult=0.01), μP scales
    frozen = frozen_by_stage(lopt, stage=None)            # name -> whether that θ entry stays fixed
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_lopt.optim.architectures import LearnedOptimizerModule
from lightning_lopt.optim.learned import LearnedOptimizer
from lightning_lopt.optim.registry import LEARNED

#: name -> the learned-optimizer class MetaTrainer builds θ from (its ``meta_module``, ``mu``, stages)
LOPTS: dict[str, type[LearnedOptimizer]] = {cls.registry_name: cls for cls in LEARNED if cls.meta_trainable}


def build_lopt(lopt: str | LearnedOptimizerModule, stage: int | None, seed: int) -> tuple[LearnedOptimizerModule, bool]:
    """The learned optimizer to meta-train and whether it uses μP scales (a given module: ``False``).

    A name builds a fresh module from :data:`LOPTS` initialised from ``seed``; ``stage`` applies to
    Celo only (default 1).
    """
    if isinstance(lopt, str):
        key = lopt.lower()
        if key not in LOPTS:
            raise ValueError(f"MetaTrainer: unknown learned optimizer {lopt!r}; known: {', '.join(LOPTS)}")
        cls = LOPTS[key]
        if cls.staged and stage is None:
            stage = 1
        if not cls.staged and stage is not None:
            raise ValueError(f"MetaTrainer: stage applies to {', '.join(n for n, c in LOPTS.items() if c.staged)} only, not {lopt!r}")
        module = cls.meta_module(stage or 1)
        module.reset_parameters(torch.Generator().manual_seed(seed))
        return module, cls.mu
    if not hasattr(lopt, "pure_step") or not hasattr(lopt, "functional"):
        raise TypeError(f"MetaTrainer: lopt must be a name or a learned-optimizer module, got {type(lopt).__name__}")
    return lopt, False


def frozen_by_stage(lopt: LearnedOptimizerModule, stage: int | None) -> Callable[[str], bool]:
    """Which θ entries a stage freezes, by the staged optimizer class that runs ``lopt``'s architecture."""
    for cls in LOPTS.values():
        if cls.staged and isinstance(lopt, cls.module_class):
            return cls.frozen_in_stage(stage)
    return lambda name: False
