"""A one-time warning for tensors a learned optimizer cannot move and gradients that are rounding noise.

Two ways a learned optimizer silently does nothing useful (or something hardware-dependent):

- **a tensor it cannot move**: Celo and VeLO multiply each tensor's step by the tensor's RMS (plus
  1e-9 under the square root), so a zero-initialised tensor (a μP readout) moves by ~1e-8 a step;
- **a gradient that is only rounding noise**: behind such a readout the other layers' gradients are
  products with ~1e-8 weights, a few float32 ulps of the loss; a rule that normalises each tensor's
  gradient (Celo's features, the second-moment normalisation of every learned optimizer here) turns
  that noise into full-size steps, so the run depends on the device and the dtype.

:func:`stuck_tensors` finds both from the parameters and gradients of one step (pure); a
:class:`StuckTensorCheck` looks at the first :data:`STEPS_CHECKED` steps of an optimizer and warns
once. Gradients that are exactly zero are not reported (at the first step of a μP model every layer
behind the zero readout has one, and an optimizer that moves the readout fixes that a step later).

Example::

    check = StuckTensorCheck("Celo")
    check(meta_weights_module, params, grads)   # in every step; warns at most once
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

#: The first steps are checked: the zero readout shows at step 1, the noise behind it at step 2.
STEPS_CHECKED = 2
#: A gradient whose RMS is at most this many float epsilons of the largest gradient RMS of the step
#: is at the level of the rounding error of the computation that produced the larger one.
NOISE_ULPS = 64


def stuck_tensors(
    names: Sequence[str], params: Sequence[Tensor], grads: Sequence[Tensor], *, moves_by_param_rms: bool
) -> tuple[list[str], list[str]]:
    """``(cannot_move, noise_gradients)``: the names of all-zero tensors (only for rules that scale
    the step by the tensor's RMS) and of tensors whose nonzero gradient is rounding noise."""
    grad_rms = [float(g.detach().float().pow(2).mean().sqrt()) if g.numel() else 0.0 for g in grads]
    largest = max(grad_rms, default=0.0)
    eps = max((torch.finfo(g.dtype).eps for g in grads if g.is_floating_point()), default=0.0)
    zero = [n for n, p in zip(names, params) if moves_by_param_rms and p.numel() and not bool(p.detach().any())]
    noise = [n for n, r in zip(names, grad_rms) if 0.0 < r <= NOISE_ULPS * eps * largest]
    return zero, noise


def moves_by_param_rms(module: torch.nn.Module) -> bool:
    """Whether a learned-optimizer module multiplies each tensor's step by the tensor's RMS."""
    from lightning_lopt.optim.architectures import CeloLOpt, VeLOLOpt

    return isinstance(module, CeloLOpt) or (isinstance(module, VeLOLOpt) and bool(module.param_scale_mult))


def tensor_names(params: Sequence[Tensor]) -> list[str]:
    """``parameter <index> <shape>``, in the order of the parameters that have gradients."""
    return [f"parameter {index} {list(p.shape)}" for index, p in enumerate(params)]


class StuckTensorCheck:
    """Checks the first :data:`STEPS_CHECKED` steps of an optimizer and warns once (``RuntimeWarning``)."""

    def __init__(self, optimizer_name: str) -> None:
        self.optimizer_name = optimizer_name
        self.steps_seen = 0

    def __call__(self, module: torch.nn.Module, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        # Meta tensors hold no values to look at (the step itself refuses them with a clear error).
        if self.steps_seen >= STEPS_CHECKED or any(t.is_meta for t in (*params, *grads)):
            return
        self.steps_seen += 1
        names = tensor_names(params)
        zero, noise = stuck_tensors(names, params, grads, moves_by_param_rms=moves_by_param_rms(module))
        if not zero and not noise:
            return
        self.steps_seen = STEPS_CHECKED  # once
        parts = []
        if zero:
            one = len(zero) == 1
            parts.append(
                f"{_listed(zero)} {'is' if one else 'are'} all zero, and {self.optimizer_name} scales each tensor's "
                f"step by its RMS, so {'it' if one else 'they'} cannot move; the gradients of the layers behind "
                f"{'it' if one else 'them'} then stay at rounding-noise level, which the per-tensor normalisation "
                "turns into full-size steps that depend on the device and dtype"
            )
        if noise:
            parts.append(
                f"the gradients of {_listed(noise)} are rounding noise (below {NOISE_ULPS} float epsilons of the "
                "largest), which the per-tensor normalisation turns into full-size steps that depend on the "
                "device and dtype"
            )
        advice = "Initialise such tensors away from zero (e.g. a standard-parametrised model, MuMLP(param='sp'))"
        if zero:  # only then can another learned optimizer help: MuLO and MuVeLO move a zero tensor
            advice += ", or use an optimizer without a parameter-scale multiplier (MuLO, MuVeLO) on μP models with a zero readout"
        else:
            advice = (
                "Usually a zero-initialised μP readout in front of them; it is harmless once the readout has "
                f"moved, but the first steps then differ between devices and dtypes. {advice}"
            )
        warnings.warn(
            f"{self.optimizer_name}: {'; '.join(parts)}. {advice}.",
            RuntimeWarning,
            stacklevel=5,  # the caller of optimizer.step (through torch's step wrappers)
        )


def _listed(names: Sequence[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
