"""Per-tensor μP update scales for optimizers built from parameter iterables.

Optimizers receive parameters in every form torch accepts: a flat iterable (what LightningCLI's
``--optimizer`` passes), ``named_parameters()`` pairs, or param-group dicts. :func:`scaled_param_groups`
turns any of them into param groups that each carry one ``update_scale``
(docs/reference/design.md#contract-2-mup-information-is-data: μP
information is plain data). A scale is looked up, in order, from

1. the group's own ``"update_scale"`` key,
2. the ``scales`` mapping (parameter name -> float), for named parameters,
3. the parameter itself: ``p.lopt_update_scale`` (set by our models) or mup's ``p.infshape``.

Example::

    groups = scaled_param_groups(model.named_parameters(), owner="MuAdam")
    [g["update_scale"] for g in groups]   # e.g. [1.0, 0.0078125] for an MLP of width 128
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lightning_lopt.models.scales import (
    is_hidden_matrix,
    param_update_scale,
    readout_base,
    relative_update_scale,
)

_FIX = (
    "Build the model with lightning_lopt.models, call mup.set_base_shapes(model, base, delta=...) on it, "
    "pass scales={name: float} (e.g. model.update_scales()), or pass allow_sp=True to treat every "
    "tensor with scale 1 (standard parametrization)."
)


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError("params: the optimizer got an empty parameter list")
    if isinstance(items[0], dict):
        return [dict(g) for g in items]
    return [{"params": items}]


def _unpack(group: dict[str, Any]) -> tuple[list[torch.Tensor], list[str | None]]:
    raw = group["params"]
    raw = [raw] if isinstance(raw, torch.Tensor) else list(raw)
    names = list(group.get("param_names", [None] * len(raw)))
    params: list[torch.Tensor] = []
    for i, item in enumerate(raw):
        if isinstance(item, tuple):  # (name, parameter) pairs from named_parameters()
            names[i], item = item
        params.append(item)
    return params, names


def scaled_param_groups(
    params: Iterable[Any],
    scales: Mapping[str, float] | None = None,
    *,
    allow_sp: bool = False,
    owner: str = "optimizer",
    base_width: float | None = None,
    mark_hidden: bool = False,
) -> list[dict[str, Any]]:
    """Split param groups so that every group has a single ``update_scale`` float.

    Group options other than ``params`` are kept. Raises ``ValueError`` naming the first parameter
    without μP information unless ``allow_sp`` is set. With ``base_width``, each absolute scale is
    made relative to it (:func:`~lightning_lopt.models.scales.relative_update_scale`: hidden
    matrices ``base_width / fan_in``, readout tensors ``base_width / base fan-in``, the rest
    unchanged). With ``mark_hidden``, groups are also split by whether their tensors are hidden
    matrices (:func:`~lightning_lopt.models.scales.is_hidden_matrix`) and carry
    ``"hidden_matrix": bool``, which the relative scale alone cannot tell (it is 1 at
    ``fan_in == base_width``). A group that a ``mark_hidden`` call already resolved (it has
    ``"hidden_matrix"``) is kept as it is: torch's ``Optimizer.__init__`` passes every group through
    ``add_param_group`` again, and a relative scale must not be made relative twice.
    """
    out: list[dict[str, Any]] = []
    index = 0
    for group in _as_groups(params):
        if mark_hidden and "hidden_matrix" in group and "update_scale" in group:
            out.append(group)
            continue
        tensors, names = _unpack(group)
        options = {k: v for k, v in group.items() if k not in ("params", "param_names", "update_scale")}
        by_scale: dict[tuple[float, bool], list[torch.Tensor]] = {}
        for p, name in zip(tensors, names):
            scale = group.get("update_scale")
            if scale is None and scales is not None and name is not None:
                scale = scales.get(name)
            if scale is None:
                scale = param_update_scale(p)
            if scale is None:
                if not allow_sp:
                    label = f"'{name}'" if name else f"#{index}"
                    raise ValueError(
                        f"{owner}: parameter {label} (shape {list(p.shape)}) has no μP update scale. {_FIX}"
                    )
                scale = 1.0
            hidden = mark_hidden and is_hidden_matrix(p, float(scale))
            if base_width is not None:
                scale = relative_update_scale(float(scale), readout_base(p), base_width)
            by_scale.setdefault((float(scale), hidden), []).append(p)
            index += 1
        # Names are used for error messages only; dropping them keeps optimizer state_dicts identical
        # whether the parameters came named (our Trainer helper) or flat (LightningCLI).
        for (scale, hidden), ps in by_scale.items():
            extra = {"hidden_matrix": hidden} if mark_hidden else {}
            out.append({**options, "params": ps, "update_scale": scale, **extra})
    return out
