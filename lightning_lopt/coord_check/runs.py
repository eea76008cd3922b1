"""The coordinate check's ``--optimizers``: the evaluation's grammar, each entry run per parametrization.

An entry is parsed by :func:`lightning_lopt.eval.optimizers.parse_optimizer`, the grammar of every
command: a registry name (``adamw``), ``name:weights`` for a learned optimizer's weights
(``mulo:runs/my-mulo``), an import path (``package.module:Class``), optionally pinned with ``@mup``
or ``@sp``. Unlike the evaluation, an unpinned entry runs under every parametrization of ``--param``
(the check compares them). The older ``name:mup`` / ``name:sp`` still works, with a ``FutureWarning``.

Example::

    runs, optimizers = parse_runs(["adamw@sp", "muadam", "mulo:runs/my-mulo@mup"], param="both")
    runs          # [("adamw", "sp"), ("muadam", "mup"), ("muadam", "sp"), ("mulo:runs/my-mulo", "mup")]
    optimizers["mulo:runs/my-mulo"].kwargs    # {"meta_weights": "runs/my-mulo"}
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_lopt import optim
from lightning_lopt.eval.optimizers import PARAMS, OptimizerSpec, parse_optimizer

__all__ = ["SweepOptimizer", "optimizer_key", "parse_runs"]


@dataclass(frozen=True)
class SweepOptimizer:
    """One ``--optimizers`` entry as the sweep builds it.

    Attributes:
        key: names it in records, ``summary.json``, files and ``--optimizer-kwargs``: the entry
            without its ``@`` pin, registry names in lower case (``adamw``, ``mulo:runs/my-mulo``).
        optimizer: what ``OptimizeeModule`` builds: a registry name or the imported class.
        kwargs: keyword arguments the entry itself implies (``meta_weights``).
    """

    key: str
    optimizer: str | Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _deprecated_pin(entry: str) -> str:
    """``name:mup`` / ``name:sp`` (the coord check's former grammar) → ``name@mup`` / ``name@sp``."""
    body, sep, pinned = entry.strip().rpartition(":")
    if not sep or pinned not in PARAMS or "@" in entry:
        return entry
    new = f"{body}@{pinned}"
    warnings.warn(f"--optimizers: {entry!r} is deprecated; write {new!r} (the grammar of every command)", FutureWarning, stacklevel=2)
    return new


def _parse(entry: str) -> tuple[OptimizerSpec, bool]:
    """The parsed entry and whether it pins its parametrization."""
    text = _deprecated_pin(entry)
    try:
        spec = parse_optimizer(text)
    except ValueError as err:
        raise ValueError(f"--optimizers: {err}") from err
    if spec.schedule is not None:
        raise ValueError(f"--optimizers: {entry!r}: the coordinate check runs optimizers without a schedule")
    return spec, "@" in text


def _key(spec: OptimizerSpec) -> str:
    return spec.factory if spec.meta_weights is None else f"{spec.factory}:{spec.meta_weights}"


def optimizer_key(entry: str) -> str:
    """The key of ``entry`` (see :class:`SweepOptimizer`): ``"AdamW@sp"`` → ``"adamw"``."""
    return _key(_parse(entry)[0])


def parse_runs(
    optimizers: Sequence[str], param: str | Sequence[str]
) -> tuple[list[tuple[str, str]], dict[str, SweepOptimizer]]:
    """(key, parametrization) pairs in order, and each key's optimizer; all checked before any
    training (an unknown name or a bad import path raises ``ValueError`` naming ``--optimizers``)."""
    params = list(PARAMS) if param == "both" else [param] if isinstance(param, str) else list(param)
    bad = [p for p in params if p not in PARAMS]
    if bad or not params:
        raise ValueError(f"--param: expected mup, sp or both, got {param!r}")
    if not optimizers:
        raise ValueError(f"--optimizers: empty list; known optimizers: {', '.join(optim.available())}")
    runs: list[tuple[str, str]] = []
    built: dict[str, SweepOptimizer] = {}
    for entry in optimizers:
        spec, pinned = _parse(entry)
        key = _key(spec)
        factory = spec.factory if ":" not in spec.factory else spec.resolve()
        kwargs = {} if spec.meta_weights is None else {"meta_weights": spec.meta_weights}
        built[key] = SweepOptimizer(key, factory, kwargs)
        for p in [spec.param] if pinned else params:
            if (key, p) not in runs:
                runs.append((key, p))
    return runs, built
