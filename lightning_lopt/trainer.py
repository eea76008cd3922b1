"""``Trainer(optimizer="mulo")``: choose the optimizer from outside the LightningModule.

Lightning keeps the optimizer inside ``LightningModule.configure_optimizers``. For users who want to
swap it without touching their module, :func:`configure_optimizer` installs a ``configure_optimizers``
on any module, and :class:`Trainer` is a thin ``lightning.Trainer`` subclass that does so in ``fit``.
A Callback cannot do this: Lightning checks for ``configure_optimizers`` before the first callback
hook runs (docs/reference/design.md#a-trainer-that-chooses-the-optimizer).

Learned optimizers with a loss-driven scheduler (Celo, VeLO) need the training loss at every step.
Lightning's closure returns only the last micro-batch's loss divided by ``accumulate_grad_batches``,
and ``16-mixed`` steps without any closure, so :class:`LossToOptimizer` hands every such optimizer
the mean loss over the micro-batches of the step. :class:`Trainer` adds it to every fit. For these
optimizers, :func:`configure_optimizer` also fills in the horizon ``num_steps`` from
``trainer.estimated_stepping_batches`` when it is not given.

Long runs: ``lr_schedule="warmup-cosine"`` steps a :class:`~lightning_lopt.optim.schedules.WarmupCosine`
over the fit's optimizer steps, and ``param_groups_by_role`` gives hidden matrices and 1-D tensors
settings of their own (:func:`~lightning_lopt.optim.param_groups_by_role`). A learned optimizer asked to
run far past the episodes its weights were meta-trained on gets a warning naming the settings measured
to hold there (README, "Long runs").

Example::

    import lightning_lopt as llo
    trainer = llo.Trainer(optimizer="muadam", optimizer_kwargs={"lr": 1e-2}, max_steps=300)
    trainer.fit(module, datamodule)

    # a long run: the long-run weights, weight decay and warmup + cosine over the 10,000 steps
    trainer = llo.Trainer(optimizer="mulo", lr_schedule="warmup-cosine", max_steps=10_000,
                          optimizer_kwargs={"meta_weights": "mulo-fmnist8-16x16-mix10k-v2", "weight_decay": 1e-3})

    # the setting selected for the LM (README): lr 0.5, the hidden matrices at twice that
    trainer = llo.Trainer(optimizer="mulo", lr_schedule="warmup-cosine", max_steps=10_000,
                          optimizer_kwargs={"lr": 0.5, "meta_weights": "mulo-fmnist8-16x16-mix10k-v2",
                                            "weight_decay": 1e-3},
                          param_groups_by_role={"hidden_lr_mult": 2.0})

    # or keep lightning.Trainer:
    llo.configure_optimizer(module, "celo")
    lightning.Trainer(max_steps=300, callbacks=[llo.LossToOptimizer()]).fit(module, datamodule)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MethodType
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor

from lightning_lopt.optim.learned import LearnedOptimizer
from lightning_lopt.optim.param_groups import check_role_options, needs_lr, param_groups_by_role
from lightning_lopt.optim.registry import accepts, build, default_lr, resolve
from lightning_lopt.optim.schedules import WarmupCosine

OptimizerChoice = str | Callable[..., torch.optim.Optimizer]
Scales = Mapping[str, float] | Callable[[], Mapping[str, float]]
#: ``"constant"``: the optimizer's ``lr`` throughout; ``"warmup-cosine"``: :class:`WarmupCosine` over the fit.
LrSchedule = Literal["constant", "warmup-cosine"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
#: Past this many times its longest meta-training episode a learned optimizer's weights are on their own:
#: measured, μLO's default weights (episodes of at most 1,000 steps) hold to about 2,000 steps and diverge
#: between 2,863 and 6,186 on a Fashion-MNIST MLP at a constant lr (docs/results.md, "Horizon").
LONG_RUN_FACTOR = 2


def configure_optimizers(module: L.LightningModule) -> OptimizerLRScheduler:
    """The ``configure_optimizers`` that :func:`configure_optimizer` binds to a module.

    A module-level function bound with ``MethodType``: Lightning's override check needs a real
    method, and ``ddp_spawn`` must be able to pickle it. A module-level ``update_scales()``
    (OptimizeeModule, or a user's) is the most robust source of μP scales; otherwise the optimizer
    reads them from the parameters themselves.
    """
    optimizer, kwargs, lr_schedule, roles = module._lopt_optimizer
    return optimizers_for_fit(
        module, optimizer, kwargs, lr_schedule, scales=getattr(module, "update_scales", None), param_groups_by_role=roles
    )


def optimizers_for_fit(
    module: L.LightningModule,
    optimizer: OptimizerChoice,
    kwargs: Mapping[str, Any],
    lr_schedule: LrSchedule = "constant",
    *,
    scales: Scales | None = None,
    param_groups_by_role: Mapping[str, Any] | None = None,
) -> OptimizerLRScheduler:
    """What a ``configure_optimizers`` returns for ``optimizer`` over ``module``'s parameters.

    The optimizer gets the fit's horizon where it takes one (:func:`with_horizon`); with
    ``lr_schedule="warmup-cosine"`` it comes with a :class:`WarmupCosine` over the fit's optimizer
    steps, stepped every step. ``param_groups_by_role`` (``hidden_lr_mult``, ``vector_weight_decay``,
    ``vector_lr_mult``) splits the parameters as :func:`~lightning_lopt.optim.param_groups_by_role`
    does, relative to the optimizer's ``lr`` (the one in ``kwargs``, else its default). A learned
    optimizer asked to run far past its weights' meta-training episodes is warned once
    (:func:`long_run_advice`).

    Example::

        def configure_optimizers(self):
            return optimizers_for_fit(self, "mulo", {"weight_decay": 1e-3}, "warmup-cosine",
                                      param_groups_by_role={"hidden_lr_mult": 2.0})
    """
    check_lr_schedule(lr_schedule)
    params = parameters_by_role(module, optimizer, kwargs, param_groups_by_role or {}, scales)
    built = build(optimizer, params, scales=scales, **with_horizon(module, optimizer, dict(kwargs)))
    if isinstance(built, LearnedOptimizer) and module._trainer is not None:
        horizon = module.trainer.estimated_stepping_batches
        advice = long_run_advice(built, int(horizon), lr_schedule) if math.isfinite(horizon) else None
        if advice is not None:
            rank_zero_warn(advice)
    if lr_schedule == "constant":
        return built
    scheduler = WarmupCosine(built, fit_horizon(module, f"lr_schedule={lr_schedule!r}"))
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def parameters_by_role(
    module: L.LightningModule,
    optimizer: OptimizerChoice,
    kwargs: Mapping[str, Any],
    roles: Mapping[str, Any],
    scales: Scales | None,
) -> list[Any]:
    """``module``'s named parameters, split by :func:`~lightning_lopt.optim.param_groups_by_role` with
    ``roles`` at the ``lr`` ``optimizer`` will run with (its ``kwargs``', else its default)."""
    check_roles_against(optimizer, kwargs, roles)
    if not roles:
        return list(module.named_parameters())
    lr = kwargs.get("lr", default_lr(optimizer))
    return param_groups_by_role(module, lr, scales=scales, **roles)


def check_roles_against(optimizer: OptimizerChoice, kwargs: Mapping[str, Any], roles: Mapping[str, Any]) -> None:
    """``ValueError`` for bad ``roles`` (:func:`~lightning_lopt.optim.param_groups.check_role_options`),
    or for learning-rate multipliers on an optimizer with no ``lr``, neither given nor a default."""
    check_role_options(roles)
    if needs_lr(roles) and "lr" not in kwargs and default_lr(optimizer) is None:
        raise ValueError(
            f"param_groups_by_role {dict(roles)} multiplies the learning rate, but {optimizer!r} has no default "
            "lr: pass one in the optimizer's kwargs"
        )


def check_lr_schedule(lr_schedule: str) -> None:
    """``ValueError`` unless ``lr_schedule`` is one of :data:`LR_SCHEDULES`."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")


def fit_horizon(module: L.LightningModule, needed_by: str, alternative: str = "") -> int:
    """The number of optimizer steps of the fit ``module`` is in: ``trainer.estimated_stepping_batches``
    (it accounts for ``max_steps``, ``max_epochs``, accumulation and devices).

    Raises:
        ValueError: no trainer is attached, or the fit has no end.
    """
    if module._trainer is None:
        raise ValueError(f"{needed_by} needs the length of training, read from the Trainer during fit(); no trainer is attached")
    horizon = module.trainer.estimated_stepping_batches
    if not math.isfinite(horizon):
        raise ValueError(
            f"{needed_by} needs the length of training, but this fit has no end: set max_steps or "
            f"max_epochs on the Trainer{alternative}"
        )
    return int(horizon)


def long_run_advice(optimizer: LearnedOptimizer, horizon: int, lr_schedule: LrSchedule) -> str | None:
    """A warning for a fit of ``horizon`` steps far past the episodes ``optimizer``'s weights were
    meta-trained on, naming the settings measured to hold there; ``None`` when there is nothing to change.

    "Far past" is more than :data:`LONG_RUN_FACTOR` times the longest episode on the weights' card.
    The settings are ``lr_schedule="warmup-cosine"`` and the class's :attr:`~LearnedOptimizer.long_run_settings`
    (e.g. MuLO's long-run weights and weight decay 1e-3). Celo and VeLO, whose learned schedulers
    read the horizon, are left alone.

    Example::

        long_run_advice(MuLO(model.parameters()), 10_000, "constant")   # 'MuLO: this fit runs 10,000 ...'
    """
    if optimizer.needs_loss:
        return None
    card = getattr(optimizer.meta_weights, "card", None) or {}
    longest = card.get("recipe", {}).get("truncation", {}).get("max_length")
    if not longest or horizon <= LONG_RUN_FACTOR * longest:
        return None
    fixes = [] if lr_schedule == "warmup-cosine" else ['lr_schedule="warmup-cosine"']
    current = {"meta_weights": card.get("name"), "weight_decay": optimizer.defaults["weight_decay"]}
    fixes += [f"{key}={value!r}" for key, value in optimizer.long_run_settings.items() if current.get(key) != value]
    if not fixes:
        return None
    name = type(optimizer).__name__
    return (
        f"{name}: this fit runs {horizon:,} optimizer steps, more than {LONG_RUN_FACTOR}x the longest episode "
        f"({longest:,} steps) its weights {card.get('name', '(unnamed)')!r} were meta-trained on, where learned "
        f"optimizers at a constant lr were measured to drift or diverge. Measured to hold for 10,000 steps: {', '.join(fixes)} "
        "(README, 'Long runs'; in a LightningModule, lightning_lopt.optim.schedules.WarmupCosine)."
    )


def with_horizon(module: L.LightningModule, optimizer: OptimizerChoice, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``num_steps`` for optimizers that take a horizon (Celo, VeLO) and lack one.

    The horizon of a learned scheduler is the number of optimizer steps of the fit:
    ``trainer.estimated_stepping_batches`` (it accounts for ``max_steps``, ``max_epochs``,
    accumulation and devices). Call it from ``configure_optimizers``, where that is known.

    Example::

        def configure_optimizers(self):
            return lightning_lopt.optim.build("celo", self.parameters(), **with_horizon(self, "celo", {}))
    """
    if "num_steps" in kwargs:
        return kwargs
    # Outside a fit (no trainer attached) there is no horizon to read; the optimizer then asks for one.
    if module._trainer is None or not accepts(resolve(optimizer), "num_steps"):
        return kwargs
    return {**kwargs, "num_steps": fit_horizon(module, str(optimizer), ", or pass num_steps in the optimizer's kwargs")}


def configure_optimizer(
    module: L.LightningModule,
    optimizer: OptimizerChoice,
    *,
    lr_schedule: LrSchedule = "constant",
    param_groups_by_role: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> L.LightningModule:
    """Make ``module.configure_optimizers`` return ``optimizer`` built over its parameters.

    ``optimizer`` is a registry name (``lightning_lopt.optim.available()``) or an optimizer class or
    callable; ``kwargs`` go to it; ``lr_schedule`` and ``param_groups_by_role`` as in
    :func:`optimizers_for_fit`. Returns the module, for chaining.

    Example::

        configure_optimizer(module, "mulo", lr_schedule="warmup-cosine", param_groups_by_role={"hidden_lr_mult": 2.0})
    """
    resolve(optimizer)  # fail now, with the list of known names, rather than inside fit()
    check_lr_schedule(lr_schedule)
    check_roles_against(optimizer, kwargs, param_groups_by_role or {})
    module._lopt_optimizer = (optimizer, dict(kwargs), lr_schedule, dict(param_groups_by_role or {}))
    module.configure_optimizers = MethodType(configure_optimizers, module)  # type: ignore[method-assign]
    return module


class LossToOptimizer(Callback):
    """Hand each optimizer step the mean training loss of its micro-batches.

    The loss is summed in ``on_before_backward``, where Lightning passes ``loss /
    accumulate_grad_batches`` (so the sum is the mean over the micro-batches; in manual
    optimization it is the sum of what ``manual_backward`` received), and handed over in
    ``on_before_optimizer_step`` to every optimizer with a ``set_loss_hint`` method (the learned
    optimizers of :mod:`lightning_lopt.optim.learned`); then the sum restarts. Under ``16-mixed``
    with a ``GradScaler`` the loss Lightning passes is scaled; it is unscaled here. Other optimizers
    are left alone. :class:`Trainer` adds this callback to every fit.

    Example::

        lightning.Trainer(callbacks=[LossToOptimizer()], accumulate_grad_batches=4).fit(module)
    """

    def __init__(self) -> None:
        self._loss_sum: Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loss_sum = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        loss = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            loss = loss / scaler.get_scale()  # exact for the default power-of-two scales
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        set_hint = getattr(optimizer, "set_loss_hint", None)
        if set_hint is not None and self._loss_sum is not None:
            set_hint(self._loss_sum)
        self._loss_sum = None


class Trainer(L.Trainer):
    """``lightning.Trainer`` with an ``optimizer`` choice that overrides the module's own.

    A :class:`LossToOptimizer` callback is added unless ``callbacks`` already holds one.

    Args:
        optimizer: a registry name (``"adamw"``, ``"muadam"``, ``"mulo"``, ``"celo"``, ...) or an
            optimizer class / callable. ``None`` keeps the module's ``configure_optimizers``.
        optimizer_kwargs: keyword arguments for the optimizer. Optimizers that take ``num_steps``
            (Celo, VeLO) get ``trainer.estimated_stepping_batches`` unless it is given here.
        lr_schedule: ``"warmup-cosine"`` for a linear warmup (5% of the fit) and a cosine decay to
            zero over the fit's optimizer steps, what long runs need; ``None`` (or ``"constant"``)
            keeps ``lr`` constant. Needs ``optimizer``.
        param_groups_by_role: settings of their own for the hidden matrices and 1-D tensors,
            ``{"hidden_lr_mult": 2.0}`` or any of ``vector_weight_decay`` and ``vector_lr_mult``
            (:func:`lightning_lopt.optim.param_groups_by_role`); multipliers are relative to the
            optimizer's ``lr``. Needs ``optimizer``.
        **kwargs: everything ``lightning.Trainer`` takes.
    """

    def __init__(
        self,
        *,
        optimizer: OptimizerChoice | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_schedule: LrSchedule | None = None,
        param_groups_by_role: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if optimizer is not None:
            resolve(optimizer)
        for name, value in (("lr_schedule", lr_schedule), ("param_groups_by_role", param_groups_by_role)):
            if value is not None and optimizer is None:
                raise ValueError(f"{name} applies to the optimizer chosen here: give optimizer= too")
        if lr_schedule is not None:
            check_lr_schedule(lr_schedule)
        if optimizer is not None:
            check_roles_against(optimizer, optimizer_kwargs or {}, param_groups_by_role or {})
        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        if not any(isinstance(c, LossToOptimizer) for c in callbacks):
            callbacks.append(LossToOptimizer())
        # Through kwargs, not a named argument: LightningCLI reads the parameters of this __init__
        # by following **kwargs into lightning.Trainer, and must keep seeing `callbacks` there.
        kwargs["callbacks"] = callbacks
        super().__init__(**kwargs)
        self.optimizer_choice = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.lr_schedule: LrSchedule = lr_schedule or "constant"
        self.param_groups_by_role = dict(param_groups_by_role or {})

    def fit(self, model: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.optimizer_choice is not None:
            configure_optimizer(
                model,
                self.optimizer_choice,
                lr_schedule=self.lr_schedule,
                param_groups_by_role=self.param_groups_by_role,
                **self.optimizer_kwargs,
            )
        return super().fit(model, *args, **kwargs)
