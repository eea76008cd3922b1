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

Example::

    import lightning_lopt as llo
    trainer = llo.Trainer(optimizer="muadam", optimizer_kwargs={"lr": 1e-2}, max_steps=300)
    trainer.fit(module, datamodule)

    # or keep lightning.Trainer:
    llo.configure_optimizer(module, "celo")
    lightning.Trainer(max_steps=300, callbacks=[llo.LossToOptimizer()]).fit(module, datamodule)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MethodType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_lopt.optim.registry import accepts, build, resolve

OptimizerChoice = str | Callable[..., torch.optim.Optimizer]


def configure_optimizers(module: L.LightningModule) -> torch.optim.Optimizer:
    """The ``configure_optimizers`` that :func:`configure_optimizer` binds to a module.

    A module-level function bound with ``MethodType``: Lightning's override check needs a real
    method, and ``ddp_spawn`` must be able to pickle it. A module-level ``update_scales()``
    (OptimizeeModule, or a user's) is the most robust source of μP scales; otherwise the optimizer
    reads them from the parameters themselves.
    """
    optimizer, kwargs = module._lopt_optimizer
    scales = getattr(module, "update_scales", None)
    return build(optimizer, module.named_parameters(), scales=scales, **with_horizon(module, optimizer, kwargs))


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
    horizon = module.trainer.estimated_stepping_batches
    if not math.isfinite(horizon):
        raise ValueError(
            f"{optimizer} needs num_steps, the length of training, but this fit has no end: set "
            "max_steps or max_epochs on the Trainer, or pass num_steps in the optimizer's kwargs"
        )
    return {**kwargs, "num_steps": int(horizon)}


def configure_optimizer(module: L.LightningModule, optimizer: OptimizerChoice, **kwargs: Any) -> L.LightningModule:
    """Make ``module.configure_optimizers`` return ``optimizer`` built over its parameters.

    ``optimizer`` is a registry name (``lightning_lopt.optim.available()``) or an optimizer class or
    callable; ``kwargs`` go to it. Returns the module, for chaining.
    """
    resolve(optimizer)  # fail now, with the list of known names, rather than inside fit()
    module._lopt_optimizer = (optimizer, dict(kwargs))
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
        **kwargs: everything ``lightning.Trainer`` takes.
    """

    def __init__(
        self,
        *,
        optimizer: OptimizerChoice | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if optimizer is not None:
            resolve(optimizer)
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

    def fit(self, model: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.optimizer_choice is not None:
            configure_optimizer(model, self.optimizer_choice, **self.optimizer_kwargs)
        return super().fit(model, *args, **kwargs)
