"""The runner: seeds, divergence, the cache and resuming (lightning_lopt.eval.runner, .store)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_lopt.eval import runner, store
from lightning_lopt.eval.optimizers import Setting, parse_optimizer
from lightning_lopt.eval.runner import RunSpec, execute, train
from lightning_lopt.eval.tasks import CAP_FACTOR, Family, Task

FAMILY = Family.from_dict(
    "mlp_tiny",
    {"model": "mlp", "data": "digits", "data_kwargs": {"image_size": 8}, "batch_size": 32, "base_width": 16, "eval_examples": 64},
)


def spec(optimizer: str = "adamw", seed: int = 0, steps: int = 30, width: int = 16, **values: Any) -> RunSpec:
    return RunSpec(Task(FAMILY, width, 3, steps), parse_optimizer(optimizer), Setting(values or {"lr": 1e-2}), seed)


def test_the_same_seed_gives_the_same_curve_and_another_seed_another() -> None:
    first, again, other = train(spec(seed=0)), train(spec(seed=0)), train(spec(seed=1))
    assert np.array_equal(first.train_loss, again.train_loss)
    assert first.test_loss == again.test_loss
    assert not np.array_equal(first.train_loss, other.train_loss)
    assert first.train_loss[-1] < first.train_loss[0]  # it trains


def test_seed_fixes_init_and_data_for_every_optimizer_and_length() -> None:
    # The first loss is measured before any update: same init and same first batch whatever the
    # optimizer; a longer run starts with the batches (and so the curve) of a shorter one.
    adamw, sgd = train(spec("adamw", steps=10)), train(spec("sgd", steps=10, lr=0.1))
    assert adamw.train_loss[0] == sgd.train_loss[0]
    longer = train(spec("adamw", steps=60))
    assert np.array_equal(longer.train_loss[:10], adamw.train_loss)


def test_learned_optimizers_and_mu_multipliers_run() -> None:
    mulo = train(RunSpec(Task(FAMILY, 16, 3, 20), parse_optimizer("mulo"), Setting({}), 0))
    assert np.isfinite(mulo.train_loss).all()
    base = train(spec("muadam", lr=0.1))
    tuned = train(spec("muadam", lr=0.1, input_mult=4.0, output_mult=0.25, hidden_lr_mult=4.0))
    assert base.train_loss[0] != tuned.train_loss[0]  # the multipliers change the forward pass


def _module(param: str = "mup") -> torch.nn.Module:
    """A fresh width-16 optimizee of FAMILY (initialised from torch's global seed)."""
    from lightning_lopt.eval.tasks import build_model
    from lightning_lopt.optimizee import OptimizeeModule

    return OptimizeeModule(build_model(Task(FAMILY, 16, 3, 10), param, FAMILY.source()), num_classes=10)


def _one_step(name: str, values: dict[str, Any], param: str = "mup") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The parameters before and after one step of ``name`` built by the evaluation with ``values``,
    from the same initialisation and batch every call."""
    from lightning_lopt.eval.optimizers import make_optimizer

    x, y = (t[0] for t in FAMILY.source().sample(32, 1, torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    module = _module(param)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    opt = make_optimizer(parse_optimizer(name), Setting(values), module, 10)
    torch.nn.functional.cross_entropy(module(x), y).backward()
    opt.step()
    return before, {n: p.detach().clone() for n, p in module.named_parameters()}


def test_hidden_lr_multiplier_reaches_the_hidden_param_group() -> None:
    from lightning_lopt.eval.optimizers import make_optimizer

    opt = make_optimizer(parse_optimizer("muadam"), Setting({"lr": 0.1, "hidden_lr_mult": 4.0}), _module(), 10)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    # hidden matrices: 0.1 * 4 * (1/16); everything else: 0.1
    assert lrs == pytest.approx([0.1 * 4 / 16, 0.1])


@pytest.mark.parametrize("name", ["adamw", "mulo"])
def test_vector_weight_decay_decays_the_1d_tensors_only(name: str) -> None:
    # Decoupled weight decay is p <- p - lr * wd * p before the update, which does not depend on it:
    # one step with vector_weight_decay = 0.5 differs from one with 0 by exactly lr * 0.5 * p on the
    # 1-D tensors and not at all elsewhere.
    before, after = {}, {}
    for vwd in (0.0, 0.5):
        before, after[vwd] = _one_step(name, {"lr": 0.01, "vector_weight_decay": vwd})
    vectors = [n for n, p in before.items() if p.ndim == 1]
    assert vectors and len(vectors) < len(before)
    for n, p in before.items():
        expected = 0.01 * 0.5 * p if p.ndim == 1 else torch.zeros_like(p)
        torch.testing.assert_close(after[0.0][n] - after[0.5][n], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "mulo"])
def test_vector_lr_mult_scales_the_1d_tensors_steps_only(name: str) -> None:
    # Without weight decay both optimizers' steps are proportional to lr (AdamW: lr * m / (sqrt(v) +
    # eps); MuLO: lr times its learned step), so vector_lr_mult = 0.25 makes the 1-D tensors' first
    # step exactly a quarter of the default one and leaves every other tensor's step unchanged.
    before, steps = {}, {}
    for mult in (1.0, 0.25):
        # the parametrization the evaluation gives it (SP for AdamW: every tensor moves)
        before, after = _one_step(name, {"lr": 0.01, "weight_decay": 0.0, "vector_lr_mult": mult}, parse_optimizer(name).param)
        steps[mult] = {n: after[n] - before[n] for n in before}
    moved = {n for n, d in steps[1.0].items() if d.abs().max() > 0}  # (μP's zero readout stops some at step 1)
    vectors = {n for n, d in steps[1.0].items() if d.ndim == 1}
    assert vectors <= moved and moved - vectors, "the comparison below needs moving vectors and matrices"
    for n, step in steps[1.0].items():
        expected = 0.25 * step if step.ndim == 1 else step
        # p_new − p loses up to an ulp of p: the tolerance, far below the 0.75·step a missing multiplier leaves
        ulp = torch.finfo(torch.float32).eps * float(before[n].abs().max())
        torch.testing.assert_close(steps[0.25][n], expected, rtol=1e-5, atol=2 * ulp)


@pytest.mark.parametrize("mult", [0.0, -1.0, float("nan")])
def test_lr_multipliers_must_be_positive_and_need_an_lr(mult: float) -> None:
    from lightning_lopt.eval.optimizers import make_optimizer

    module = _module()
    for key in ("vector_lr_mult", "hidden_lr_mult"):
        with pytest.raises(ValueError, match=key):
            make_optimizer(parse_optimizer("adamw"), Setting({"lr": 0.01, key: mult}), module, 10)
    with pytest.raises(ValueError, match="vector_lr_mult needs an explicit lr"):
        make_optimizer(parse_optimizer("adamw"), Setting({"vector_lr_mult": 0.5}), module, 10)


def test_vector_weight_decay_must_be_a_non_negative_number() -> None:
    from lightning_lopt.eval.optimizers import make_optimizer

    with pytest.raises(ValueError, match="vector_weight_decay"):
        make_optimizer(parse_optimizer("adamw"), Setting({"vector_weight_decay": -1.0}), _module(), 10)


def test_a_diverged_run_is_recorded_with_its_loss_capped(tmp_path: Path) -> None:
    diverging = spec(lr=50.0, steps=60)
    record = execute([diverging], tmp_path, progress=False)[diverging.key]
    cap = CAP_FACTOR * math.log(10)
    assert record.diverged and record.diverged_at is not None and record.diverged_at <= 60
    assert record.cap == pytest.approx(cap)
    assert len(record.train_loss) == 60
    assert np.all(record.train_loss[record.diverged_at - 1 :] == cap)
    assert np.all(record.train_loss <= cap) and np.isfinite(record.train_loss).all()
    assert record.eval_steps == sorted(set(record.eval_steps)) and record.eval_steps[-1] == 60
    after = [loss for step, loss in zip(record.eval_steps, record.test_loss) if step >= record.diverged_at]
    assert after and all(loss == pytest.approx(cap) for loss in after)
    assert math.isnan(record.test_acc[-1])
    stored = store.load(diverging.directory(tmp_path))  # kept in the cache, never dropped
    assert stored is not None and stored.diverged_at == record.diverged_at
    assert np.array_equal(stored.train_loss, record.train_loss)


def test_cache_round_trip_and_no_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = [spec(seed=0), spec(seed=1), spec(seed=0)]  # the duplicate runs once
    first = execute(specs, tmp_path, progress=False)
    assert len(first) == 2
    directory = specs[0].directory(tmp_path)
    assert (directory / store.RESULT_NAME).is_file() and (directory / store.CURVE_NAME).is_file()

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(runner, "train", no_training)
    again = execute(specs, tmp_path, progress=False)
    for key, record in again.items():
        assert record.cached
        assert np.allclose(record.train_loss, first[key].train_loss)
        assert record.eval_steps == first[key].eval_steps
        assert np.allclose(record.test_loss, first[key].test_loss)


def test_the_config_hash_changes_with_anything_that_changes_the_curve() -> None:
    keys = {
        spec().key, spec(lr=2e-2).key, spec(seed=1).key, spec(width=32).key, spec(steps=31).key,
        spec("muadam").key, RunSpec(Task(FAMILY, 16, 2, 30), parse_optimizer("adamw"), Setting({"lr": 1e-2}), 0).key,
    }  # fmt: skip
    assert len(keys) == 7
    assert spec().key == spec().key


def test_an_interrupted_suite_resumes_without_redoing_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = [spec(seed=s) for s in range(3)]
    calls: list[int] = []
    real_train = runner.train

    def interrupt_at_third(s: RunSpec, *args: Any, **kwargs: Any) -> Any:
        if s.seed == 2:
            raise KeyboardInterrupt
        calls.append(s.seed)
        return real_train(s, *args, **kwargs)

    monkeypatch.setattr(runner, "train", interrupt_at_third)
    with pytest.raises(KeyboardInterrupt):
        execute(specs, tmp_path, progress=False)
    assert calls == [0, 1]
    # A run killed while writing leaves its curve but no result.json: it is not complete.
    partial = specs[2].directory(tmp_path)
    partial.mkdir(parents=True)
    (partial / store.CURVE_NAME).write_text("step,train_loss,test_loss,test_acc\n")

    def count(s: RunSpec, *args: Any, **kwargs: Any) -> Any:
        calls.append(s.seed)
        return real_train(s, *args, **kwargs)

    monkeypatch.setattr(runner, "train", count)
    records = execute(specs, tmp_path, progress=False)
    assert calls == [0, 1, 2]
    assert len(records) == 3 and store.load(partial) is not None


def test_cpu_runs_are_single_threaded(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_step = torch.optim.AdamW.step

    def watch(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", watch)
    torch.set_num_threads(2)
    try:
        train(spec(steps=3))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(1)
