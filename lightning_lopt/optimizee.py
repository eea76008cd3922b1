"""The optimizee LightningModule: a model, an objective and a pure functional loss.

``OptimizeeModule`` wraps any ``nn.Module`` for ordinary Lightning training, and exposes
:meth:`OptimizeeModule.loss`, a pure function of ``(params, batch)`` that the meta-trainer vmaps over
stacked particle parameters (docs/reference/design.md#contract-3-a-task-is-lightning-native).

Example::

    from lightning_lopt import OptimizeeModule
    from lightning_lopt.models import MuMLP
    module = OptimizeeModule(MuMLP((1, 8, 8), width=128, depth=3, num_classes=10), optimizer="muadam")
    params = dict(module.model.named_parameters())
    loss = module.loss(params, (x, y))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn

from lightning_lopt.models.scales import update_scales_of
from lightning_lopt.trainer import LrSchedule, check_lr_schedule, check_roles_against, optimizers_for_fit

Objective = Literal["classification", "lm", "autoencoder"]
_OBJECTIVES = ("classification", "lm", "autoencoder")


def objective_loss(objective: str, output: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The mean training loss of ``output`` for ``objective`` (pure; safe under ``vmap``)."""
    if objective == "classification":
        return F.cross_entropy(output, y)
    if objective == "lm":
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1))
    return F.mse_loss(output, x.reshape(output.shape).to(output.dtype))


def _infer_num_classes(model: nn.Module) -> int | None:
    """``model.num_classes``, else the width of a ``model.readout`` layer (our models have one)."""
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    readout = getattr(model, "readout", None)
    return getattr(readout, "out_features", None)


class OptimizeeModule(L.LightningModule):
    """Train ``model`` on ``objective`` with Lightning, or call its pure :meth:`loss`.

    Args:
        model: the network; ``forward(x)`` returns logits (classification, ``[B, C]``), token
            logits (``lm``, ``[B, T, V]``) or a reconstruction of ``x`` (``autoencoder``).
        objective: ``"classification"``, ``"lm"`` or ``"autoencoder"``.
        optimizer: a registry name (``lightning_lopt.optim.available()``) or an optimizer class /
            callable taking ``(params, **optimizer_kwargs)``. Used by :meth:`configure_optimizers`.
        optimizer_kwargs: keyword arguments for the optimizer, e.g. ``{"lr": 1e-2}``.
        num_classes: classes for the accuracy metric; read from ``model.num_classes`` or
            ``model.readout.out_features`` when omitted.
        lr_schedule: ``"constant"`` or ``"warmup-cosine"`` (warmup over 5% of the fit, then a cosine
            decay to zero; for long runs), as ``lightning_lopt.Trainer``'s.
        param_groups_by_role: settings of their own for the hidden matrices and 1-D tensors, e.g.
            ``{"hidden_lr_mult": 2.0}`` (:func:`lightning_lopt.optim.param_groups_by_role`), as
            ``lightning_lopt.Trainer``'s.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective = "classification",
        optimizer: str | Callable[..., torch.optim.Optimizer] = "adamw",
        optimizer_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        lr_schedule: LrSchedule = "constant",
        param_groups_by_role: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        check_lr_schedule(lr_schedule)
        check_roles_against(optimizer, optimizer_kwargs or {}, param_groups_by_role or {})
        if objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.objective = objective
        self.optimizer = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.lr_schedule = lr_schedule
        self.param_groups_by_role = dict(param_groups_by_role or {})
        if objective == "classification":
            classes = num_classes if num_classes is not None else _infer_num_classes(model)
            if classes is None:
                raise ValueError("num_classes: pass it, or give the model a `num_classes` attribute")
            self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes, average="micro")
            self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes, average="micro")
        elif objective == "lm":
            self.val_ppl = torchmetrics.text.Perplexity()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def loss(self, params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean loss of the model evaluated at ``params`` on ``batch``: pure, ``vmap``-able.

        ``params`` maps ``model.named_parameters()`` names to tensors; names left out use the
        model's own tensors.
        """
        x, y = batch
        output = torch.func.functional_call(self.model, params, (x,))
        return objective_loss(self.objective, output, x, y)

    def update_scales(self) -> dict[str, float]:
        """The model's per-tensor μP update scales, keyed like ``self.named_parameters()``."""
        return {f"model.{name}": s for name, s in update_scales_of(self.model).items()}

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        output = self.model(x)
        loss = objective_loss(self.objective, output, x, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", on_step=stage == "train", on_epoch=True)
        if self.objective == "classification":
            acc = self.train_acc if stage == "train" else self.val_acc
            acc(output, y)
            self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True)
        elif self.objective == "lm" and stage != "train":
            self.val_ppl(output.float(), y)
            self.log(f"{stage}/ppl", self.val_ppl, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """Build ``self.optimizer`` over the named parameters with the model's μP scales.

        Learned optimizers with a schedule (Celo, VeLO) get the fit's length as their horizon;
        ``lr_schedule`` adds its scheduler and ``param_groups_by_role`` its param groups
        (:func:`lightning_lopt.trainer.optimizers_for_fit`).
        """
        return optimizers_for_fit(
            self,
            self.optimizer,
            self.optimizer_kwargs,
            self.lr_schedule,
            scales=self.update_scales,
            param_groups_by_role=self.param_groups_by_role,
        )
