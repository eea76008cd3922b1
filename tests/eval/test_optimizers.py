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
