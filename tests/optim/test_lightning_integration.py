"""End-to-end: the learned optimizers inside Lightning fits (CPU, digits, a few steps each).

Random meta-weights train poorly, so nothing here asserts big improvements; the tests check what
must hold for any meta-weights: the step Lightning makes is the functional step, the optimizer sees
the right loss and the right (clipped) gradients in every Lightning mode, and checkpoints / DDP
replicas reproduce exactly.
"""

from __future__ import annotations

import warnings
import copy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import lightning_lopt as llo
from lightning_lopt import cli
from lightning_lopt.datamodules import DigitsDataModule
from lightning_lopt.models import MuMLP
from lightning_lopt.optim.architectures import CeloLOpt
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.learned import GLOBAL_STATE_KEY
from lightning_lopt.optim.optimizers import MuLO
from lightning_lopt.trainer import LossToOptimizer, configure_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM meta-initialisation:UserWarning")

DDP_SCRIPT = Path(__file__).with_name("_ddp_script.py")
# Seeded: torch's default seed differs per process, and the tests must not depend on it.
SMALL_CELO = {"meta_weights": CeloLOpt(lstm_hidden_size=8, generator=torch.Generator().manual_seed(0))}


class Recording(llo.OptimizeeModule):
    """Records the loss of every ``training_step`` (before Lightning divides it for accumulation)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__(MuMLP((1, 8, 8), width=width, depth=3, num_classes=10))
        self.step_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.step_losses.append(float(loss.detach()))
        return loss


class Recorder(Callback):
    """After every optimizer step: the loss the optimizer used, the gradient norm it saw, its call."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.calls: list[tuple] = []

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_post_hook(self._record)

    def _record(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.losses.append(float(optimizer.last_loss))
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.calls.append((args[1:], kwargs))  # args[0] is the optimizer itself


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


def params_of(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class FirstStep(Callback):
    """Parameters and gradients just before the first optimizer step, and parameters right after."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
            self.grads = [p.grad.clone() for g in optimizer.param_groups for p in g["params"]]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            optimizer = trainer.optimizers[0]
            self.after = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]


def test_trainer_optimizer_mulo_trains_and_steps_like_the_core(tmp_path, digits, fit_kwargs):
    module = Recording()
    start = params_of(module)
    first = FirstStep()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*RANDOM meta-initialisation")  # packaged weights load
        trainer = llo.Trainer(optimizer="mulo", callbacks=first, **fit_kwargs(tmp_path, 5))
        trainer.fit(module, digits)
    (opt,) = trainer.optimizers
    assert type(opt) is MuLO
    assert sum(isinstance(c, LossToOptimizer) for c in trainer.callbacks) == 1
    assert sorted({g["update_scale"] for g in opt.param_groups}) == [1 / 32, 1.0]
    end = params_of(module)
    assert all(torch.isfinite(p).all() for p in end.values())
    assert all(not torch.equal(start[n], end[n]) for n in end)
    assert opt.last_loss == pytest.approx(module.step_losses[-1])
    # The first step Lightning made is the pure functional step on the same parameters and grads
    # (on CPU through the fused kernel: equal to float32 rounding, 1e-5 of the update + 1 ulp of p).
    theta = dict(opt.meta_weights.state_dict())
    scales = [g["update_scale"] for g in opt.param_groups for _ in g["params"]]
    state = opt.meta_weights.init_state(first.before)
    expected, _ = opt.meta_weights.pure_step(theta, first.before, first.grads, state, StepContext(scales, None, 0))
    for got, want, before in zip(first.after, expected, first.before):
        ulp = torch.finfo(torch.float32).eps * before.abs()
        tolerance = 1e-5 * (want - before).abs().max() + ulp
        assert ((got - want).abs() <= tolerance).all()


CLI_COMMON = [
    "--trainer.max_steps", "3",
    "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false",
    "--trainer.num_sanity_val_steps", "0",
]


@pytest.mark.parametrize(
    "args, expected, num_steps",
    [
        (["--optimizer", "lightning_lopt.MuLO"], "MuLO", None),
        (["--trainer.optimizer", "mulo"], "MuLO", None),
        (["--optimizer", "lightning_lopt.Celo", "--optimizer.num_steps", "7"], "Celo", 7),
        (["--trainer.optimizer", "celo"], "Celo", 3),  # the horizon comes from max_steps
    ],
    ids=["optimizer-class", "trainer-optimizer", "celo-class", "trainer-celo"],
)
def test_lightning_cli(tmp_path, args, expected, num_steps):
    lcli = cli.lightning_cli(["fit", *args, *CLI_COMMON, "--trainer.default_root_dir", str(tmp_path)])
    (opt,) = lcli.trainer.optimizers
    assert type(opt).__name__ == expected
    assert opt.num_steps == num_steps
    assert lcli.trainer.global_step == 3
    assert any(isinstance(c, LossToOptimizer) for c in lcli.trainer.callbacks)
    assert torch.isfinite(opt.last_loss)


def test_gradient_accumulation_feeds_the_mean_micro_batch_loss(tmp_path, digits, fit_kwargs):
    module, recorder = Recording(), Recorder()
    trainer = llo.Trainer(
        optimizer="celo",
        optimizer_kwargs=SMALL_CELO,
        callbacks=[recorder],
        **fit_kwargs(tmp_path, 3, accumulate_grad_batches=2),
    )
    trainer.fit(module, digits)
    micro = module.step_losses
    assert len(micro) == 6 and len(recorder.losses) == 3
    assert trainer.optimizers[0].num_steps == 3
    for k, seen in enumerate(recorder.losses):
        assert seen == pytest.approx((micro[2 * k] + micro[2 * k + 1]) / 2, rel=1e-6)
    # Without the callback, Lightning's closure hands over only the last micro-batch's loss / 2.
    module, recorder = Recording(), Recorder()
    configure_optimizer(module, "celo", **SMALL_CELO)
    L.Trainer(callbacks=[recorder], **fit_kwargs(tmp_path, 1, accumulate_grad_batches=2)).fit(module, digits)
    assert recorder.losses[0] == pytest.approx(module.step_losses[1] / 2, rel=1e-6)


def test_gradient_clipping_happens_before_the_step(tmp_path, digits, fit_kwargs):
    module, recorder = Recording(), Recorder()
    trainer = llo.Trainer(optimizer="mulo", callbacks=[recorder], **fit_kwargs(tmp_path, 3, gradient_clip_val=1e-3))
    trainer.fit(module, digits)
    assert recorder.grad_norms == pytest.approx([1e-3] * 3, rel=1e-4)


def test_bf16_mixed(tmp_path, digits, fit_kwargs):
    module, recorder = Recording(), Recorder()
    start = params_of(module)
    trainer = llo.Trainer(
        optimizer="celo",
        optimizer_kwargs=SMALL_CELO,
        callbacks=[recorder],
        **fit_kwargs(tmp_path, 3, precision="bf16-mixed"),
    )
    trainer.fit(module, digits)
    assert recorder.losses == pytest.approx(module.step_losses, rel=1e-6)
    assert all(callable(kwargs.get("closure")) for _, kwargs in recorder.calls)  # Lightning's closure
    end = params_of(module)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in end.values())
    assert not torch.equal(start["model.input_layer.weight"], end["model.input_layer.weight"])


def test_16_mixed_with_grad_scaler_steps_without_a_closure(tmp_path, digits, fit_kwargs):
    """The GradScaler path (``16-mixed`` on GPU) calls ``step()`` with no closure and a scaled loss."""
    module, recorder = Recording(), Recorder()
    # A small initial scale keeps fp16 gradients finite, so that the scaler skips no step.
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    trainer = llo.Trainer(
        optimizer="celo",
        optimizer_kwargs=SMALL_CELO,
        callbacks=[recorder],
        plugins=[plugin],
        **fit_kwargs(tmp_path, 3),
    )
    trainer.fit(module, digits)
    assert recorder.calls == [((), {})] * 3
    assert recorder.losses == pytest.approx(module.step_losses, rel=1e-6)  # unscaled


class Manual(Recording):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.mode = mode

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        if self.mode == "explicit":
            opt.step(loss=loss.detach())
        elif self.mode == "hint":
            opt.set_loss_hint(loss)  # through Lightning's LightningOptimizer wrapper
            opt.step()
        else:  # "callback": LossToOptimizer saw manual_backward's loss
            opt.step()
        return loss


@pytest.mark.parametrize("mode", ["explicit", "hint", "callback"])
def test_manual_optimization(tmp_path, digits, mode, fit_kwargs):
    module, recorder = Manual(mode), Recorder()
    callbacks = [recorder, LossToOptimizer()] if mode == "callback" else [recorder]
    configure_optimizer(module, "celo", **SMALL_CELO)
    trainer = L.Trainer(callbacks=callbacks, **fit_kwargs(tmp_path, 3))
    trainer.fit(module, digits)
    assert trainer.global_step == 3
    assert recorder.losses == pytest.approx(module.step_losses, rel=1e-6)


def test_manual_optimization_without_a_loss_fails_clearly(tmp_path, digits, fit_kwargs):
    module = Manual("callback")
    configure_optimizer(module, "celo", **SMALL_CELO)
    with pytest.raises(ValueError, match="LossToOptimizer"):
        L.Trainer(**fit_kwargs(tmp_path, 1)).fit(module, digits)


def test_resume_from_a_lightning_checkpoint_equals_an_uninterrupted_run(tmp_path, digits, fit_kwargs):
    x, y = digits.split("train")
    # Four batches in order per epoch, and the checkpoint after 4 steps: on an epoch boundary a
    # resumed fit sees the same batches as the uninterrupted one (Lightning cannot fast-forward a
    # plain DataLoader mid-epoch).
    loader = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64, shuffle=False)
    initial = Recording()

    def trainer(**extra) -> llo.Trainer:
        return llo.Trainer(optimizer="celo", optimizer_kwargs=SMALL_CELO, **fit_kwargs(tmp_path, 8, **extra))

    straight = copy.deepcopy(initial)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer(enable_checkpointing=True, callbacks=[saver]).fit(straight, loader)
    ckpt = next(tmp_path.glob("*step=4.ckpt"))
    state = torch.load(ckpt, weights_only=True)  # the optimizer state holds only tensors and primitives
    assert int(state["optimizer_states"][0]["state"][GLOBAL_STATE_KEY]["iteration"]) == 4

    resumed = copy.deepcopy(initial)
    t = trainer()
    t.fit(resumed, loader, ckpt_path=ckpt)
    assert t.global_step == 8 and t.optimizers[0].num_steps == 8
    assert resumed.step_losses == straight.step_losses[4:]
    a, b = params_of(straight), params_of(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_trainer_adds_the_loss_callback_once():
    own = LossToOptimizer()
    trainer = llo.Trainer(callbacks=own, logger=False)
    assert [c for c in trainer.callbacks if isinstance(c, LossToOptimizer)] == [own]
    trainer = llo.Trainer(logger=False)
    assert sum(isinstance(c, LossToOptimizer) for c in trainer.callbacks) == 1


@pytest.mark.slow
def test_ddp_replicas_stay_identical_with_a_loss_driven_optimizer(tmp_path):
    result = subprocess.run(
        [sys.executable, str(DDP_SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    # The ranks trained on different shards (different local losses) ...
    assert not torch.equal(rank0["local_loss"], rank1["local_loss"])
    # ... but Celo used their average, so the weights, which did move, stayed identical.
    torch.testing.assert_close(rank0["last_loss"], (rank0["local_loss"] + rank1["local_loss"]) / 2)
    assert float(rank0["change"]) > 0
    for name in rank0:
        if name != "local_loss":
            assert torch.equal(rank0[name], rank1[name]), name
