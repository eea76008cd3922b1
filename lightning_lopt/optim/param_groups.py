"""Param groups by a tensor's role: hidden matrices, 1-D tensors, the rest.

The long-run settings measured in ``docs/results.md`` give some tensors settings of their own: the
hidden matrices (μP update scale below 1, i.e. ``1/fan_in``) a multiple of ``lr``, and the 1-D tensors
(LayerNorm gains, biases) a weight decay and learning-rate multiple of their own. The evaluation
builds every such run through :func:`param_groups_by_role`, so users get exactly what was measured.

Example::

    from lightning_lopt.optim import MuLO, param_groups_by_role
    groups = param_groups_by_role(model, lr=0.5, hidden_lr_mult=2.0)
    opt = MuLO(groups, lr=0.5, meta_weights="mulo-fmnist8-16x16-mix10k-v2", weight_decay=1e-3)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from lightning_lopt.models.base import check_positive_float
from lightning_lopt.models.scales import update_scales_of

#: The options of :func:`param_groups_by_role` besides the module, ``lr`` and ``scales``.
ROLE_OPTIONS: tuple[str, ...] = ("hidden_lr_mult", "vector_weight_decay", "vector_lr_mult")


def check_role_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` as a dict, after checking them as :func:`param_groups_by_role` would.

    Raises:
        ValueError: a key not in :data:`ROLE_OPTIONS`, a multiplier that is not a positive number, or a
            negative ``vector_weight_decay``.

    Example::

        check_role_options({"hidden_lr_mult": 2.0})   # {"hidden_lr_mult": 2.0}
    """
    unknown = sorted(set(options) - set(ROLE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown param-group options {unknown}; the options are {list(ROLE_OPTIONS)}")
    for key in ("hidden_lr_mult", "vector_lr_mult"):
        if key in options:
            check_positive_float(key, options[key])
    decay = options.get("vector_weight_decay")
    is_number = isinstance(decay, (int, float)) and not isinstance(decay, bool)
    if decay is not None and not (is_number and math.isfinite(decay) and decay >= 0):
        raise ValueError(f"vector_weight_decay must be a non-negative number, got {decay!r}")
    return dict(options)


def needs_lr(options: Mapping[str, Any]) -> bool:
    """Whether ``options`` multiply the learning rate, so :func:`param_groups_by_role` needs ``lr``."""
    return any(options.get(key, 1.0) != 1.0 for key in ("hidden_lr_mult", "vector_lr_mult"))


def param_groups_by_role(
    module: nn.Module,
    lr: float | None = None,
    *,
    hidden_lr_mult: float = 1.0,
    vector_weight_decay: float | None = None,
    vector_lr_mult: float = 1.0,
    scales: Mapping[str, float] | Callable[[], Mapping[str, float]] | None = None,
) -> list[Any]:
    """``module``'s named parameters, split into param groups where some tensors get settings of their own.

    Hidden matrices (update scale below 1) get ``lr * hidden_lr_mult``; 1-D tensors get
    ``vector_weight_decay`` when it is given and ``lr * vector_lr_mult``; every other tensor keeps the
    optimizer's own settings. A hidden matrix is never a 1-D tensor. With nothing to split, the plain
    ``named_parameters()`` list comes back. Pass the optimizer the same ``lr``: the multipliers are
    relative to it, and a learning-rate schedule scales every group alike.

    Args:
        module: the model (or a LightningModule holding it).
        lr: the optimizer's learning rate; needed when a multiplier is not 1.
        hidden_lr_mult: multiplier on the hidden matrices' learning rate.
        vector_weight_decay: weight decay of the 1-D tensors (``None``: the optimizer's).
        vector_lr_mult: multiplier on the 1-D tensors' learning rate.
        scales: update scales by parameter name, or a callable returning them; default
            ``model.update_scales()`` or mup's ``infshape`` (:func:`lightning_lopt.models.scales.update_scales_of`).
            Read (called) only when ``hidden_lr_mult`` is not 1.

    Raises:
        ValueError: a multiplier that is not a positive number, one without ``lr``, a negative
            ``vector_weight_decay``, or a model whose update scales are unknown.

    Example::

        param_groups_by_role(model, lr=0.5, vector_weight_decay=1e-2, vector_lr_mult=0.1)
        # [{"params": [the 1-D tensors], "weight_decay": 0.01, "lr": 0.05}, {"params": [the rest]}]
    """
    named = list(module.named_parameters())
    check_role_options(
        {"hidden_lr_mult": hidden_lr_mult, "vector_weight_decay": vector_weight_decay, "vector_lr_mult": vector_lr_mult}
    )
    vectors_apart = vector_weight_decay is not None or vector_lr_mult != 1.0
    if hidden_lr_mult == 1.0 and not vectors_apart:
        return named
    for key, mult in (("hidden_lr_mult", hidden_lr_mult), ("vector_lr_mult", vector_lr_mult)):
        if mult != 1.0 and lr is None:
            raise ValueError(f"{key} needs an explicit lr to multiply")
    is_hidden: Mapping[str, bool] = {}
    if hidden_lr_mult != 1.0:
        table = update_scales_of(module) if scales is None else scales() if callable(scales) else scales
        missing = [n for n, _ in named if n not in table]
        if missing:
            raise ValueError(f"scales name no update scale for {missing[:3]}; pass scales=model.update_scales()")
        is_hidden = {n: table[n] < 1.0 for n, _ in named}
    vector_options: dict[str, Any] = {} if vector_weight_decay is None else {"weight_decay": vector_weight_decay}
    if vector_lr_mult != 1.0:
        vector_options["lr"] = lr * vector_lr_mult
    options: dict[str, dict[str, Any]] = {
        "hidden": {"lr": lr * hidden_lr_mult} if hidden_lr_mult != 1.0 else {},
        "vectors": vector_options,
        "rest": {},
    }
    members: dict[str, list[tuple[str, nn.Parameter]]] = {kind: [] for kind in options}
    for n, p in named:
        kind = "hidden" if is_hidden.get(n, False) else "vectors" if vectors_apart and p.ndim <= 1 else "rest"
        members[kind].append((n, p))
    return [{"params": members[kind], **options[kind]} for kind in options if members[kind]]
