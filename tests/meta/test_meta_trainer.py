"""MetaTrainer end to end: resume (full and light), fine-tuning a user's module, errors, divergence."""

from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lopt.meta import ImageMLPTask, LightCheckpoint, LogUniformLengthSchedule, MetaTrainer, PES, Task
from lightning_lopt.meta.inner_eval import inner_loss_curve
from lightning_lopt.meta.checkpoint import META_STATE_JSON
from lightning_lopt.optim import LO
from lightning_lopt.optim.architectures import SmallFCLOpt

from meta_toys import ConstantData, LearnedSGD, Quadratic

SMALL = {"estimator": PES(num_pairs=2, trunc_length=5), "truncation": LogUniformLengthSchedule(8, 20), "initial_offset": 3}


def _digits_meta(**kwargs):
    task = ImageMLPTask("digits", widths=[8, 16], depth=2, batch_size=16)
    return MetaTrainer("mulo", tasks=[task], **{**SMALL, **kwargs})


def _theta(meta):
    return {k: v.detach().clone() for k, v in meta.lopt.state_dict().items()}


def test_full_checkpoint_resume_is_exact(tmp_path, fit_kwargs):
    reference = _digits_meta(seed=3)
    L.Trainer(**fit_kwargs(tmp_path / "a", 6)).fit(reference)

    first = _digits_meta(seed=3)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    L.Trainer(**fit_kwargs(tmp_path / "b", 3, enable_checkpointing=True, callbacks=[ckpt])).fit(first)
    resumed = _digits_meta(seed=3)
    L.Trainer(**fit_kwargs(tmp_path / "c", 6)).fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))

    for name, value in _theta(reference).items():
        torch.testing.assert_close(_theta(resumed)[name], value, rtol=0, atol=0, msg=name)
    # Steps 4–6 moved θ: the equality above is not the trivial one.
    assert not torch.equal(_theta(reference)["mlp.0.weight"], _theta(first)["mlp.0.weight"])


def test_light_checkpoint_resumes_the_schedule_and_keeps_learning(tmp_path, fit_kwargs):
    meta = _digits_meta()
    light = tmp_path / "light"
    L.Trainer(**fit_kwargs(tmp_path, 4, callbacks=[LightCheckpoint(light, every_n_steps=2)])).fit(meta)
    state = json.loads((light / META_STATE_JSON).read_text())
    assert state["meta_step"] == 4
    assert sum(f.stat().st_size for f in light.iterdir()) < 2_000_000  # a few hundred KB: commit-safe
    # The light checkpoint is also a learned-optimizer directory.
    opt = LO(nn.Linear(3, 3).parameters(), meta_weights=str(light))
    torch.testing.assert_close(opt.meta_weights.state_dict()["mlp.0.weight"], _theta(meta)["mlp.0.weight"])

    resumed = _digits_meta(resume_from=str(light))
    torch.testing.assert_close(_theta(resumed), _theta(meta))
    trainer = L.Trainer(**fit_kwargs(tmp_path / "r", 7))
    trainer.fit(resumed)
    assert trainer.global_step == 7  # continued from step 4, not from 0
    saved = resumed.optimizers().optimizer.state_dict()["state"][0]["step"]
    assert float(saved) == 7  # AdamW's own counter continued too
    assert not torch.equal(_theta(resumed)["mlp.0.weight"], _theta(meta)["mlp.0.weight"])


class UserMLP(L.LightningModule):
    """Written as a user would: plain layers, self.log, no meta-learning code."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log_dict({"lr_dummy": 1.0})
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


class UserData(L.LightningDataModule):
    num_classes = 3

    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(200, 4, generator=g)
        self.data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def test_fine_tunes_a_users_lightning_module_and_datamodule_unchanged(tmp_path, fit_kwargs):
    start = tmp_path / "start"
    SmallFCLOpt(step_mult=0.001).save_pretrained(start)
    task = Task(UserMLP, UserData(), module_kwargs={"width": 8}, widths=[8, 12])
    meta = MetaTrainer("lo", tasks=[task], init_from=str(start), **SMALL)
    assert [i.label for i in meta.instances] == ["UserMLP-w8", "UserMLP-w12"]
    assert meta.instances[0].loss_cap == pytest.approx(1.5 * torch.log(torch.tensor(3.0)).item())
    before = _theta(meta)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        L.Trainer(**fit_kwargs(tmp_path, 3)).fit(meta)
    assert not [w for w in record if "log" in str(w.message)]  # self.log inside the unroll is silent
    after = _theta(meta)
    assert not torch.equal(before["mlp.0.weight"], after["mlp.0.weight"])
    meta.save_pretrained(tmp_path / "tuned")
    card = json.loads((tmp_path / "tuned" / "card.json").read_text())
    assert card["tasks"] == ["UserMLP-w8", "UserMLP-w12"] and card["meta_training_steps"] == 3


def test_divergence_is_reset_counted_logged_and_theta_stays_finite(tmp_path, fit_kwargs):
    task = Task(Quadratic, ConstantData(), module_kwargs={"curvatures": (1.0, 1.0)}, loss_cap=5.0)
    meta = MetaTrainer(LearnedSGD(log_lr=2.0), tasks=[task], estimator=PES(num_pairs=2, trunc_length=30),
                       truncation=LogUniformLengthSchedule(1000, 1000), initial_offset=0)
    logged = []

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.append(float(trainer.callback_metrics["meta/nan_resets"]))

    L.Trainer(**fit_kwargs(tmp_path, 3, callbacks=[Grab()])).fit(meta)
    assert sum(logged) >= 1
    assert all(torch.isfinite(p).all() for p in meta.lopt.parameters())


def test_bad_configurations_fail_before_compute():
    task = ImageMLPTask("digits", widths=[8], depth=2, batch_size=16)
    with pytest.raises(ValueError, match="longer than the longest episode"):
        MetaTrainer("mulo", tasks=[task], estimator=PES(trunc_length=50), truncation=LogUniformLengthSchedule(10, 40))
    with pytest.raises(ValueError, match="unknown learned optimizer"):
        MetaTrainer("adamw", tasks=[task])
    with pytest.raises(ValueError, match="at least one Task"):
        MetaTrainer("mulo", tasks=[])
    with pytest.raises(ValueError, match="unknown dataset"):
        ImageMLPTask("imagenet")
    with pytest.raises(ValueError, match="no μP update scales"):
        MetaTrainer("mulo", tasks=[Task(UserMLP, UserData())])

    class NoLoss(UserMLP):
        def training_step(self, batch, batch_idx):
            self.log("x", 1.0)

    with pytest.raises(ValueError, match="must return the loss"):
        MetaTrainer("lo", tasks=[Task(NoLoss, UserData())])
    from lightning_lopt.models import MuViT
    from lightning_lopt.optimizee import OptimizeeModule

    def vit(seed, width):
        return OptimizeeModule(MuViT(8, 4, width, 2, 3, 2, 10))

    with pytest.raises(ValueError, match="divisible by heads"):
        Task(vit, ImageMLPTask("digits").datamodule, widths=[16]).build(lopt_is_mu=True)
    with pytest.raises(ValueError, match="celo only"):
        MetaTrainer("mulo", tasks=[task], stage=1)


def test_missing_data_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_LOPT_DATA", str(tmp_path / "empty"))
    from lightning_lopt.datamodules import paths

    monkeypatch.setattr(paths, "debian_dir", lambda key: None)
    with pytest.raises(FileNotFoundError, match="lightning_lopt.datamodules.fetch"):
        MetaTrainer("mulo", tasks=[ImageMLPTask("fashion_mnist", root=tmp_path / "none")])


@pytest.mark.slow
def test_digits_tiny_learns_to_beat_its_random_initialisation(tmp_path, fit_kwargs):
    meta = MetaTrainer(
        "mulo",
        tasks=[ImageMLPTask("digits", image_size=8, widths=[32], depth=2, batch_size=64)],
        estimator=PES(num_pairs=4, trunc_length=20),
        truncation=LogUniformLengthSchedule(50, 200),
        initial_offset=20,
    )
    inst = meta.instances[0]
    before = float(inner_loss_curve(meta.lopt, inst, 200, range(4))[-10:].mean())
    L.Trainer(**fit_kwargs(tmp_path, 120)).fit(meta)
    after = float(inner_loss_curve(meta.lopt, inst, 200, range(4))[-10:].mean())
    assert after < 0.6 * before, (before, after)


def _held_out_step_error(lopt, inst, *, lr: float, steps: int, seed: int = 12345) -> float:
    """Mean ‖Δ_θ − Δ_μAdam‖² / ‖Δ_μAdam‖² along one fresh μAdam trajectory, written out here.

    Independent of warm_start.py's loop: one seed, no vmap, plain autograd, Adam by hand; tensors
    whose μAdam step is exactly zero are skipped (they have no relative error).
    """
    from lightning_lopt.optim.functional import StepContext

    theta = {k: v.detach() for k, v in lopt.state_dict().items()}
    params = [p.clone() for p in inst.init(seed)]
    state = lopt.functional.init_state(theta, params, layout=lopt.layout)
    batches = inst.sample(steps, [torch.Generator().manual_seed(seed)])
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    errors = []
    for t in range(steps):
        batch = inst.batch_at(batches, t, 0)
        leaves = [p.requires_grad_(True) for p in params]
        loss = inst.loss(dict(zip(inst.names, leaves)), batch)
        grads = torch.autograd.grad(loss, leaves)
        params = [p.detach() for p in params]
        teacher = []
        for g, mi, vi, s in zip(grads, m, v, inst.scales):
            mi.mul_(0.9).add_(0.1 * g)
            vi.mul_(0.999).add_(0.001 * g * g)
            teacher.append(lr * s * (mi / (1 - 0.9 ** (t + 1))) / ((vi / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8))
        with torch.no_grad():
            new, state = lopt.pure_step(theta, params, list(grads), state, StepContext(inst.scales, loss.detach(), steps))
        for p, n, d in zip(params, new, teacher):
            if float((d**2).sum()) > 0:
                errors.append(float(((p - n - d) ** 2).sum() / (d**2).sum()))
        params = [p - d for p, d in zip(params, teacher)]
    return sum(errors) / len(errors)


def test_warm_start_moves_the_learned_step_towards_adam_and_is_on_the_card(tmp_path, fit_kwargs):
    from lightning_lopt.meta.warm_start import WarmStart

    warm = WarmStart(lr=0.03, steps=30, seeds=2, every=1, fit_lr=1e-2)
    meta = _digits_meta(warm_start=warm)
    inst = meta.instances[1]
    before = _held_out_step_error(meta.lopt, inst, lr=warm.lr, steps=warm.steps)
    L.Trainer(**fit_kwargs(tmp_path, 1)).fit(meta)
    after = _held_out_step_error(meta.lopt, inst, lr=warm.lr, steps=warm.steps)
    # On a trajectory the fit never saw, the learned step is much closer to μAdam's than before.
    assert after < 0.5 * before, (before, after)
    report = meta.warm_start_report
    # The card's errors are the same relative errors (measured here: about 1.1 before, 0.2 after),
    # not the ~1e25 that a zero teacher step divided by a tiny constant gave.
    for errors in (report["relative_error_start"], report["relative_error_end"]):
        assert set(errors) == {"mlp-digits8-d2-mup-w8", "mlp-digits8-d2-mup-w16"}
        assert all(0 < e < 10 for e in errors.values()), report
    # The first instance is fitted first: its error falls within its own fits.
    assert report["relative_error_end"]["mlp-digits8-d2-mup-w8"] < 0.8 * report["relative_error_start"]["mlp-digits8-d2-mup-w8"]
    meta.save_pretrained(tmp_path / "out")
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["recipe"]["warm_start"]["settings"]["teacher"] == "muadam"


def test_loss_cap_is_inferred_from_the_loss_at_initialisation_when_no_class_count_is_declared():
    # ½·(1·3² + 2·3²) = 13.5 at the start; no num_classes anywhere.
    task = Task(Quadratic, ConstantData(), module_kwargs={"curvatures": (1.0, 2.0), "start": 3.0})
    meta = MetaTrainer(LearnedSGD(), tasks=[task], **SMALL)
    assert meta.instances[0].loss_cap == pytest.approx(1.5 * 13.5)
    override = Task(Quadratic, ConstantData(), module_kwargs={"curvatures": (1.0, 2.0), "start": 3.0}, loss_cap=4.0)
    assert MetaTrainer(LearnedSGD(), tasks=[override], **SMALL).instances[0].loss_cap == 4.0
    # A loss that starts at 0 gives nothing to scale: the error says what to pass.
    zero = Task(Quadratic, ConstantData(), module_kwargs={"curvatures": (1.0,), "start": 0.0})
    with pytest.raises(ValueError, match=r"loss at initialisation \(0\) .*pass Task\(loss_cap=\.\.\.\)"):
        MetaTrainer(LearnedSGD(), tasks=[zero], **SMALL)


@pytest.mark.parametrize("kind", ["loss", "log"])
def test_pes_differentiates_the_chosen_meta_objective_of_the_window(kind, tmp_path, fit_kwargs, monkeypatch):
    """The ± difference PES receives is that of the window's normalised losses (``"loss"``) or of their
    floored logarithms (``"log"``); the logged meta-loss is the normalised loss either way."""
    from lightning_lopt.meta import estimator

    seen = []
    finish, gradient = estimator.TaskWorker.finish, estimator.pes_gradient

    def recording_finish(self, particles, out, eps):
        seen.append({"losses": out.losses.clone(), "n": eps.shape[0]})
        result = finish(self, particles, out, eps)
        seen[-1]["meta_loss"] = result.meta_loss
        return result

    def recording_gradient(delta, *args, **kwargs):
        seen[-1]["delta"] = delta.clone()
        return gradient(delta, *args, **kwargs)

    monkeypatch.setattr(estimator.TaskWorker, "finish", recording_finish)
    monkeypatch.setattr(estimator, "pes_gradient", recording_gradient)
    meta = _digits_meta(meta_objective=kind)
    L.Trainer(**fit_kwargs(tmp_path, 2)).fit(meta)
    assert meta.card()["recipe"]["meta_objective"] == kind
    assert len(seen) == 4  # 2 meta-steps x 2 widths
    for record in seen:
        losses, n = record["losses"], record["n"]
        assert float(losses.max()) > 0.5  # real cross-entropies, where log and loss differ
        objective = losses if kind == "loss" else torch.log(losses.clamp(min=1e-3))
        torch.testing.assert_close(record["delta"], objective[:, :n] - objective[:, n:], rtol=0, atol=0)
        masked = losses[losses > 0]
        assert abs(record["meta_loss"] - float(masked.mean())) < 0.05 * float(masked.mean())  # normalised loss


def test_a_full_checkpoint_of_another_meta_objective_is_refused():
    from lightning_lopt.meta.checkpoint import check_same_run

    check_same_run({"lopt": "mulo"}, {"lopt": "mulo", "meta_objective": "loss"})  # written before the entry: "loss"
    with pytest.raises(ValueError, match="meta_objective: checkpoint 'loss', recipe 'log'"):
        check_same_run({"lopt": "mulo"}, {"lopt": "mulo", "meta_objective": "log"})
    with pytest.raises(ValueError, match="meta_objective must be one of"):
        _digits_meta(meta_objective="mse")
