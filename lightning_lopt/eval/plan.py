"""A checked evaluation: what will run, with which settings, and where it goes.

:func:`lightning_lopt.eval.evaluate.plan_evaluation` builds one; the runner executes its
:meth:`Plan.runs` and :func:`lightning_lopt.eval.report.write_report` describes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lightning_lopt.eval.optimizers import OptimizerSpec, Setting
from lightning_lopt.eval.runner import RunSpec
from lightning_lopt.eval.suites import Suite
from lightning_lopt.eval.tasks import Family

__all__ = ["Plan"]


@dataclass
class Plan:
    """A checked evaluation: what will run, with which settings, and where it goes."""

    suite: Suite
    optimizers: list[OptimizerSpec]
    seeds: list[int]
    settings: dict[tuple[str, str], Setting]  # (family, optimizer label) -> setting
    to_tune: list[Family]
    out: Path
    cache_dir: Path
    tuned_dir: Path
    device: str

    def runs(self) -> list[RunSpec]:
        return [
            RunSpec(task, spec, self.settings[(task.family.name, spec.label)], seed)
            for task in self.suite.tasks()
            for spec in self.optimizers
            for seed in self.seeds
        ]
