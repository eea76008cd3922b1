"""The meta-weight module θ of Celo2 / Celo2Base
(docs/reference/celo2.md#meta-parameters): a 30→8→8→3 ReLU MLP, 347 numbers.

Like the modules of :mod:`lightning_lopt.optim.architectures`, ``state_dict()`` is exactly θ, the
argument ``theta`` of :func:`lightning_lopt.optim.functional.celo2.step`; the module also holds the
static configuration of the step.

Meta-initialisation follows Haiku (docs/reference/celo2.md#meta-parameters): weights truncated-normal at ±2σ with
σ = 1/sqrt(fan_in) (fan_in = 30 for the whole first layer, 8 for the others), biases 0.

Example::

    lopt = Celo2LOpt()                                   # Celo2; Celo2LOpt(orthogonalize=False) is Celo2Base
    state = lopt.init_state(params)
    params, state = lopt.step(params, grads, state, StepContext([1e-3] * len(params), None, 0))

    lopt = Celo2LOpt.meta_training()                     # the Adam branch as the authors meta-trained it
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_lopt.optim.architectures import LearnedOptimizerModule, _reset_linear
from lightning_lopt.optim.functional import celo2, celo2_base
from lightning_lopt.optim.pretrained import load_checked


class Celo2LOpt(LearnedOptimizerModule):
    """Celo2's θ and step configuration.

    Args:
        orthogonalize: Newton–Schulz on matrix updates (Celo2) or not (Celo2Base).
        adam_1d: send rank ≤ 1 tensors to the Adam branch (Celo2) instead of the learned rule
            (Celo2Base). Embeddings are routed by the optimizer classes (by name).
        adam_mode: ``"adamw"`` (test time: bias-corrected, optax eps) or ``"meta_training"``
            (no bias correction, eps inside the sqrt), see :mod:`lightning_lopt.optim.functional.celo2`.
        adam_lr_mult: the Adam branch's multiplier of the learning rate; 1 at test time (the HF card),
            20 in the authors' meta-training.
        step_mult: a constant learning rate multiplying every step: 1 under the optimizer classes
            (their ``lr`` is the per-tensor scale), 1e-3 in meta-training (docs/reference/celo2.md#meta-training).
        layout: ``"torch"`` or ``"jax"`` tensors (see :mod:`lightning_lopt.optim.functional.accumulators`).
        generator: RNG for the meta-initialisation.
    """

    architecture = "celo2"

    def __init__(
        self,
        *,
        orthogonalize: bool = True,
        adam_1d: bool = True,
        adam_mode: str = "adamw",
        adam_lr_mult: float = 1.0,
        step_mult: float = 1.0,
        layout: str = "torch",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(layout)
        if adam_mode not in celo2.ADAM_MODES:
            raise ValueError(f"adam_mode must be one of {celo2.ADAM_MODES}, got {adam_mode!r}")
        self.orthogonalize, self.adam_1d = bool(orthogonalize), bool(adam_1d)
        self.adam_mode, self.adam_lr_mult = adam_mode, float(adam_lr_mult)
        self.step_mult = float(step_mult)
        sizes = [celo2.NUM_INPUTS, celo2.HIDDEN_SIZE, celo2.HIDDEN_SIZE, celo2.NUM_OUTPUTS]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.reset_parameters(generator)

    @property
    def functional(self) -> ModuleType:  # type: ignore[override]
        """The functional module: Celo2's, or Celo2Base's (whose fresh state routes nothing to Adam)."""
        return celo2 if self.adam_1d else celo2_base

    @classmethod
    def base(cls, **overrides: Any) -> Celo2LOpt:
        """Celo2Base: no orthogonalisation, the learned rule on every tensor."""
        return cls(**{"orthogonalize": False, "adam_1d": False, **overrides})

    @classmethod
    def meta_training(cls, **overrides: Any) -> Celo2LOpt:
        """Celo2 as the authors meta-trained it: inner lr 1e-3, Adam without bias correction at 20× lr."""
        config = {
            "adam_mode": "meta_training",
            "adam_lr_mult": celo2.META_TRAINING_ADAM_LR_MULT,
            "step_mult": celo2.META_TRAINING_STEP_MULT,
        }
        return cls(**{**config, **overrides})

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random meta-initialisation as Haiku (docs/reference/celo2.md#meta-parameters)."""
        with torch.no_grad():
            for layer in self.mlp:
                _reset_linear(layer, generator)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "orthogonalize": self.orthogonalize,
            "adam_1d": self.adam_1d,
            "adam_mode": self.adam_mode,
            "adam_lr_mult": self.adam_lr_mult,
            "step_mult": self.step_mult,
            "layout": self.layout,
        }

    @property
    def step_config(self) -> dict[str, Any]:
        return {
            "orthogonalize": self.orthogonalize,
            "adam_mode": self.adam_mode,
            "adam_lr_mult": self.adam_lr_mult,
            "step_mult": self.step_mult,
            "layout": self.layout,
        }

    def init_state(self, params: Sequence[Tensor], adam: Sequence[bool] | None = None) -> dict[str, Any]:
        """A fresh state; ``adam[i]`` routes tensor i to the Adam branch (default: rank ≤ 1 if ``adam_1d``)."""
        with torch.no_grad():
            return celo2.init_state(self.theta(), params, layout=self.layout, adam_1d=self.adam_1d, adam=adam)

    @classmethod
    def from_haiku(cls, params: Mapping[str, Any], **config: Any) -> Celo2LOpt:
        """Build from the authors' θ (``theta.state`` of amoudgl/celo2 or celo2-base).

        Decode it with ``flax.serialization.msgpack_restore``, flatten the nested dicts with ``/``
        and pass the result (keys ``ff_mod_stack/~/w0__0`` ... ``b2``). Haiku weights are
        ``[in, out]`` and are transposed; the 14 ``w0__k`` blocks are stacked in k order.
        """

        def get(name: str) -> np.ndarray:
            key = "ff_mod_stack/~/" + name
            if key not in params:
                raise KeyError(f"Celo2 θ has no {key!r} (keys: {sorted(params)[:8]} ...)")
            return np.asarray(params[key], dtype=np.float32)

        w0 = np.concatenate([get(f"w0__{k}") for k in range(len(celo2.GROUP_CHANNELS))], axis=0)
        mapping = {
            "mlp.0.weight": w0.T,
            "mlp.0.bias": get("b0"),
            "mlp.1.weight": get("w1").T,
            "mlp.1.bias": get("b1"),
            "mlp.2.weight": get("w2").T,
            "mlp.2.bias": get("b2"),
        }
        module = cls(**config)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in mapping.items()}
        load_checked(module, tensors, "haiku θ")
        return module
