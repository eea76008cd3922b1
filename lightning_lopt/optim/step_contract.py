"""What an in-place implementation of the learned-optimizer step receives and promises.

A leaf module, so that :mod:`lightning_lopt.optim.tensor_step` (the seam), the implementations it
registers (:mod:`lightning_lopt.optim.fast_steps`), the sharded step (:mod:`lightning_lopt.optim.sharding`)
and the optimizers (:mod:`lightning_lopt.optim.learned`) all depend on it and not on each other.

Example::

    from lightning_lopt.optim.step_contract import GLOBAL_STATE_KEY, StepOptions
    options = StepOptions("MuLO", fused=None)
    iteration = optimizer.state[GLOBAL_STATE_KEY]["iteration"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_lopt.optim.architectures import LearnedOptimizerModule
from lightning_lopt.optim.functional import StepContext

#: Key of the global (not per-tensor) state in ``optimizer.state``.
GLOBAL_STATE_KEY = "learned_optimizer"

State = dict[str, Any]


@dataclass(frozen=True)
class StepOptions:
    """What the optimizer asks of the step.

    Args:
        owner: the optimizer's class name, for error messages.
        fused: ``None`` (any implementation), ``False`` (no fused kernel), ``True`` (a fused kernel or an error).
        compute_dtype: the arithmetic of the pure step (float64 when every parameter is float64).
        state_dtype: storage of ``m`` and ``rms`` (``torch.float32`` or ``torch.bfloat16``).
        gpu_numerics: ``"fast"`` or ``"exact"`` (:mod:`lightning_lopt.optim.gpu`).
    """

    owner: str
    fused: bool | None = None
    compute_dtype: torch.dtype = torch.float32
    state_dtype: torch.dtype = torch.float32
    gpu_numerics: str = "fast"


class TensorStep(Protocol):
    """An implementation of the step (see the module docstring for the contract)."""

    #: Names it in errors and tests.
    name: str
    #: Whether it is a fused kernel: ``fused=False`` skips it, ``fused=True`` requires one.
    kernel: bool

    def supports(
        self, module: LearnedOptimizerModule, params: Sequence[Tensor], grads: Sequence[Tensor], options: StepOptions
    ) -> bool:
        """Whether it runs this step (device, dtypes, architecture, availability)."""
        ...

    def refusal(
        self, module: LearnedOptimizerModule, params: Sequence[Tensor], grads: Sequence[Tensor], options: StepOptions
    ) -> str | None:
        """Why ``fused=True`` cannot use it here, for the error (``None``: nothing to add)."""
        ...

    def step_in_place(
        self,
        module: LearnedOptimizerModule,
        params: list[Tensor],
        grads: list[Tensor],
        state: State,
        ctx: StepContext,
        weight_decays: Sequence[float],
        options: StepOptions,
    ) -> State:
        """One step: ``params`` written in place, the new state returned."""
        ...


__all__ = ["GLOBAL_STATE_KEY", "State", "StepOptions", "TensorStep"]
