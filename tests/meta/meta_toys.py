"""Test doubles for meta-training: a one-parameter learned step size and a quadratic LightningModule.

``LearnedSGD``: θ = {"log_lr": [1]}, p ← p − exp(log_lr)·g·s_p (a learned-optimizer module the
meta-trainer accepts like any architecture). ``Quadratic``: loss ½·Σ a_i x_i² of one parameter
vector, written as a user would write a LightningModule (``self.log`` in ``training_step``).
"""

from __future__ import annotations

import types

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lopt.optim.architectures import LearnedOptimizerModule


def _init_state(theta, params, layout="torch"):
    del theta, layout
    return {"iteration": torch.zeros((), dtype=torch.int64, device=params[0].device)}


def _step(theta, params, grads, state, ctx):
    lr = torch.exp(theta["log_lr"][0])
    new = [p - lr * g * s for p, g, s in zip(params, grads, ctx.scales)]
    return new, {"iteration": state["iteration"] + 1}


class LearnedSGD(LearnedOptimizerModule):
    architecture = "test_learned_sgd"
    functional = types.SimpleNamespace(init_state=_init_state, step=_step)

    def __init__(self, log_lr: float = -2.0, layout: str = "torch") -> None:
        super().__init__(layout)
        self.log_lr = nn.Parameter(torch.tensor([float(log_lr)]))

    def reset_parameters(self, generator=None) -> None:
        pass

    @property
    def config(self):
        return {"log_lr": float(self.log_lr.detach()[0])}

    @property
    def step_config(self):
        return {}


class Quadratic(L.LightningModule):
    """½·Σ a_i x_i² with x starting at ``start``; the batch is ignored (the problem is deterministic)."""

    def __init__(self, curvatures=(0.5, 1.0, 2.0), start: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(curvatures))
        self.x = nn.Parameter(torch.full((len(curvatures),), float(start)))

    def training_step(self, batch, batch_idx):
        loss = 0.5 * (self.a * self.x**2).sum()
        self.log("train/loss", loss)
        return loss


class ConstantData(L.LightningDataModule):
    """A plain DataLoader over dummy tensors."""

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=8)
