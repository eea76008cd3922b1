"""Baseline tuning: grid searches for AdamW and μAdam at each family's base width, as in μLO.

μLO tunes its hand-designed baselines once, on the largest meta-training task (appendix B): AdamW over
lr, β1, β2 and weight decay, μAdam over lr and the input, output and hidden-learning-rate
multipliers, and uses the chosen settings on every evaluation task. Here each task family is tuned
at its ``base_width`` and ``depth`` for its ``tune_steps`` steps with the grids of
``configs/eval/tuning.yaml`` (``cpu``: modest; ``full``: the papers' 504 and 500 runs). The winner has
the lowest final training loss (mean of the last 10 batches, capped, averaged over the tuning seeds).

Tuning seeds start at :data:`TUNE_SEED` so that tuning never sees the initialisations and batches of
the evaluation seeds ``0..N-1``. Every grid run is an ordinary cached run, so an interrupted tuning
resumes. The chosen settings and the whole grid's results are written to
``configs/eval/tuned/<size>/<family>.yaml`` (committed), together with the family definition and
the grid they were tuned on: a changed family or a changed grid makes them stale, and evaluation
then asks for a re-tune.

A winner on the edge of a numeric axis (three or more values) may have its optimum outside the grid,
so the axis is extended geometrically past that edge and the new points are run, until the winner
is interior (at most :data:`MAX_EXTENSIONS` times; the file records the extensions and any edge
that remains).

Example::

    path = tune_family(family, [parse_optimizer("adamw")], size="cpu", cache_dir="outputs/eval/tuning")
    load_tuned(DEFAULT_TUNED_DIR, "cpu", family, "adamw").values      # {"lr": ..., "betas": [...], ...}
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lightning_lopt.eval import metrics
from lightning_lopt.eval.optimizers import COSINE_SUFFIX, OptimizerSpec, Setting
from lightning_lopt.eval.runner import RunSpec, execute
from lightning_lopt.eval.store import RunRecord
from lightning_lopt.eval.suites import CONFIG_DIR, SIZES
from lightning_lopt.eval.tasks import Family, Task

#: The baselines that are tuned, and the parametrization they are tuned (and evaluated) under.
TUNABLE = {"adamw": "sp", "muadam": "mup"}
#: First tuning seed: disjoint from the evaluation seeds 0..N-1.
TUNE_SEED = 1000
GRIDS_FILE = CONFIG_DIR / "tuning.yaml"
DEFAULT_TUNED_DIR = CONFIG_DIR / "tuned"
#: How many times one optimizer's grid may be extended past an edge winner.
MAX_EXTENSIONS = 6


def is_tunable(spec: OptimizerSpec) -> bool:
    """Whether ``spec`` is a baseline with tuned settings: AdamW on SP, μAdam on μP models, with a
    constant rate or the warmup + cosine schedule (tuned separately, on the same grid)."""
    return TUNABLE.get(spec.factory) == spec.param and spec.meta_weights is None


def load_grids(grid: str) -> dict[str, dict[str, dict[str, list[Any]]]]:
    """The named grids of a size in ``tuning.yaml`` (``grid`` = ``cpu`` or ``full``), or of a YAML
    file with the same layout (``{name: {optimizer: {axis: [values]}}}``)."""
    if grid in SIZES:
        data = yaml.safe_load(GRIDS_FILE.read_text())[grid]
    else:
        path = Path(grid).expanduser()
        if not path.is_file():
            raise ValueError(f"--grid: expected {' or '.join(SIZES)} or a YAML file, got {grid!r}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"--grid {grid}: not valid YAML: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"--grid {grid}: expected {{grid name: {{optimizer: {{axis: [values]}}}}}}")
    return data


def grid_settings(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's axes, in order, as setting values.

    Axes are setting keys (``lr``, ``weight_decay``, ``input_mult``, ...), except that ``beta1``
    and ``beta2`` combine into AdamW's ``betas`` (β2 defaults to 0.999).

    Example::

        grid_settings({"lr": [1e-3, 1e-2], "beta1": [0.9]})
        # [{"lr": 0.001, "betas": [0.9, 0.999]}, {"lr": 0.01, "betas": [0.9, 0.999]}]
    """
    bad = [k for k, v in axes.items() if not isinstance(v, list) or not v]
    if bad:
        raise ValueError(f"grid: axes {bad} must be non-empty lists of values")
    names = list(axes)
    out = []
    for combo in itertools.product(*(axes[n] for n in names)):
        values = dict(zip(names, combo))
        if "beta1" in values or "beta2" in values:
            values["betas"] = [values.pop("beta1", 0.9), values.pop("beta2", 0.999)]
        out.append(values)
    return out


def grid_edges(axes: dict[str, list[Any]], row: dict[str, Any]) -> list[str]:
    """The axes of three or more numbers at whose smallest or largest value ``row`` lies: the
    optimum may lie outside the grid there."""
    return [
        name for name, values in axes.items()
        if len(values) > 2 and all(isinstance(v, (int, float)) for v in values) and row[name] in (min(values), max(values))
    ]  # fmt: skip


def extend_past_edges(axes: dict[str, list[Any]], row: dict[str, Any]) -> dict[str, list[Any]]:
    """``axes`` with one more value past each edge that ``row`` lies on (:func:`grid_edges`), at the
    geometric step of the two values nearest that edge; unchanged when ``row`` is interior.

    Example::

        extend_past_edges({"lr": [1e-3, 3e-3, 1e-2]}, {"lr": 1e-2})     # {"lr": [0.001, 0.003, 0.01, 0.0333...]}
    """
    out = {name: list(values) for name, values in axes.items()}
    for name in grid_edges(axes, row):
        values = sorted(axes[name])
        if values[0] <= 0:
            raise ValueError(f"grid axis {name!r}: cannot extend {values} geometrically past an edge (values must be > 0)")
        if row[name] == values[-1]:
            out[name].append(float(values[-1] * values[-1] / values[-2]))
        else:
            out[name].insert(0, float(values[0] * values[0] / values[1]))
    return out


def base_task(family: Family) -> Task:
    """The task a family is tuned on."""
    return Task(family, family.base_width, family.depth, family.tune_steps)


def tuned_path(tuned_dir: str | Path, size: str, family: str) -> Path:
    return Path(tuned_dir) / size / f"{family}.yaml"


def load_tuned(tuned_dir: str | Path, size: str, family: Family, optimizer: str) -> Setting | None:
    """The tuned setting of ``optimizer`` on ``family``, or ``None`` if it was never tuned.

    Raises ``ValueError`` when the settings were tuned on a different family definition.
    """
    path = tuned_path(tuned_dir, size, family.name)
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    if optimizer not in data:
        return None
    if data.get("family_config") != family.training_config():
        raise ValueError(
            f"{path}: these settings were tuned on a different definition of family {family.name!r} "
            f"({data.get('family_config')}); re-tune with --tune all, or restore the family"
        )
    source = data.get("grid_file", size)
    section = data[optimizer]
    tuned_on = section.get("start_grid", section.get("grid"))
    try:
        current = load_grids(source).get(family.grid, {}).get(optimizer.removesuffix(COSINE_SUFFIX))
    except ValueError as err:
        raise ValueError(f"{path}: the grid these settings were tuned on cannot be read: {err}") from err
    if tuned_on != current:
        raise ValueError(
            f"{path}: {optimizer} was tuned on the grid {tuned_on}, but grid {family.grid!r} of {source} is now "
            f"{current}; re-tune with --tune all, or restore the grid"
        )
    return Setting(dict(section["chosen"]), f"tuned: {path}")


def _rows(settings: list[dict[str, Any]], runs: dict[int, list[RunSpec]], records: dict[str, RunRecord]) -> list[dict[str, Any]]:
    """One row per grid point: its values, mean final loss over the seeds and divergences."""
    rows = []
    for i, values in enumerate(settings):
        recs = [records[s.key] for s in runs[i]]
        flat = {k: v for k, v in values.items() if k != "betas"}
        if "betas" in values:
            flat["beta1"], flat["beta2"] = values["betas"]
        rows.append(
            {
                **flat,
                "final_loss": float(np.mean([metrics.final_loss(r.train_loss) for r in recs])),
                "diverged": sum(r.diverged for r in recs),
            }
        )
    return rows


def tune_family(
    family: Family,
    optimizers: Sequence[OptimizerSpec],
    *,
    size: str,
    grid: str | None = None,
    tuned_dir: str | Path = DEFAULT_TUNED_DIR,
    cache_dir: str | Path,
    seeds: int = 1,
    device: str = "cpu",
    workers: int = 1,
    progress: bool = True,
    command: str = "",
) -> Path:
    """Run the grid of every tunable optimizer in ``optimizers`` on ``family`` and write the winners.

    Other optimizers' sections of an existing file are kept. Returns the written file.
    """
    grids = load_grids(grid or size)
    if family.grid not in grids:
        raise ValueError(f"family {family.name!r} asks for grid {family.grid!r}; the grid file has {sorted(grids)}")
    task = base_task(family)
    tune_seeds = list(range(TUNE_SEED, TUNE_SEED + seeds))
    path = tuned_path(tuned_dir, size, family.name)
    data: dict[str, Any] = yaml.safe_load(path.read_text()) if path.is_file() else {}
    if data.get("family_config") != family.training_config():
        data = {}  # settings of an older family definition are not kept beside new ones
    for spec in optimizers:
        if not is_tunable(spec):
            continue
        axes = grids[family.grid].get(spec.factory)
        if axes is None:
            raise ValueError(f"grid {family.grid!r} has no {spec.factory} axes")
        ran, extensions = axes, []
        while True:
            settings = grid_settings(ran)
            runs = {i: [RunSpec(task, spec, Setting(v, "grid"), s) for s in tune_seeds] for i, v in enumerate(settings)}
            # Cached: after an extension only the new grid points run.
            records = execute([r for rs in runs.values() for r in rs], cache_dir, device=device, workers=workers, progress=progress)
            rows = _rows(settings, runs, records)
            best = min(range(len(rows)), key=lambda i: rows[i]["final_loss"])  # first of equals: grid order
            edges = grid_edges(ran, rows[best])
            if not edges or len(extensions) == MAX_EXTENSIONS:
                break
            extensions.append({name: rows[best][name] for name in edges})
            ran = extend_past_edges(ran, rows[best])
        data[spec.tuned_name] = {
            "chosen": settings[best],
            "final_loss": rows[best]["final_loss"],
            "at_grid_edge": edges,
            "start_grid": axes,
            "extended_past": extensions,
            "grid": ran,
            "results": sorted(rows, key=lambda r: r["final_loss"]),
        }
    header = {
        "family": family.name,
        "size": size,
        "family_config": family.training_config(),
        "grid_file": grid or size,
        "tuned_at": {"width": task.width, "depth": task.depth, "steps": task.steps, "seeds": tune_seeds},
        "command": command,
    }
    optimizers_part = {k: v for k, v in data.items() if k.removesuffix(COSINE_SUFFIX) in TUNABLE}
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"# Tuned baselines for family {family.name} at size {size}: written by lightning_lopt.eval.tuning.\n"
        "# `chosen` is what evaluation runs; `results` is every grid point, best first.\n"
        + yaml.safe_dump({**header, **optimizers_part}, sort_keys=False, default_flow_style=None, width=110)
    )
    path.write_text(text)
    return path
