"""Parsing ``--optimizers`` entries and the settings they run with (lightning_lopt.eval.optimizers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_lopt.eval.optimizers import Setting, parse_optimizer, uses_random_weights, weights_identity
from lightning_lopt.optim.architectures import SmallFCLOpt


@pytest.mark.parametrize(
    ("text", "factory", "param", "weights"),
    [
        ("mulo", "mulo", "mup", None),
        ("LO", "lo", "sp", None),
        ("adamw", "adamw", "sp", None),
        ("muadam", "muadam", "mup", None),
        ("mulo:runs/my-mulo", "mulo", "mup", "runs/my-mulo"),
        ("adamw@mup", "adamw", "mup", None),
        ("torch.optim:SGD", "torch.optim:SGD", "sp", None),
        ("torch.optim.RMSprop", "torch.optim:RMSprop", "sp", None),
        ("lightning_lopt.optim.baselines:MuAdam", "lightning_lopt.optim.baselines:MuAdam", "mup", None),
    ],
)
def test_forms(text: str, factory: str, param: str, weights: str | None) -> None:
    spec = parse_optimizer(text)
    assert (spec.factory, spec.param, spec.meta_weights, spec.label) == (factory, param, weights, text)
    assert callable(spec.resolve())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adam", "unknown optimizer 'adam'"),
        ("adamw:some/path", "takes no learned-optimizer weights"),
        ("mulo:", "empty weights"),
        ("mulo@mu", "@mup or @sp"),
        ("no_such_module.Opt", "cannot import"),
    ],
)
def test_bad_entries_say_what_is_accepted(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_optimizer(text)


def test_weights_are_identified_by_their_file_hash(tmp_path: Path) -> None:
    assert weights_identity(parse_optimizer("adamw")) is None
    # No weights named: the packaged default, identified by its file.
    default = weights_identity(parse_optimizer("mulo"))
    assert default is not None and default.startswith("mulo-fmnist8-w32-128 (sha256 ")
    assert not uses_random_weights(parse_optimizer("mulo"))
    lopt = SmallFCLOpt()
    lopt.save_pretrained(tmp_path / "w")
    first = weights_identity(parse_optimizer(f"mulo:{tmp_path / 'w'}"))
    assert first is not None and "sha256" in first and not uses_random_weights(parse_optimizer(f"mulo:{tmp_path / 'w'}"))
    with torch.no_grad():
        next(lopt.parameters()).add_(1.0)
    lopt.save_pretrained(tmp_path / "w")  # re-trained weights at the same path: a new identity
    assert weights_identity(parse_optimizer(f"mulo:{tmp_path / 'w'}")) != first


def test_setting_splits_model_group_and_optimizer_values() -> None:
    setting = Setting({"lr": 0.1, "input_mult": 0.25, "output_mult": 4, "hidden_lr_mult": 2.0})
    assert setting.optimizer_kwargs == {"lr": 0.1}
    assert setting.model_kwargs == {"input_mult": 0.25, "output_mult": 4.0}
    assert setting.hidden_lr_mult == 2.0
    assert Setting().hidden_lr_mult == 1.0


def test_cosine_variants_parse_and_are_tuned_under_their_own_name() -> None:
    spec = parse_optimizer("adamw-cosine")
    assert (spec.factory, spec.param, spec.schedule, spec.tuned_name, spec.label) == ("adamw", "sp", "cosine", "adamw-cosine", "adamw-cosine")
    mu = parse_optimizer("muadam-cosine")
    assert (mu.factory, mu.param, mu.tuned_name) == ("muadam", "mup", "muadam-cosine")
    assert parse_optimizer("adamw").schedule is None and parse_optimizer("adamw").tuned_name == "adamw"
    # A learned optimizer's lr multiplies its step, so it runs under the schedule too (untuned: peak 1).
    lo = parse_optimizer("mulo-cosine")
    assert (lo.factory, lo.param, lo.schedule, lo.is_learned) == ("mulo", "mup", "cosine", True)
    with_weights = parse_optimizer("mulo-cosine:some/dir")
    assert (with_weights.factory, with_weights.schedule, with_weights.meta_weights) == ("mulo", "cosine", "some/dir")
    with pytest.raises(ValueError, match="unknown optimizer"):
        parse_optimizer("nope-cosine")
    with pytest.raises(ValueError, match="takes no learned-optimizer weights"):
        parse_optimizer("adamw-cosine:some/dir")


def test_a_cosine_run_steps_its_schedule_and_keys_apart_from_the_constant_one() -> None:
    from lightning_lopt.eval.runner import RunSpec, train
    from lightning_lopt.eval.tasks import Family, Task

    family = Family.from_dict("mlp_tiny", {"model": "mlp", "data": "digits", "data_kwargs": {"image_size": 8},
                                           "batch_size": 32, "base_width": 16, "tune_steps": 20, "eval_examples": 64})  # fmt: skip
    task = Task(family, 16, 2, 40)
    const = RunSpec(task, parse_optimizer("adamw"), Setting({"lr": 1e-2}), 0)
    cosine = RunSpec(task, parse_optimizer("adamw-cosine"), Setting({"lr": 1e-2}), 0)
    assert "schedule" not in const.identity()["optimizer"]  # constant-rate cache keys are unchanged
    assert const.key != cosine.key
    a, b = train(const), train(cosine)
    # Step 0 runs at lr 1e-2 / 2 (warmup of 2 steps) against 1e-2: the curves part from step 1 on.
    assert a.train_loss[0] == b.train_loss[0] and a.train_loss[1] != b.train_loss[1]


def test_a_changed_default_keys_runs_apart_only_where_the_class_names_it() -> None:
    """MuCelo2's hidden_norm default enters the cache key (runs cached under the RMS rule are not
    reused as the new default's), an explicit setting replaces it, and other optimizers' keys do not
    change."""
    from lightning_lopt.eval.runner import RunSpec
    from lightning_lopt.eval.tasks import Family, Task

    family = Family.from_dict("mlp_tiny", {"model": "mlp", "data": "digits", "data_kwargs": {"image_size": 8},
                                           "batch_size": 32, "base_width": 16, "tune_steps": 20, "eval_examples": 64})  # fmt: skip
    task = Task(family, 16, 2, 40)
    default = RunSpec(task, parse_optimizer("mucelo2"), Setting({}), 0).identity()["optimizer"]
    assert default["defaults"] == {"hidden_norm": "spectral"}
    rms = RunSpec(task, parse_optimizer("mucelo2"), Setting({"hidden_norm": "rms"}), 0).identity()["optimizer"]
    assert "defaults" not in rms and rms["setting"] == {"hidden_norm": "rms"}
    for name in ("mulo", "celo2", "adamw"):
        assert "defaults" not in RunSpec(task, parse_optimizer(name), Setting({}), 0).identity()["optimizer"]
