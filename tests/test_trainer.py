import warnings

import lightning as L
import pytest
import torch

import lightning_lopt as llo
from lightning_lopt import OptimizeeModule, configure_optimizer
from lightning_lopt.datamodules import DigitsDataModule
from lightning_lopt.models import MuMLP


def _module():
    return OptimizeeModule(MuMLP((1, 8, 8), width=64, depth=3, num_classes=10))


def test_trainer_optimizer_choice_overrides_the_module(tmp_path, fit_kwargs):
    module = _module()
    trainer = llo.Trainer(optimizer="muadam", optimizer_kwargs={"lr": 0.05}, **fit_kwargs(tmp_path, 30))
    trainer.fit(module, DigitsDataModule(batch_size=64))
    (opt,) = trainer.optimizers
    assert isinstance(opt, llo.MuAdam)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([0.05 / 64, 0.05])  # hidden matrices get lr/fan_in
    assert float(trainer.callback_metrics["train/loss_epoch"]) < 2.0  # ln(10) = 2.30 at init


def test_helper_on_plain_lightning_trainer(tmp_path, fit_kwargs):
    module = configure_optimizer(_module(), torch.optim.SGD, lr=0.5)
    trainer = L.Trainer(**fit_kwargs(tmp_path, 5))
    trainer.fit(module, DigitsDataModule(batch_size=64))
    assert type(trainer.optimizers[0]) is torch.optim.SGD


def test_unknown_optimizer_fails_before_training():
    with pytest.raises(ValueError, match="unknown name 'adamx'"):
        llo.Trainer(optimizer="adamx", logger=False)
    with pytest.raises(ValueError, match="unknown name"):
        configure_optimizer(_module(), "nope")


def test_optimizee_module_gives_learned_schedules_the_fit_length(tmp_path, fit_kwargs):
    module = OptimizeeModule(MuMLP((1, 8, 8), width=32, depth=2, num_classes=10), optimizer="celo")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*RANDOM meta-initialisation")  # packaged weights load
        L.Trainer(**fit_kwargs(tmp_path, 4)).fit(module, DigitsDataModule(batch_size=64))
    (opt,) = module.trainer.optimizers
    assert type(opt).__name__ == "Celo" and opt.num_steps == 4


def test_horizon_needs_a_finite_fit(tmp_path, fit_kwargs):
    module = OptimizeeModule(MuMLP((1, 8, 8), width=16, depth=2, num_classes=10), optimizer="celo")
    # No trainer attached: nothing to read, so the optimizer itself asks for num_steps.
    assert llo.with_horizon(module, "celo", {}) == {}
    kwargs = fit_kwargs(tmp_path, -1)
    kwargs["max_epochs"] = -1  # an endless fit
    with pytest.raises(ValueError, match="set max_steps or max_epochs"):
        L.Trainer(**kwargs).fit(module, DigitsDataModule(batch_size=64))
