import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lopt import cli
from lightning_lopt.quickstart import run_default_job

ROOT = Path(__file__).resolve().parents[1]


def test_default_job_compares_mulo_and_adamw_and_writes_one_plot(tmp_path):
    summaries = run_default_job(out_dir=tmp_path, max_steps=60)
    assert list(summaries) == ["mulo", "adamw"]
    for summary in summaries.values():
        assert summary["steps"] == 60
    assert summaries["adamw"]["val_acc"] > 0.7  # chance is 0.1
    assert summaries["adamw"]["val_loss"] < 1.5
    png = tmp_path / "loss_curve.png"
    assert png.stat().st_size > 5_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_lightning_cli_fit_with_optimizer_class(tmp_path):
    lcli = cli.lightning_cli(
        [
            "fit",
            "--optimizer", "lightning_lopt.MuAdam",
            "--optimizer.lr", "0.02",
            "--trainer.max_steps", "5",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )
    (opt,) = lcli.trainer.optimizers
    assert type(opt).__name__ == "MuAdam"
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.02 / 128, 0.02])
    assert lcli.trainer.global_step == 5


@pytest.mark.parametrize("schedule", [None, "warmup-cosine"])
def test_lightning_cli_trainer_optimizer_option(tmp_path, schedule):
    lcli = cli.lightning_cli(
        [
            "fit",
            "--trainer.optimizer", "sgd",
            "--trainer.optimizer_kwargs", "{lr: 0.3}",
            *(["--trainer.lr_schedule", schedule] if schedule else []),
            "--trainer.max_steps", "3",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )
    (opt,) = lcli.trainer.optimizers
    assert type(opt).__name__ == "SGD"
    if schedule is None:
        assert opt.param_groups[0]["lr"] == 0.3 and not lcli.trainer.lr_scheduler_configs
    else:  # stepped every optimizer step over the 3 steps: the cosine has reached zero
        (config,) = lcli.trainer.lr_scheduler_configs
        assert config.interval == "step" and config.scheduler.num_steps == 3
        assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
        assert config.scheduler.base_lrs == [0.3]


def test_lightning_cli_trainer_param_groups_by_role(tmp_path):
    lcli = cli.lightning_cli(
        [
            "fit",
            "--trainer.optimizer", "sgd",
            "--trainer.optimizer_kwargs", "{lr: 0.3}",
            "--trainer.param_groups_by_role", "{hidden_lr_mult: 2.0, vector_lr_mult: 0.5}",
            "--trainer.max_steps", "1",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )
    (opt,) = lcli.trainer.optimizers
    scales = lcli.model.update_scales()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in lcli.model.named_parameters():
        expected = 0.6 if scales[name] < 1.0 else 0.15 if p.ndim == 1 else 0.3  # hidden x2, 1-D x0.5
        assert lr_of[id(p)] == pytest.approx(expected), name
    assert sorted(set(lr_of.values())) == pytest.approx([0.15, 0.3, 0.6])


def test_unknown_command_and_help(capsys):
    with pytest.raises(SystemExit, match="unknown command 'fitt'"):
        cli.main(["fitt"])
    cli.main(["--help"])
    assert "coord-check" in capsys.readouterr().out


@pytest.mark.slow
def test_train_py_without_arguments_runs_the_main_job(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py")], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val" in result.stdout and "acc" in result.stdout  # the summary table's header
    assert "weights=mulo-fmnist8-w32-128" in result.stdout  # its settings, whole at 80 columns
    assert (tmp_path / "outputs" / "default" / "loss_curve.png").exists()
