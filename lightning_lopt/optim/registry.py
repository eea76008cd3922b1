"""Optimizer registry: ``build("mulo", params, **kw)``.

The learned optimizers are the classes in :data:`LEARNED` (each declares its own name); the
baselines are import paths resolved on first use. Names are case-insensitive.

Example::

    from lightning_lopt import optim
    opt = optim.build("muadam", model.named_parameters(), lr=1e-2)
    optim.available()   # ['adamw', 'celo', 'celo2', 'celo2-base', 'lo', 'muadam', 'mucelo2', 'mulo', ...]
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from lightning_lopt.optim.celo2 import Celo2, Celo2Base, MuCelo2
from lightning_lopt.optim.learned import LearnedOptimizer
from lightning_lopt.optim.optimizers import LO, Celo, MuLO, MuVeLO, VeLO

OptimizerFactory = Callable[..., torch.optim.Optimizer]


#: The learned optimizers, listed once; each class declares its name, θ factory, μP, loss and weights.
LEARNED: tuple[type[LearnedOptimizer], ...] = (LO, MuLO, Celo, VeLO, MuVeLO, Celo2, Celo2Base, MuCelo2)

_REGISTRY: dict[str, str | OptimizerFactory] = {
    "adamw": "torch.optim:AdamW",
    "sgd": "torch.optim:SGD",
    "muadam": "lightning_lopt.optim.baselines:MuAdam",
    **{cls.registry_name: cls for cls in LEARNED},
}

# torch's SGD has no usable default learning rate for our tasks; give the registry one.
_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {"sgd": {"lr": 0.1}}


def available() -> list[str]:
    """The registered optimizer names."""
    return sorted(_REGISTRY)


def register(name: str, factory: str | OptimizerFactory) -> None:
    """Register ``factory`` (a class, a callable or a ``"module:attr"`` path) under ``name``."""
    _REGISTRY[name.lower()] = factory


def resolve(name: str | OptimizerFactory) -> OptimizerFactory:
    """Return the optimizer class or factory for a registered name, an import path
    ``package.module:Class`` (or ``package.module.Class``), or pass a callable through."""
    if callable(name):
        return name
    if not isinstance(name, str):
        raise TypeError(f"optimizer must be a name or a callable, got {type(name).__name__}")
    entry = _REGISTRY.get(name.lower())
    if entry is None and ("." in name or ":" in name):
        entry = name
    if entry is None:
        raise ValueError(f"optimizer: unknown name {name!r}; known optimizers: {', '.join(available())}")
    if isinstance(entry, str):
        entry = import_path(entry)
        if not callable(entry):
            raise ValueError(f"optimizer {name!r}: {entry!r} is not a class or callable")
    return entry


def import_path(path: str) -> Any:
    """The object at ``"package.module:Name"`` or ``"package.module.Name"``; ``ValueError`` if it cannot be imported."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from err


def accepts(factory: OptimizerFactory, argument: str) -> bool:
    """Whether ``factory``'s signature has a parameter called ``argument``."""
    try:
        return argument in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and C callables have no inspectable signature
        return False


def _registry_defaults(name: str | OptimizerFactory) -> dict[str, Any]:
    """The keyword arguments the registry adds for ``name`` (none for a class or callable)."""
    return _DEFAULT_KWARGS.get(name.lower(), {}) if isinstance(name, str) else {}


def default_lr(name: str | OptimizerFactory) -> float | None:
    """The learning rate :func:`build` gives ``name`` when none is passed: the registry's default, else
    the ``lr`` default of its signature; ``None`` when it has none.

    Example::

        default_lr("sgd"), default_lr("mulo"), default_lr(torch.optim.AdamW)   # (0.1, 1.0, 0.001)
    """
    defaults = _registry_defaults(name)
    if "lr" in defaults:
        return float(defaults["lr"])
    factory = resolve(name)
    try:
        parameter = inspect.signature(factory).parameters.get("lr")
    except (TypeError, ValueError):  # builtins and C callables have no inspectable signature
        return None
    default = None if parameter is None else parameter.default
    return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def _call_scales(
    scales: Mapping[str, float] | Callable[[], Mapping[str, float]], *, allow_sp: bool
) -> Mapping[str, float] | None:
    """Evaluate a lazy scales table; with ``allow_sp`` a model without μP information gives ``None``."""
    if not callable(scales):
        return scales
    try:
        return scales()
    except ValueError:
        if allow_sp:
            return None
        raise


def build(
    name: str | OptimizerFactory,
    params: Iterable[Any],
    *,
    scales: Mapping[str, float] | Callable[[], Mapping[str, float]] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer by name (see :func:`available`) or from a class/callable.

    ``scales`` (parameter name -> μP update scale, e.g. ``model.update_scales``) is handed only to
    optimizers whose signature takes it, so one call site serves AdamW and MuLO alike. A callable is
    called only then, so models without μP information still train with AdamW.
    """
    factory = resolve(name)
    merged = {**_registry_defaults(name), **kwargs}
    if scales is not None and "scales" not in merged and accepts(factory, "scales"):
        merged["scales"] = _call_scales(scales, allow_sp=bool(merged.get("allow_sp")))
    return factory(params, **merged)
