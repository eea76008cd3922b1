"""The learned optimizers that :class:`~lightning_lopt.meta.MetaTrainer` builds by name, and Celo's stages.

Example::

    lopt, mu = build_lopt("mulo", stage=None, seed=0)     # SmallFCLOpt(step_mult=0.01), μP scales
    frozen = frozen_by_stage(lopt, stage=None)            # name -> whether that θ entry stays fixed
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_lopt.optim.architectures import CeloLOpt, LearnedOptimizerModule, SmallFCLOpt, VeLOLOpt
from lightning_lopt.optim.celo2_lopt import Celo2LOpt

# -- the catalogue ----------------------------------------------------------------------------------
#: name -> (factory(stage), μ scales?)
LOPTS: dict[str, tuple[Callable[[int], LearnedOptimizerModule], bool]] = {
    "mulo": (lambda stage: SmallFCLOpt(step_mult=0.01), True),
    "lo": (lambda stage: SmallFCLOpt(step_mult=0.001), False),
    "celo": (lambda stage: CeloLOpt(train_phase=stage), False),
    "muvelo": (lambda stage: VeLOLOpt.mu(), True),
    "velo": (lambda stage: VeLOLOpt(), False),
    "celo2": (lambda stage: Celo2LOpt.meta_training(), False),
    "celo2-base": (lambda stage: Celo2LOpt.base(step_mult=1e-3), False),
}
# -- end of the catalogue ---------------------------------------------------------------------------


def build_lopt(lopt: str | LearnedOptimizerModule, stage: int | None, seed: int) -> tuple[LearnedOptimizerModule, bool]:
    """The learned optimizer to meta-train and whether it uses μP scales (a given module: ``False``).

    A name builds a fresh module from :data:`LOPTS` initialised from ``seed``; ``stage`` applies to
    Celo only (default 1).
    """
    if isinstance(lopt, str):
        key = lopt.lower()
        if key not in LOPTS:
            raise ValueError(f"MetaTrainer: unknown learned optimizer {lopt!r}; known: {', '.join(LOPTS)}")
        if key == "celo" and stage is None:
            stage = 1
        if key != "celo" and stage is not None:
            raise ValueError(f"MetaTrainer: stage applies to celo only, not {lopt!r}")
        factory, mu = LOPTS[key]
        module = factory(stage or 1)
        module.reset_parameters(torch.Generator().manual_seed(seed))
        return module, mu
    if not hasattr(lopt, "pure_step") or not hasattr(lopt, "functional"):
        raise TypeError(f"MetaTrainer: lopt must be a name or a learned-optimizer module, got {type(lopt).__name__}")
    return lopt, False


def frozen_by_stage(lopt: LearnedOptimizerModule, stage: int | None) -> Callable[[str], bool]:
    """Which θ entries a stage freezes
    (docs/reference/celo.md#two-stages): stage 1 the scheduler, stage 2 the MLP rule."""
    if isinstance(lopt, CeloLOpt) and stage == 1:
        return lambda name: name.startswith("scheduler.")
    if isinstance(lopt, CeloLOpt) and stage == 2:
        return lambda name: not name.startswith("scheduler.")
    return lambda name: False
