"""What the three optimizees share: μLO's readout, the μP set-up with mup, init and argument checks.

Every model here is an ordinary ``nn.Module`` whose ``forward`` never reads mup's ``infshape``. The
μP information is computed once at construction and kept as plain Python floats (the readout
multiplier, the attention scale, :meth:`MuModel.update_scales`), so ``copy.deepcopy``,
``load_state_dict`` into a fresh model, ``torch.func.functional_call`` and ``vmap`` over stacked
parameters all behave like the original model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mup
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lopt.models.scales import attach_readout_bases, attach_update_scales, mup_update_scales

from lightning_lopt.checks import check_positive_int
from lightning_lopt.initializers import haiku_trunc_normal_ as trunc_normal_

PARAMS = ("mup", "sp")


class MuLOReadout(mup.MuReadout):
    """μLO's readout layer: ``y = (x Wᵀ + b) · output_mult / width_mult``.

    It differs from ``mup.MuReadout`` in two ways, both taken from μLO's code
    (docs/reference/mup.md#parametrisation-and-update-scales):

    - μLO multiplies the layer's *whole output*, bias included, by the multiplier; mup multiplies
      the input, so mup's bias is not scaled.
    - The weight starts at zero and the bias at N(0, 1).

    ``width_mult`` is read from ``weight.infshape`` once and cached as a Python float, because
    ``copy.deepcopy``, ``state_dict`` round trips, ``functional_call`` and ``vmap`` hand the layer
    tensors without ``infshape`` (mup's own readout then fails its assertion). The library's models
    set base widths to 1, so ``width_mult`` is the absolute fan-in, as in μLO.

    Example (in a user model; call ``width_mult()`` once right after ``mup.set_base_shapes``)::

        self.readout = MuLOReadout(width, num_classes)
        ...
        mup.set_base_shapes(model, base, delta=delta, rescale_params=False)
        model.readout.width_mult()
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        output_mult: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=True, output_mult=output_mult, device=device, dtype=dtype)
        self._width_mult: float | None = None

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.normal_(self.bias, mean=0.0, std=1.0)

    def width_mult(self) -> float:
        # A plain float, read from infshape once: deepcopy, state_dict, functional_call and vmap all
        # lose the tensor attribute, but keep (or never touch) this module attribute.
        if self._width_mult is None:
            self._width_mult = float(super().width_mult())
        return self._width_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * (self.output_mult / self.width_mult())


class MuModel(nn.Module):
    """Base class of the library's optimizees: μP set-up and :meth:`update_scales`.

    Subclasses build their layers, initialise them, then call :meth:`_finish_init` with a factory of
    shape twins (the same architecture at another width, standard parametrization).
    """

    param: str
    _update_scales: dict[str, float]
    _infshapes: dict[str, Any] | None

    def _finish_init(self, twin: Callable[[int], nn.Module], width: int) -> None:
        """Set mup base shapes (μP), then compute and attach the update scales."""
        if self.param == "mup":
            # mup tells width dimensions from finite ones by comparing a base and a delta model that
            # differ in every width. They are built here, on the meta device (no memory), so users
            # never write them. Their base sizes are irrelevant (overwritten below); taking this
            # model's width and twice it keeps every derived size (heads, mlp_dim) valid.
            with torch.device("meta"):
                base, delta = twin(width), twin(2 * width)
            shapes = mup.make_base_shapes(base, delta)
            # μLO scales by absolute widths (1/fan_in), with no base model: a base dimension of 1 on
            # every width dimension gives exactly that (PyLO's mup fork adds `override_base_dim=1`
            # for the same purpose). mup's own MuAdam then equals μLO's μAdam on these models.
            for infshape in shapes.values():
                for dim in infshape:
                    if dim.isinf():
                        dim.base_dim = 1
            # rescale_params=False: our init is already μLO's; mup's rescaling assumes torch defaults.
            mup.set_base_shapes(self, shapes, rescale_params=False)
            self._infshapes = mup.get_infshapes(self)
            for module in self.modules():
                if isinstance(module, MuLOReadout):
                    module.width_mult()  # cache the float while infshape is still attached
            self._update_scales = mup_update_scales(self)
            attach_readout_bases(self)
        else:
            self._infshapes = None
            self._update_scales = {name: 1.0 for name, _ in self.named_parameters()}
        attach_update_scales(self, self._update_scales)

    def update_scales(self) -> dict[str, float]:
        """Per-tensor update scales keyed by ``named_parameters()`` names.

        μP: ``1 / fan_in`` for hidden matrices, ``1.0`` for everything else. SP: all ``1.0``.
        """
        return dict(self._update_scales)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # copy.deepcopy rebuilds every Parameter without its attributes (Parameter.__deepcopy__
        # clones only the data), which would drop p.lopt_update_scale and p.infshape. deepcopy calls
        # __setstate__ on the new module, so re-attach both here.
        if self._infshapes is not None:
            mup.apply_infshapes(self, self._infshapes)
            attach_readout_bases(self)
        attach_update_scales(self, self._update_scales)


def init_mup_linear(layer: nn.Linear, std: float, truncated: bool = True) -> None:
    """μLO's hidden/input layer init: weight N(0, std²) (truncated at ±2σ or not), bias N(0, 1)."""
    if truncated:
        trunc_normal_(layer.weight, std)
    else:
        nn.init.normal_(layer.weight, mean=0.0, std=std)
    nn.init.normal_(layer.bias, mean=0.0, std=1.0)


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float if it is positive and finite, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_output_mult(output_mult: Any, param: str) -> float:
    """A valid readout multiplier; SP has no multipliers, so only 1.0 is accepted there."""
    value = check_positive_float("output_mult", output_mult)
    if param == "sp" and value != 1.0:
        raise ValueError(f"output_mult applies to param='mup' only (SP has no multipliers), got {output_mult!r}")
    return value


def check_param(param: Any) -> str:
    """``param`` if it is a known parametrization (``"mup"`` or ``"sp"``)."""
    if param not in PARAMS:
        raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
    return param


def check_heads(width: int, heads: int) -> int:
    """``heads`` if it is positive and divides ``width``, else a ``ValueError`` naming both."""
    check_positive_int("heads", heads)
    if width % heads:
        raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
    return heads
