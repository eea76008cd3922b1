"""Per-tensor μP update scales as plain data (docs/reference/design.md#contract-2-mup-information-is-data).

A learned optimizer multiplies each tensor's update by a scale ``s_p``: ``1 / fan_in`` for hidden
matrices (mup's ``infshape.ninf() == 2``) and ``1.0`` for everything else (input weights, biases,
embeddings, LayerNorm, readout). This is μLO's rule
(docs/reference/mup.md#parametrisation-and-update-scales): ``fan_in`` is the *absolute*
input width of the weight, not a ratio to a base width, because μLO was meta-trained that way. mup's
``infshape`` is used only to tell which dimensions are widths; the user's base widths do not matter.

mup stores its shapes as a plain attribute on each ``nn.Parameter``, which ``copy.deepcopy``,
``state_dict()``, ``functional_call``/``vmap`` and ``ddp_spawn`` drop. The helpers here therefore turn
shapes into floats once and keep them either in a dict keyed like ``named_parameters()`` or as the
float attribute ``p.lopt_update_scale``, which survives everything a flat parameter iterable goes
through (LightningCLI's ``--optimizer`` hands the optimizer nothing but the tensors).

Base-width-relative scales (``MuCelo2``'s ``base_width``) also need to know which tensors are a μP
readout, which a parameter's ``infshape`` cannot say (a readout ``[classes, width]`` and an embedding
``[tokens, width]`` look alike): :func:`attach_readout_bases` marks them by module type, and
:func:`relative_update_scale` turns an absolute scale into a relative one.

Example with a user model built with mup::

    import mup
    model, base, delta = Net(width=256), Net(width=8), Net(width=16)
    mup.set_base_shapes(model, base, delta=delta)
    scales = mup_update_scales(model)        # {"fc2.weight": 1/256, "fc1.weight": 1.0, ...}
    attach_update_scales(model)              # p.lopt_update_scale for every parameter
    param_update_scale(model.fc2.weight)     # 0.00390625
"""

from __future__ import annotations

from collections.abc import Mapping

import mup
import torch
from torch import nn

SCALE_ATTR = "lopt_update_scale"

_SHAPES_FIX = (
    "call mup.set_base_shapes(model, base, delta=delta) first, where base and delta are copies of the "
    "model that differ in every width dimension (they can be built on device='meta')"
)


def _scale_from_infshape(p: torch.Tensor, label: str) -> float:
    """μLO's scale of one parameter that carries mup's ``infshape``; ``label`` names it in errors."""
    infshape = p.infshape  # type: ignore[attr-defined]
    ninf = infshape.ninf()
    if ninf > 2:
        raise ValueError(
            f"parameter {label} has {ninf} width dimensions; μP (and mup) define update scales for at "
            "most 2. Fix its base/delta shapes so that only fan-in and fan-out scale."
        )
    if ninf < 2:
        return 1.0
    # mup's `main` is the last width dimension, i.e. fan_in for nn.Linear's [out, in] layout (and
    # in_channels for a conv kernel; the finite kernel area does not count, as in mup's MuAdam).
    # The tensor's own size is used rather than `InfDim.dim`, which is None in shapes loaded from a
    # .bsh file and applied with mup.apply_infshapes.
    return 1.0 / p.shape[infshape.main_idx]


def mup_update_scales(model: nn.Module) -> dict[str, float]:
    """Derive μLO update scales from mup's ``infshape`` on every parameter of ``model``.

    Hidden matrices get ``1 / fan_in`` (absolute), everything else ``1.0``. Raises ``ValueError``
    naming the first parameter without ``infshape`` and how to fix it.

    Example::

        mup.set_base_shapes(model, base, delta=delta)
        mup_update_scales(model)["blocks.0.fc1.weight"]   # 1 / fan_in
    """
    scales: dict[str, float] = {}
    for name, p in model.named_parameters():
        if not hasattr(p, "infshape"):
            raise ValueError(f"parameter {name!r} has no mup shape information (p.infshape): {_SHAPES_FIX}.")
        scales[name] = _scale_from_infshape(p, repr(name))
    return scales


def update_scales_of(model: nn.Module) -> dict[str, float]:
    """The update scales of any model, keyed by ``named_parameters()`` names.

    Uses ``model.update_scales()`` when the model defines it (all ``lightning_lopt.models`` do).
    Otherwise each parameter's scale comes from :func:`param_update_scale`: an attached
    ``p.lopt_update_scale``, else mup's ``infshape``. This also covers a LightningModule wrapping one
    of our models, whose own names carry a prefix. Raises ``ValueError`` naming a parameter that has
    neither.

    Example::

        update_scales_of(MuMLP(64, 128, 3, 10))        # {"hidden_layers.0.weight": 1/128, ...}
        update_scales_of(user_model_after_set_base_shapes)
    """
    own = getattr(model, "update_scales", None)
    if callable(own):
        return {name: float(s) for name, s in own().items()}
    scales: dict[str, float] = {}
    for name, p in model.named_parameters():
        attached = getattr(p, SCALE_ATTR, None)
        if attached is not None:
            scales[name] = float(attached)
        elif hasattr(p, "infshape"):
            scales[name] = _scale_from_infshape(p, repr(name))
        else:
            raise ValueError(
                f"parameter {name!r} has no μP update scale (no p.{SCALE_ATTR}, no p.infshape): "
                f"{_SHAPES_FIX}, or call lightning_lopt.models.attach_update_scales(model, scales)."
            )
    return scales


def attach_update_scales(model: nn.Module, scales: Mapping[str, float] | None = None) -> nn.Module:
    """Store each parameter's scale as the plain float attribute ``p.lopt_update_scale``.

    ``scales`` defaults to :func:`update_scales_of` ``(model)``. It must name every parameter of the
    model and nothing else; otherwise ``ValueError``. Returns ``model`` for chaining.

    Example::

        attach_update_scales(mup.set_base_shapes(model, base, delta=delta))
        opt = lightning_lopt.MuAdam(model.parameters(), lr=1e-2)   # finds the scales on the tensors
    """
    table = update_scales_of(model) if scales is None else dict(scales)
    params = dict(model.named_parameters())
    missing = [name for name in params if name not in table]
    if missing:
        raise ValueError(f"scales: no update scale for parameter {missing[0]!r} ({len(missing)} missing)")
    unknown = [name for name in table if name not in params]
    if unknown:
        raise ValueError(f"scales: {unknown[0]!r} is not a parameter name of {type(model).__name__}")
    for name, p in params.items():
        setattr(p, SCALE_ATTR, float(table[name]))
    return model


def param_update_scale(p: torch.Tensor) -> float | None:
    """The update scale of one tensor: ``p.lopt_update_scale``, else derived from ``p.infshape``, else None.

    Example::

        [param_update_scale(p) for p in MuMLP(64, 128, 3, 10).parameters()]
    """
    attached = getattr(p, SCALE_ATTR, None)
    if attached is not None:
        return float(attached)
    if hasattr(p, "infshape"):
        return _scale_from_infshape(p, f"of shape {list(p.shape)}")
    return None


# -- base-width-relative scales (MuCelo2's `base_width`) -------------------------------------------

READOUT_BASE_ATTR = "lopt_readout_base"


def attach_readout_bases(model: nn.Module) -> dict[str, float]:
    """Mark every μP readout tensor with the readout's base fan-in (``p.lopt_readout_base``).

    A μP readout multiplies its output by ``1 / width_mult`` = ``base fan-in / fan-in``; a
    base-width-relative update scale needs that base (:func:`relative_update_scale`). Marked: the
    weight and bias of a :class:`~lightning_lopt.models.base.MuLOReadout` (it multiplies its whole
    output), and the weight of a ``mup.MuReadout`` (mup multiplies the input, so its bias is not
    scaled). Readouts are found by module type because a parameter's ``infshape`` cannot tell a
    readout ``[classes, width]`` from an embedding ``[tokens, width]``. The float attribute survives
    what ``p.lopt_update_scale`` survives. The library's models call this themselves; call it on a
    user mup model after ``mup.set_base_shapes``. Returns ``{name: base}``.

    Example::

        attach_readout_bases(model)    # {"readout.weight": 1.0, "readout.bias": 1.0}
    """
    from lightning_lopt.models.base import MuLOReadout  # base imports this module

    table: dict[str, float] = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, mup.MuReadout):
            continue
        base = float(module.in_features / module.width_mult())
        names = ("weight", "bias") if isinstance(module, MuLOReadout) else ("weight",)
        for name in names:
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter):
                setattr(p, READOUT_BASE_ATTR, base)
                table[f"{prefix}.{name}" if prefix else name] = base
    return table


def readout_base(p: torch.Tensor) -> float | None:
    """The base fan-in of a μP readout tensor marked by :func:`attach_readout_bases`, else None."""
    attached = getattr(p, READOUT_BASE_ATTR, None)
    return None if attached is None else float(attached)


def is_hidden_matrix(p: torch.Tensor, absolute: float) -> bool:
    """Whether ``p``, whose *absolute* μLO scale is ``absolute``, is a hidden matrix: scale below 1
    (``1 / fan_in``, two width dimensions), rank ≥ 2 and not a marked readout. The relative scale
    cannot tell (it is 1 at ``fan_in == base_width``). MuCelo2's spectral steps apply to these.

    Example::

        is_hidden_matrix(model.hidden_layers[0].weight, 1 / 128)   # True
    """
    return absolute < 1.0 and p.dim() >= 2 and readout_base(p) is None


def relative_update_scale(absolute: float, readout_base_fan_in: float | None, base_width: float) -> float:
    """μLO's absolute update scale made relative to ``base_width`` (MuCelo2's ``base_width``).

    Hidden matrices (absolute ``1 / fan_in``) get ``base_width / fan_in``; a readout tensor gets
    ``base_width / base fan-in``, so that its output (multiplied by ``base fan-in / fan-in`` in the
    forward) moves as a standard-parametrization readout's does at width ``base_width``; every
    other tensor keeps its absolute scale (1). At ``fan_in == base_width`` every layer then moves by
    what the standard parametrization gives at that width (docs/celo2.md, "MuCelo2").

    Example::

        relative_update_scale(1 / 512, None, 128)   # 0.25: a 512-wide hidden matrix
        relative_update_scale(1.0, 1.0, 128)        # 128.0: a μLO readout (base fan-in 1)
        relative_update_scale(1.0, None, 128)       # 1.0: input layer, biases, norms
    """
    if readout_base_fan_in is not None:
        return base_width / readout_base_fan_in
    return base_width * absolute if absolute < 1.0 else absolute
