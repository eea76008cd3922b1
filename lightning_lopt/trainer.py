"""``Trainer(optimizer="mulo")``: choose the optimizer from outside the LightningModule.

Lightning keeps the optimizer inside ``LightningModule.configure_optimizers``. For users who want to
swap it without touching their module, :func:`configure_optimizer` installs a ``configure_optimizers``
on any module, and :class:`Trainer` is a thin ``lightning.Trainer`` subclass that does so in ``fit``.
A Callback cannot do this: Lightning checks for ``configure_optimizers`` before the first callback
hook runs (mup_lightning.md §2.5).

Example::

    import lightning_lopt as llo
    trainer = llo.Trainer(optimizer="muadam", optimizer_kwargs={"lr": 1e-2}, max_steps=300)
    trainer.fit(module, datamodule)

    # or keep lightning.Trainer:
    llo.configure_optimizer(module, "muadam", lr=1e-2)
    lightning.Trainer(max_steps=300).fit(module, datamodule)
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import lightning as L
import torch

from lightning_lopt.optim.registry import build, resolve

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
    return build(optimizer, module.named_parameters(), scales=scales, **kwargs)


def configure_optimizer(module: L.LightningModule, optimizer: OptimizerChoice, **kwargs: Any) -> L.LightningModule:
    """Make ``module.configure_optimizers`` return ``optimizer`` built over its parameters.

    ``optimizer`` is a registry name (``lightning_lopt.optim.available()``) or an optimizer class or
    callable; ``kwargs`` go to it. Returns the module, for chaining.
    """
    resolve(optimizer)  # fail now, with the list of known names, rather than inside fit()
    module._lopt_optimizer = (optimizer, dict(kwargs))
    module.configure_optimizers = MethodType(configure_optimizers, module)  # type: ignore[method-assign]
    return module


class Trainer(L.Trainer):
    """``lightning.Trainer`` with an ``optimizer`` choice that overrides the module's own.

    Args:
        optimizer: a registry name (``"adamw"``, ``"muadam"``, ``"mulo"``, ...) or an optimizer
            class / callable. ``None`` keeps the module's ``configure_optimizers``.
        optimizer_kwargs: keyword arguments for the optimizer.
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
        super().__init__(**kwargs)
        self.optimizer_choice = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs or {})

    def fit(self, model: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.optimizer_choice is not None:
            configure_optimizer(model, self.optimizer_choice, **self.optimizer_kwargs)
        return super().fit(model, *args, **kwargs)
