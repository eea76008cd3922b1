"""The learned optimizers users pick: ``LO``, ``MuLO``, ``Celo``, ``VeLO``, ``MuVeLO``.

Each class declares what it is (architecture, packaged weights, μP or not, whether it needs the loss,
its registry name, how meta-training builds its θ) and forwards its own LightningCLI-visible
signature to :class:`~lightning_lopt.optim.learned.LearnedOptimizer`, which does the work.

============  ===========================  ================  ====================  ==============
class         rule                          μP update scales  needs the loss         needs num_steps
============  ===========================  ================  ====================  ==============
``LO``        small_fc_lopt, λ1 = 0.001     no (all 1)        no                    no
``MuLO``      small_fc_lopt, λ1 = 0.01      yes               no                    no
``Celo``      Celo (MLP + LSTM scheduler)   no (all 1)        yes                   yes
``VeLO``      VeLO                          no (all 1)        yes                   yes
``MuVeLO``    μVeLO                         yes               yes                   yes
============  ===========================  ================  ====================  ==============

Example::

    import lightning_lopt as llo
    opt = llo.MuLO(model.named_parameters(), scales=model.update_scales())  # or model.parameters()
    opt = llo.Celo(model.parameters(), num_steps=1000, meta_weights="runs/my-celo")
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)            # or opt.step(closure) with a closure returning the loss
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from lightning_lopt.optim.architectures import CeloLOpt, LearnedOptimizerModule, SmallFCLOpt, VeLOLOpt
from lightning_lopt.optim.learned import LearnedOptimizer, MetaWeights


class LO(LearnedOptimizer):
    """small_fc_lopt in standard parametrization (λ1 = 0.001): every tensor has scale 1.

    Example::

        opt = LO(model.parameters(), meta_weights="runs/my-lo")
    """

    module_class = SmallFCLOpt
    module_factory = functools.partial(SmallFCLOpt, step_mult=0.001)
    pretrained_names = ("lo-fmnist8-w32-128", "lo-fmnist8-w32-128-long4k")
    registry_name = "lo"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        *,
        meta_weights: MetaWeights = None,
        weight_decay: float = 0.0,
        fused: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            params, lr, meta_weights=meta_weights, weight_decay=weight_decay, fused=fused, state_dtype=state_dtype
        )


class MuLO(LearnedOptimizer):
    """μLO: small_fc_lopt (λ1 = 0.01) with per-tensor μP update scales (1/fan_in on hidden matrices).

    Scales come from each group's ``update_scale``, ``scales`` (named parameters), or the parameters
    (``p.lopt_update_scale``, set by ``lightning_lopt.models``; or mup's ``p.infshape``). Without any,
    the error names the first parameter and the fix, unless ``allow_sp=True``.

    By default it runs the packaged ``mulo-fmnist8-w32-128`` weights, meta-trained on episodes of at
    most 1000 steps: measured, they are good to about 2000 steps and diverge around 5000 on a
    Fashion-MNIST MLP (``docs/results.md``, "Horizon"). For longer runs load
    ``meta_weights="mulo-fmnist8-16x16-mix10k-v2"`` (episodes up to 10,000 steps) with weight decay 1e-3 and a
    warmup + cosine schedule (:class:`~lightning_lopt.optim.schedules.WarmupCosine`, or
    ``lightning_lopt.Trainer(lr_schedule="warmup-cosine")``, which also warns a long fit that lacks these):
    stable for 10,000 steps on that MLP and on a Transformer LM and for 25,000 on the MLP, but still
    behind a μAdam tuned for 10,000 steps (``docs/results.md``, sections 19 to 21).

    Example::

        opt = MuLO(model.parameters())                                  # lightning_lopt.models
        opt = MuLO(model.named_parameters(), scales=model.update_scales())
        long_run = MuLO(model.parameters(), meta_weights="mulo-fmnist8-16x16-mix10k-v2", weight_decay=1e-3)
        schedule = WarmupCosine(long_run, num_steps=10_000)             # step it after every step
    """

    module_class = SmallFCLOpt
    module_factory = functools.partial(SmallFCLOpt, step_mult=0.01)
    pretrained_names = ("mulo-fmnist8-w32-128", "mulo-fmnist8-w32-128-long4k")
    registry_name = "mulo"
    mu = True
    # docs/results.md sections 19-20: 10,000 steps on a Fashion-MNIST MLP and a Transformer LM, no divergence.
    long_run_settings = {"meta_weights": "mulo-fmnist8-16x16-mix10k-v2", "weight_decay": 1e-3}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        *,
        meta_weights: MetaWeights = None,
        weight_decay: float = 0.0,
        scales: Mapping[str, float] | None = None,
        allow_sp: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            params,
            lr,
            meta_weights=meta_weights,
            weight_decay=weight_decay,
            scales=scales,
            allow_sp=allow_sp,
            fused=fused,
            state_dtype=state_dtype,
        )


class _ScheduledLearnedOptimizer(LearnedOptimizer):
    """A learned optimizer whose scheduler reads the loss and the horizon (Celo, VeLO).

    Spelled out, rather than inherited as ``**kwargs``, so LightningCLI shows every argument.
    """

    needs_loss = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        *,
        num_steps: int | None = None,
        meta_weights: MetaWeights = None,
        weight_decay: float = 0.0,
        fused: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            params,
            lr,
            meta_weights=meta_weights,
            weight_decay=weight_decay,
            num_steps=num_steps,
            fused=fused,
            state_dtype=state_dtype,
        )


class Celo(_ScheduledLearnedOptimizer):
    """Celo: a per-parameter MLP rule scaled by a learned LSTM scheduler; needs the loss.

    ``num_steps`` (required) is the number of optimizer steps of the run: the scheduler reads the
    fraction of training done and loss averages whose half-lives scale with it.

    Celo multiplies every tensor's step by that tensor's RMS (docs/reference/celo.md), so a tensor that starts
    at zero barely moves: use it on standard-parametrized models, not on μP models whose readout is
    zero-initialised (``MuMLP(..., param="sp")``; with ``param="mup"`` the loss stays at ln C).

    Example::

        opt = Celo(model.parameters(), num_steps=1000)
        ...
        opt.step(loss=loss)
    """

    module_class = module_factory = CeloLOpt
    pretrained_names = ("celo-8x8-mlp-w32",)
    registry_name = "celo"
    staged = True

    @classmethod
    def meta_module(cls, stage: int) -> LearnedOptimizerModule:
        return CeloLOpt(train_phase=stage)

    @classmethod
    def frozen_in_stage(cls, stage: int | None) -> Callable[[str], bool]:
        """docs/reference/celo.md#two-stages: stage 1 freezes the scheduler, stage 2 the MLP rule."""
        if stage == 1:
            return lambda name: name.startswith("scheduler.")
        if stage == 2:
            return lambda name: not name.startswith("scheduler.")
        return lambda name: False


class VeLO(_ScheduledLearnedOptimizer):
    """VeLO: a per-tensor LSTM that writes a per-parameter MLP; needs the loss and ``num_steps``.

    Example::

        opt = VeLO(model.parameters(), num_steps=1000, meta_weights="velo-m")
    """

    module_class = module_factory = VeLOLOpt
    pretrained_names = ("velo-m", "velo")
    registry_name = "velo"


class MuVeLO(LearnedOptimizer):
    """μVeLO: VeLO's μP variant (LSTM 16, 8 MLPs, no parameter-scale multiplier) with μP scales.

    Scales are resolved as for :class:`MuLO`; needs the loss and ``num_steps`` as :class:`VeLO`.

    Example::

        opt = MuVeLO(model.parameters(), num_steps=1000)
    """

    module_class = VeLOLOpt
    module_factory = VeLOLOpt.mu
    pretrained_names = ("muvelo-m", "muvelo-s")
    registry_name = "muvelo"
    mu = True
    needs_loss = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        *,
        num_steps: int | None = None,
        meta_weights: MetaWeights = None,
        weight_decay: float = 0.0,
        scales: Mapping[str, float] | None = None,
        allow_sp: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            params,
            lr,
            meta_weights=meta_weights,
            weight_decay=weight_decay,
            num_steps=num_steps,
            scales=scales,
            allow_sp=allow_sp,
            fused=fused,
            state_dtype=state_dtype,
        )


__all__ = ["LO", "Celo", "MuLO", "MuVeLO", "VeLO"]
