"""The meta-weight modules θ of the learned optimizers.

Each module's ``state_dict()`` is exactly θ, the argument ``theta`` of the pure step functions in
:mod:`lightning_lopt.optim.functional`, and the thing PES perturbs. The modules hold no optimizer
state; they only bundle θ, its meta-initialisation and the static configuration of the step.

- :class:`SmallFCLOpt`: small_fc_lopt / μLO, 2409 meta-parameters
  (docs/reference/small_fc.md#meta-parameters-and-decays).
- :class:`CeloLOpt`: Celo, 35,808 meta-parameters (docs/reference/celo.md#meta-parameters, without dead weights).
- :class:`VeLOLOpt`: VeLO (``VeLOLOpt()``) and μVeLO (``VeLOLOpt.mu()``) (docs/reference/velo.md).

Meta-initialisation follows Haiku: weights truncated-normal at ±2σ with σ = 1/sqrt(fan_in) and no
variance correction (``trunc_normal_`` with absolute bounds ±2σ,
docs/reference/small_fc.md#meta-initialisation), biases 0,
decay offsets φ = 0, learned LSTM initial states 0.

Example::

    lopt = SmallFCLOpt(step_mult=0.01)                 # μLO; SP LO uses step_mult=0.001
    state = lopt.init_state(params)
    params, state = lopt.step(params, grads, state, StepContext(scales, None, 1000))

    # For vmap over particles: the pure step and θ as a dict
    theta = dict(lopt.state_dict())
    new_params, state = lopt.pure_step(theta, params, grads, state, ctx)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_lopt.optim.functional import StepContext, celo, small_fc, velo
from lightning_lopt.optim.functional.accumulators import LAYOUTS
from lightning_lopt.initializers import haiku_trunc_normal_
from lightning_lopt.optim.pretrained import PretrainedMixin, load_checked


def _reset_linear(layer: nn.Linear, generator: torch.Generator | None) -> None:
    haiku_trunc_normal_(layer.weight, 1.0 / math.sqrt(layer.in_features), generator)
    nn.init.zeros_(layer.bias)


class LearnedOptimizerModule(PretrainedMixin, nn.Module):
    """Shared plumbing: θ as a dict, the bound pure step, ``init_state`` and the parameter count."""

    functional: ModuleType

    def __init__(self, layout: str) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keywords (JSON-serialisable), stored in the weight card."""
        raise NotImplementedError

    @property
    def step_config(self) -> dict[str, Any]:
        """The static keywords of ``functional.step`` for this configuration."""
        raise NotImplementedError

    def theta(self) -> dict[str, Tensor]:
        """θ as live parameters (same keys as ``state_dict()``; gradients flow to the module)."""
        return dict(self.named_parameters())

    @property
    def pure_step(self) -> Callable[..., tuple[list[Tensor], dict[str, Any]]]:
        """``step(theta, params, grads, state, ctx)`` with this module's static config bound."""
        return functools.partial(self.functional.step, **self.step_config)

    def init_state(self, params: Sequence[Tensor]) -> dict[str, Any]:
        """A fresh optimizer state for ``params`` (see the functional module for its contents)."""
        with torch.no_grad():
            return self.functional.init_state(self.theta(), params, layout=self.layout)

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: dict[str, Any],
        ctx: StepContext,
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """One update with the current θ; returns ``(new_params, new_state)``."""
        return self.pure_step(self.theta(), params, grads, state, ctx)

    def num_meta_params(self) -> int:
        """The number of meta-parameters in θ."""
        return sum(p.numel() for p in self.parameters())


class SmallFCLOpt(LearnedOptimizerModule):
    """small_fc_lopt / μLO: a 39→32→32→2 MLP plus 7 meta-learned decay offsets (2409 in θ).

    Args:
        step_mult: λ1; 0.01 for μLO (the default), 0.001 for SP LO (docs/reference/small_fc.md#hyper-parameters).
        exp_mult: λ2 = 1e-3.
        hidden_size: MLP width (32 in every μLO run).
        layout: ``"torch"`` (PyTorch ``[out, in]`` / ``OIHW`` tensors) or ``"jax"``; see
            :mod:`lightning_lopt.optim.functional.accumulators`.
        generator: RNG for the meta-initialisation.
    """

    architecture = "small_fc_lopt"
    functional = small_fc

    def __init__(
        self,
        *,
        step_mult: float = 0.01,
        exp_mult: float = 1e-3,
        hidden_size: int = 32,
        layout: str = "torch",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(layout)
        self.step_mult, self.exp_mult, self.hidden_size = step_mult, exp_mult, hidden_size
        sizes = [small_fc.NUM_FEATURES, hidden_size, hidden_size, 2]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.momentum_decays = nn.Parameter(torch.zeros(len(small_fc.MOMENTUM_DECAYS)))
        self.rms_decays = nn.Parameter(torch.zeros(len(small_fc.RMS_DECAYS)))
        self.adafactor_decays = nn.Parameter(torch.zeros(len(small_fc.ADAFACTOR_DECAYS)))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random meta-initialisation (docs/reference/small_fc.md#meta-parameters-and-decays): φ = 0, MLP as Haiku."""
        with torch.no_grad():
            for layer in self.mlp:
                _reset_linear(layer, generator)
            for offsets in (self.momentum_decays, self.rms_decays, self.adafactor_decays):
                offsets.zero_()

    @property
    def config(self) -> dict[str, Any]:
        return {
            "step_mult": self.step_mult,
            "exp_mult": self.exp_mult,
            "hidden_size": self.hidden_size,
            "layout": self.layout,
        }

    @property
    def step_config(self) -> dict[str, Any]:
        return {"step_mult": self.step_mult, "exp_mult": self.exp_mult, "layout": self.layout}


class SchedulerLSTM(nn.Module):
    """θ of the mixed-input Haiku LSTM (:mod:`lightning_lopt.optim.functional.scheduler`)."""

    def __init__(self, n_inputs: int, hidden_size: int, n_controls: int | None = None) -> None:
        super().__init__()
        self.mix = nn.Linear(n_inputs, hidden_size)
        self.direct = nn.Linear(n_inputs, hidden_size)
        self.lstm = nn.Linear(2 * hidden_size, 4 * hidden_size)  # gates i, g, f, o (Haiku order)
        self.step_size = nn.Linear(hidden_size, 1)
        self.controls = nn.Linear(hidden_size, n_controls) if n_controls else None
        self.init_hidden = nn.Parameter(torch.zeros(hidden_size))
        self.init_cell = nn.Parameter(torch.zeros(hidden_size))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for layer in (self.mix, self.direct, self.lstm, self.step_size, self.controls):
                if layer is not None:
                    _reset_linear(layer, generator)
            self.init_hidden.zero_()
            self.init_cell.zero_()


class CeloLOpt(LearnedOptimizerModule):
    """Celo: the 30→4→4→3 per-parameter MLP and the 18-input LSTM scheduler (docs/reference/celo.md).

    Args:
        lstm_hidden_size: 64 in the released Celo.
        train_phase: 2 (η = 0.1·exp(o) scales the step) or 1 (meta-training stage 1: no scheduler
            multiplier).
        layout: as for :class:`SmallFCLOpt`.
        generator: RNG for the meta-initialisation.
    """

    architecture = "celo"
    functional = celo

    def __init__(
        self,
        *,
        lstm_hidden_size: int = 64,
        train_phase: int = 2,
        layout: str = "torch",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(layout)
        if train_phase not in (1, 2):
            raise ValueError(f"train_phase must be 1 or 2, got {train_phase}")
        self.lstm_hidden_size, self.train_phase = lstm_hidden_size, train_phase
        sizes = [celo.NUM_INPUTS, 4, 4, 3]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.scheduler = SchedulerLSTM(celo.NUM_SCHEDULER_INPUTS, lstm_hidden_size)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random meta-initialisation (docs/reference/celo.md#meta-initialisation)."""
        with torch.no_grad():
            for layer in self.mlp:
                _reset_linear(layer, generator)
        self.scheduler.reset_parameters(generator)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "lstm_hidden_size": self.lstm_hidden_size,
            "train_phase": self.train_phase,
            "layout": self.layout,
        }

    @property
    def step_config(self) -> dict[str, Any]:
        return {"train_phase": self.train_phase, "layout": self.layout}

    @classmethod
    def from_haiku(cls, params: Mapping[str, Any], **config: Any) -> CeloLOpt:
        """Build from the reference's θ (Haiku names joined by ``/``, e.g. ``rnn_params/rnn/linear/w``).

        Decode the released ``theta.state`` with ``flax.serialization.msgpack_restore``, flatten
        the nested dicts with ``/`` and pass the result. Haiku weights are ``[in, out]`` and are
        transposed. The dead ``rnn_params/linear`` and the constant ``rnn_to_controls`` (its
        softmax over one logit is 1) are dropped (docs/reference/celo.md#learned-scheduler,
        docs/reference/celo.md#meta-parameters).
        """

        def get(name: str) -> np.ndarray:
            if name not in params:
                raise KeyError(f"Celo θ has no {name!r} (keys: {sorted(params)[:8]} ...)")
            return np.asarray(params[name], dtype=np.float32)

        ff = "ff_mod_stack/~/"
        blocks = sorted(
            (k for k in params if k.startswith(ff + "w0__")), key=lambda k: int(k.rsplit("__", 1)[1])
        )
        w0 = np.concatenate([get(k)[0] for k in blocks], axis=0)
        rnn = "rnn_params/"
        mapping = {
            "mlp.0.weight": w0.T,
            "mlp.0.bias": get(ff + "b0")[0],
            "mlp.1.weight": get(ff + "w1")[0].T,
            "mlp.1.bias": get(ff + "b1")[0],
            "mlp.2.weight": get(ff + "w2")[0].T,
            "mlp.2.bias": get(ff + "b2")[0],
            "scheduler.mix.weight": get(rnn + "linear_1/w").T,
            "scheduler.mix.bias": get(rnn + "linear_1/b"),
            "scheduler.direct.weight": get(rnn + "linear_2/w").T,
            "scheduler.direct.bias": get(rnn + "linear_2/b"),
            "scheduler.lstm.weight": get(rnn + "rnn/linear/w").T,
            "scheduler.lstm.bias": get(rnn + "rnn/linear/b"),
            "scheduler.step_size.weight": get(rnn + "step_size/w").T,
            "scheduler.step_size.bias": get(rnn + "step_size/b"),
            "scheduler.init_hidden": get("lstm_init_state/hidden")[0],
            "scheduler.init_cell": get("lstm_init_state/cell")[0],
        }
        config.setdefault("lstm_hidden_size", mapping["scheduler.init_hidden"].shape[0])
        module = cls(**config)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in mapping.items()}
        load_checked(module, tensors, "haiku θ")
        return module


class LinearBank(nn.Module):
    """K stacked Linear layers: ``weight [K, out, in]``, ``bias [K, out]`` (VeLO's MLP bank)."""

    def __init__(self, k: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(k, out_features))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            haiku_trunc_normal_(self.weight, 1.0 / math.sqrt(self.in_features), generator)
            self.bias.zero_()


class VeLOLOpt(LearnedOptimizerModule):
    """VeLO / μVeLO: a per-tensor LSTM whose controls mix a bank of K 30→4→4→3 MLPs (docs/reference/velo.md).

    Args:
        lstm_hidden_size: 512 for the released VeLO; 16 for μVeLO.
        param_inits: K, the bank size; 256 for VeLO, 8 for μVeLO.
        interp_mult: 100 for VeLO, 1 for μVeLO.
        param_scale_mult: multiply the step by the tensor's RMS (VeLO) or not (μVeLO).
        layout: as for :class:`SmallFCLOpt`.
        generator: RNG for the meta-initialisation.
    """

    architecture = "velo"
    functional = velo

    def __init__(
        self,
        *,
        lstm_hidden_size: int = 512,
        param_inits: int = 256,
        interp_mult: float = 100.0,
        param_scale_mult: bool = True,
        layout: str = "torch",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(layout)
        self.lstm_hidden_size, self.param_inits = lstm_hidden_size, param_inits
        self.interp_mult, self.param_scale_mult = interp_mult, param_scale_mult
        sizes = [velo.NUM_INPUTS, 4, 4, 3]
        self.bank = nn.ModuleList(LinearBank(param_inits, a, b) for a, b in zip(sizes, sizes[1:]))
        self.scheduler = SchedulerLSTM(velo.NUM_LSTM_INPUTS, lstm_hidden_size, param_inits)
        self.reset_parameters(generator)

    @classmethod
    def mu(cls, **overrides: Any) -> VeLOLOpt:
        """μVeLO's configuration (docs/reference/velo.md#muvelo): LSTM 16, K = 8, interp_mult 1, no param scale."""
        config: dict[str, Any] = {
            "lstm_hidden_size": 16,
            "param_inits": 8,
            "interp_mult": 1.0,
            "param_scale_mult": False,
        }
        return cls(**{**config, **overrides})

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random meta-initialisation: every bank MLP and LSTM Linear as Haiku, zero initial state."""
        for layer in self.bank:
            layer.reset_parameters(generator)
        self.scheduler.reset_parameters(generator)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "lstm_hidden_size": self.lstm_hidden_size,
            "param_inits": self.param_inits,
            "interp_mult": self.interp_mult,
            "param_scale_mult": self.param_scale_mult,
            "layout": self.layout,
        }

    @property
    def step_config(self) -> dict[str, Any]:
        return {
            "interp_mult": self.interp_mult,
            "param_scale_mult": self.param_scale_mult,
            "layout": self.layout,
        }
