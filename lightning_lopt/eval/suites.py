"""Evaluation suites: YAML files in ``configs/eval/`` that expand into task groups.

A suite file has a ``description`` and, for each size it offers (``cpu``: a 2-core machine; ``full``:
the papers' scale, for a GPU), a list of groups. A group is one study with one kind of plot:

==========  ========================================================  ============================
``kind``    what                                                       plots and tables
==========  ========================================================  ============================
``width``   each family at several widths (μLO §4.1.2)                  loss vs width (Fig. 1), curves
                                                                       at the largest width (Fig. 4),
                                                                       Table 2 ranks: base / next /
                                                                       largest width at each horizon
``depth``   deeper networks at the base width (μLO §4.1.3)             curves (Fig. 5)
``horizon`` training far past the meta-training unroll (μLO §4.1.4)    curves with the unroll marked
                                                                       (Fig. 6)
``diverse`` different families (Celo §5.3)                             IQM / median / optimality gap
==========  ========================================================  ============================

Every group also gets per-task curves, a final-loss table, average ranks and, when tuned AdamW is
among the optimizers, Celo's normalised-loss and speedup aggregates.

Example (``configs/eval/width.yaml``, abridged)::

    description: μLO Fig. 1 / 4 and Table 2
    sizes:
      cpu:
        meta_unroll: 1000
        groups:
          - kind: width
            steps: 1000
            tasks:
              - {family: mlp_fashion_mnist, widths: [128, 256, 512, 1024, 2048]}

A task entry names a family of ``configs/eval/families.yaml`` (or of the suite file's own
``families:`` section, keyed by size like that file) and may set ``widths`` (default: the family's
base width), ``depth`` (default: the family's) and ``steps`` (default: the group's). ``horizons``
(default ``[steps]``) are the steps at which rank tables read the loss.

Usage::

    suite = load_suite("width", "cpu")
    [task.id for task in suite.tasks()]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_lopt.checks import check_positive_int
from lightning_lopt.eval.tasks import Family, Task

#: ``configs/eval`` of the source checkout.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
FAMILIES_FILE = "families.yaml"
SIZES = ("cpu", "full")
KINDS = ("width", "depth", "horizon", "diverse")
#: The meta-training unroll of μLO (and the default here): the dotted line of the curve plots.
META_UNROLL = 1000


@dataclass(frozen=True)
class Group:
    """One study of a suite: its kind, tasks, and the steps at which ranks read the loss."""

    kind: str
    tasks: tuple[Task, ...]
    horizons: tuple[int, ...]

    @property
    def steps(self) -> int:
        return max(t.steps for t in self.tasks)


@dataclass(frozen=True)
class Suite:
    """A suite at one size: groups of tasks and the families they use."""

    name: str
    size: str
    description: str
    path: Path
    groups: tuple[Group, ...]
    meta_unroll: int

    def tasks(self) -> list[Task]:
        """Every task once, in the order the groups list them."""
        return list({t.id: t for g in self.groups for t in g.tasks}.values())

    def families(self) -> list[Family]:
        return list({t.family.name: t.family for t in self.tasks()}.values())


def available() -> list[str]:
    """The suites in ``configs/eval/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.name not in (FAMILIES_FILE, "tuning.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_families(size: str, extra: dict[str, Any] | None = None) -> dict[str, Family]:
    """The families of ``configs/eval/families.yaml`` at ``size``, plus or overridden by ``extra``
    (a suite file's ``families:`` section, keyed by size)."""
    table = dict(_read_yaml(CONFIG_DIR / FAMILIES_FILE).get(size) or {})
    table.update((extra or {}).get(size) or {})
    return {name: Family.from_dict(name, dict(cfg)) for name, cfg in table.items()}


def suite_path(name: str) -> Path:
    """The file of a suite name or path; ``ValueError`` listing the suites otherwise."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"--suite: {path} does not exist; known suites: {', '.join(available())}")
        return path
    if name not in available():
        raise ValueError(f"--suite: unknown suite {name!r}; known: {', '.join(available())}, or a path to a .yaml file")
    return CONFIG_DIR / f"{name}.yaml"


def _positive(where: str, key: str, value: Any) -> int:
    return check_positive_int(f"{where}: {key}", value)


def _reject_unknown(where: str, entry: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {', '.join(known)}")


def _group(where: str, entry: dict[str, Any], families: dict[str, Family]) -> Group:
    _reject_unknown(where, entry, ("kind", "steps", "horizons", "tasks"))
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    steps = _positive(where, "steps", entry.get("steps"))
    tasks: list[Task] = []
    for i, item in enumerate(entry.get("tasks") or []):
        here = f"{where}, task {i}"
        _reject_unknown(here, item, ("family", "widths", "depth", "steps"))
        name = item.get("family")
        if name not in families:
            raise ValueError(f"{here}: unknown family {name!r}; known at this size: {', '.join(families)}")
        family = families[name]
        widths = item.get("widths", [family.base_width])
        if not isinstance(widths, list) or not widths:
            raise ValueError(f"{here}: widths must be a non-empty list, got {widths!r}")
        depth = _positive(here, "depth", item.get("depth", family.depth))
        task_steps = _positive(here, "steps", item.get("steps", steps))
        tasks += [Task(family, _positive(here, "width", w), depth, task_steps) for w in sorted(set(widths))]
    if not tasks:
        raise ValueError(f"{where}: no tasks")
    horizons = entry.get("horizons", [steps])
    if not isinstance(horizons, list) or not horizons:
        raise ValueError(f"{where}: horizons must be a non-empty list of steps, got {horizons!r}")
    for h in horizons:
        _positive(where, "horizons", h)
        if h > min(t.steps for t in tasks):
            raise ValueError(f"{where}: horizon {h} is longer than a task of the group ({min(t.steps for t in tasks)} steps)")
    return Group(kind, tuple(tasks), tuple(sorted(horizons)))


def load_suite(name: str, size: str = "cpu") -> Suite:
    """Read a suite (a name in ``configs/eval/`` or a path) at ``size`` and check every entry.

    Raises ``ValueError`` naming the file, the group and the fix for an unknown suite, size,
    family, key or a malformed value, so a bad suite fails before any training.
    """
    path = suite_path(name)
    data = _read_yaml(path)
    sizes = data.get("sizes") or {}
    if size not in SIZES:
        raise ValueError(f"--size: expected one of {', '.join(SIZES)}, got {size!r}")
    if size not in sizes:
        raise ValueError(f"--size: suite {path.stem!r} has sizes {sorted(sizes)}, not {size!r}")
    families = load_families(size, data.get("families"))
    entry = sizes[size] or {}
    groups = [_group(f"{path.name} [{size}] group {i}", g, families) for i, g in enumerate(entry.get("groups") or [])]
    if not groups:
        raise ValueError(f"{path.name} [{size}]: no groups")
    meta_unroll = _positive(f"{path.name} [{size}]", "meta_unroll", entry.get("meta_unroll", META_UNROLL))
    return Suite(path.stem, size, str(data.get("description", "")).strip(), path, tuple(groups), meta_unroll)
