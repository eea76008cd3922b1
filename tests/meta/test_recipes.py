"""The meta-training recipes in configs/meta parse, and the small ones run end to end via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_lopt.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs" / "meta").glob("*.yaml"))
EXPECTED = {
    "digits_tiny", "finetune_example", "mulo_s", "mulo_m", "lo_s", "lo_m", "mulo_s_cpu", "mulo_m_cpu",
    "lo_s_cpu", "lo_m_cpu", "celo_stage1", "celo_stage2", "celo_stage1_cpu", "celo_stage2_cpu",
}


def test_every_recipe_is_there_and_says_what_it_reproduces():
    assert EXPECTED <= {p.stem for p in RECIPES}
    for path in RECIPES:
        assert path.read_text().startswith("#"), f"{path.name}: start with a comment on what it reproduces"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["meta-fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "lopt:" in capsys.readouterr().out


def test_digits_tiny_and_finetune_example_run_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes write under runs/
    monkeypatch.syspath_prepend(str(ROOT))  # examples.user_task, as `python train.py` from the repo root
    quiet = ["--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    main(["meta-fit", "--config", str(ROOT / "configs/meta/digits_tiny.yaml"), *quiet])
    light = tmp_path / "runs" / "digits_tiny" / "light"
    assert json.loads((light / "meta_state.json").read_text())["meta_step"] == 2
    main(["meta-fit", "--config", str(ROOT / "configs/meta/finetune_example.yaml"), "--model.init_from", str(light), *quiet])
    card = json.loads((tmp_path / "runs" / "finetune_example" / "light" / "card.json").read_text())
    assert card["tasks"] == ["DigitsClassifier-w32", "DigitsClassifier-w64"]


def test_every_recipe_writes_periodic_full_checkpoints():
    import yaml

    for path in RECIPES:
        trainer = yaml.safe_load(path.read_text())["trainer"]
        full = [c for c in trainer.get("callbacks", []) if c["class_path"].endswith("ModelCheckpoint")]
        assert trainer.get("enable_checkpointing") is True, path.name
        assert full and full[0]["init_args"].get("every_n_train_steps"), f"{path.name}: no periodic full checkpoint"
        assert full[0]["init_args"].get("save_last"), path.name


def _theta_of(light: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(light / name))


@pytest.mark.slow
def test_meta_fit_ckpt_path_resumes_bit_exactly_from_the_command_line(tmp_path, monkeypatch, capsys):
    recipe = str(ROOT / "configs/meta/digits_tiny.yaml")
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    (tmp_path / "straight").mkdir()
    (tmp_path / "split").mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    main(["meta-fit", "--config", recipe, "--trainer.max_steps", "4", *quiet])
    monkeypatch.chdir(tmp_path / "split")
    main(["meta-fit", "--config", recipe, "--trainer.max_steps", "2", *quiet])
    ckpt = tmp_path / "split" / "runs" / "digits_tiny" / "full" / "last.ckpt"
    assert ckpt.is_file()  # the recipe writes a full checkpoint before the end of the run
    between = _theta_of(tmp_path / "split" / "runs" / "digits_tiny" / "light")
    main(["meta-fit", "--config", recipe, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt), *quiet])
    light = Path("runs/digits_tiny/light")
    assert json.loads((light / "meta_state.json").read_text())["meta_step"] == 4
    expected = _theta_of(tmp_path / "straight" / "runs" / "digits_tiny" / "light")
    resumed = _theta_of(light)
    assert set(resumed) == set(expected)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    assert any(not torch.equal(between[n], expected[n]) for n in expected)  # steps 3-4 moved θ
    # The meta-optimizer (AdamW's moments and step) continued exactly too.
    moments = _theta_of(tmp_path / "straight" / "runs" / "digits_tiny" / "light", "meta_state.safetensors")
    resumed_moments = _theta_of(light, "meta_state.safetensors")
    assert set(moments) == set(resumed_moments) and all(torch.equal(resumed_moments[k], v) for k, v in moments.items())

    # A checkpoint of another run is refused before any compute, in one line naming what differs.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["meta-fit", "--config", recipe, "--trainer.max_steps", "5", "--model.seed", "1", "--ckpt_path", str(ckpt), *quiet])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: MetaTrainer: the checkpoint comes from a different run (seed: checkpoint 0, recipe 1)" in err
    assert "Traceback" not in err
