import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_lopt as llo
from lightning_lopt import OptimizeeModule, configure_optimizer
from lightning_lopt.datamodules import DigitsDataModule
from lightning_lopt.models import MuMLP
from lightning_lopt.trainer import long_run_advice


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
    with pytest.raises(ValueError, match="set max_steps or max_epochs on the Trainer, or pass num_steps"):
        L.Trainer(**kwargs).fit(module, DigitsDataModule(batch_size=64))
    scheduled = OptimizeeModule(MuMLP((1, 8, 8), width=16, depth=2, num_classes=10), optimizer="sgd", lr_schedule="warmup-cosine")
    with pytest.raises(ValueError, match="lr_schedule='warmup-cosine' needs the length of training.*on the Trainer$"):
        L.Trainer(**kwargs).fit(scheduled, DigitsDataModule(batch_size=64))


class _RecordLrs(Callback):
    """The learning rates of every group at each optimizer step; optionally stop after ``stop_after`` steps."""

    def __init__(self, stop_after: int | None = None):
        self.lrs: list[list[float]] = []
        self.stop_after = stop_after

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stop_after is not None and len(self.lrs) >= self.stop_after:
            trainer.should_stop = True


def test_warmup_cosine_runs_over_the_fits_optimizer_steps(tmp_path, fit_kwargs):
    # 12 batches accumulated 3 at a time in one epoch: 4 optimizer steps, each with its own lr.
    record = _RecordLrs()
    kwargs = fit_kwargs(tmp_path, -1, max_epochs=1, limit_train_batches=12, accumulate_grad_batches=3)
    trainer = llo.Trainer(
        optimizer="muadam", optimizer_kwargs={"lr": 0.05}, lr_schedule="warmup-cosine", callbacks=[record], **kwargs
    )
    trainer.fit(_module(), DigitsDataModule(batch_size=32))
    base = [0.05 / 64 if lr < 0.05 else 0.05 for lr in record.lrs[0]]  # hidden matrices at lr / fan_in
    # warmup round(0.05 * 4) -> 1 step at full rate, then a cosine over the remaining 3 steps.
    factors = [1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]
    assert len(record.lrs) == 4
    for seen, factor in zip(record.lrs, factors, strict=True):
        assert seen == pytest.approx([b * factor for b in base])
    assert trainer.lr_scheduler_configs[0].scheduler.num_steps == 4


def test_optimizee_module_takes_the_schedule_too(tmp_path, fit_kwargs):
    module = OptimizeeModule(MuMLP((1, 8, 8), width=16, depth=2, num_classes=10), optimizer="sgd", lr_schedule="warmup-cosine")
    record = _RecordLrs()
    L.Trainer(callbacks=[record], **fit_kwargs(tmp_path, 20)).fit(module, DigitsDataModule(batch_size=32))
    expected = [0.1 * (1.0 if t == 0 else 0.5 * (1 + math.cos(math.pi * (t - 1) / 19))) for t in range(20)]
    assert [lrs[0] for lrs in record.lrs] == pytest.approx(expected)  # registry default lr 0.1 for sgd
    with pytest.raises(ValueError, match="no trainer is attached"):
        OptimizeeModule(MuMLP((1, 8, 8), width=16, depth=2, num_classes=10), lr_schedule="warmup-cosine").configure_optimizers()


def test_bad_lr_schedules_are_refused_before_training():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        llo.Trainer(optimizer="adamw", lr_schedule="cosine", logger=False)
    with pytest.raises(ValueError, match="give optimizer= too"):
        llo.Trainer(lr_schedule="warmup-cosine", logger=False)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        configure_optimizer(_module(), "adamw", lr_schedule="linear")
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        OptimizeeModule(MuMLP((1, 8, 8), width=16, depth=2, num_classes=10), lr_schedule="step")


def _params():
    return MuMLP((1, 8, 8), width=16, depth=2, num_classes=10).parameters()


def test_long_run_advice_names_what_is_missing_past_twice_the_meta_training_episodes():
    default = llo.MuLO(_params())  # packaged default: episodes of at most 1,000 steps
    assert long_run_advice(default, 2000, "constant") is None
    advice = long_run_advice(default, 2001, "constant")
    assert "2,001 optimizer steps" in advice and "(1,000 steps)" in advice and "'mulo-fmnist8-w32-128'" in advice
    assert 'lr_schedule="warmup-cosine"' in advice
    assert "meta_weights='mulo-fmnist8-16x16-mix10k-v2'" in advice and "weight_decay=0.001" in advice
    # Only what is still missing is named.
    scheduled = long_run_advice(default, 10_000, "warmup-cosine")
    assert "lr_schedule" not in scheduled and "meta_weights=" in scheduled
    long_run = llo.MuLO(_params(), meta_weights="mulo-fmnist8-16x16-mix10k-v2", weight_decay=1e-3)
    assert long_run_advice(long_run, 20_000, "constant") is None  # episodes up to 10,000 steps
    assert long_run_advice(long_run, 25_000, "warmup-cosine") is None  # nothing left to change
    only_schedule = long_run_advice(long_run, 25_000, "constant")
    assert 'lr_schedule="warmup-cosine"' in only_schedule and "meta_weights=" not in only_schedule
    mucelo2 = llo.MuCelo2(_params())
    assert "meta_weights='mucelo2-8x8-16x16-mlp-mix10k'" in long_run_advice(mucelo2, 10_000, "warmup-cosine")
    # Celo's learned scheduler reads the horizon itself.
    assert long_run_advice(llo.Celo(_params(), num_steps=50_000), 50_000, "constant") is None


def test_trainer_warns_a_long_mulo_fit_and_not_a_short_one(tmp_path, fit_kwargs):
    with pytest.warns(UserWarning, match="more than 2x the longest episode"):
        llo.Trainer(optimizer="mulo", callbacks=[_RecordLrs(stop_after=1)], **fit_kwargs(tmp_path, 5000)).fit(
            _module(), DigitsDataModule(batch_size=32)
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*longest episode")
        llo.Trainer(optimizer="mulo", **fit_kwargs(tmp_path, 3)).fit(_module(), DigitsDataModule(batch_size=32))


class _RecordStep(Callback):
    """Each parameter and its gradient just before the latest optimizer step, by name."""

    def __init__(self):
        self.before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("through", ["trainer", "module"])
def test_param_groups_by_role_move_each_role_by_its_own_lr(tmp_path, fit_kwargs, through):
    # One SGD step: p' = p - lr_role * g, lr_role by hand from the model's update scales and tensor ranks.
    model = MuMLP((1, 8, 8), width=64, depth=3, num_classes=10)
    with torch.no_grad():  # μP's zero readout would leave the hidden layers' first gradients at zero
        model.readout.weight.normal_(0.0, 0.5)
    roles = {"hidden_lr_mult": 2.0, "vector_lr_mult": 0.5}
    record = _RecordStep()
    if through == "trainer":
        module = OptimizeeModule(model)
        trainer = llo.Trainer(
            optimizer="sgd", optimizer_kwargs={"lr": 0.1}, param_groups_by_role=roles, callbacks=[record], **fit_kwargs(tmp_path, 1)
        )
    else:
        module = OptimizeeModule(model, optimizer="sgd", optimizer_kwargs={"lr": 0.1}, param_groups_by_role=roles)
        trainer = L.Trainer(callbacks=[record], **fit_kwargs(tmp_path, 1))
    trainer.fit(module, DigitsDataModule(batch_size=64))
    scales = module.update_scales()
    seen = set()
    for name, p in module.named_parameters():
        before, grad = record.before[name]
        lr = 0.2 if scales[name] < 1.0 else 0.05 if p.ndim == 1 else 0.1
        seen.add(lr)
        # float32: one rounding of p (2^-24 relative) plus the product's; 1e-6 absolute covers |p| < 4.
        torch.testing.assert_close(p.detach(), before - lr * grad, rtol=0, atol=1e-6)
        assert grad.abs().max() > 1e-4  # the step moved it by something the tolerance can see
    assert seen == {0.2, 0.05, 0.1}  # every role is present in this model


def test_param_groups_by_role_start_from_the_optimizers_default_lr(tmp_path, fit_kwargs):
    trainer = llo.Trainer(optimizer="mulo", param_groups_by_role={"hidden_lr_mult": 2.0}, **fit_kwargs(tmp_path, 1))
    trainer.fit(_module(), DigitsDataModule(batch_size=64))
    (opt,) = trainer.optimizers
    assert sorted(g["lr"] for g in opt.param_groups) == [1.0, 2.0]  # MuLO's default lr 1.0, hidden x2


def test_bad_param_groups_by_role_are_refused_before_training():
    with pytest.raises(ValueError, match="unknown param-group options \\['hidden_lr'\\]"):
        llo.Trainer(optimizer="sgd", param_groups_by_role={"hidden_lr": 2.0}, logger=False)
    with pytest.raises(ValueError, match="hidden_lr_mult must be a positive finite number"):
        llo.Trainer(optimizer="sgd", param_groups_by_role={"hidden_lr_mult": -1.0}, logger=False)
    with pytest.raises(ValueError, match="vector_weight_decay must be a non-negative number"):
        configure_optimizer(_module(), "adamw", param_groups_by_role={"vector_weight_decay": -0.1})
    with pytest.raises(ValueError, match="give optimizer= too"):
        llo.Trainer(param_groups_by_role={"hidden_lr_mult": 2.0}, logger=False)

    def no_default_lr(params, lr):
        return torch.optim.SGD(params, lr=lr)

    with pytest.raises(ValueError, match="has no default lr: pass one"):
        llo.Trainer(optimizer=no_default_lr, param_groups_by_role={"vector_lr_mult": 0.5}, logger=False)
    with pytest.raises(ValueError, match="has no default lr"):
        OptimizeeModule(MuMLP((1, 8, 8), width=16, depth=2, num_classes=10), optimizer=no_default_lr,
                        param_groups_by_role={"hidden_lr_mult": 2.0})
    # a weight decay alone needs no lr
    llo.Trainer(optimizer=no_default_lr, param_groups_by_role={"vector_weight_decay": 0.0}, logger=False)
