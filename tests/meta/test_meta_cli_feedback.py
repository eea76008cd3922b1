"""meta-fit from the command line: the step axis and the bar continue a resumed run, a resume with
nothing left to run says so, Lightning's noise is filtered (narrowly), bad input is one line."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import pytest

from lightning_lopt.cli import main
from lightning_lopt.quiet import known_noise_filtered

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs/meta/digits_tiny.yaml")
NOISE = ("LightningCLI's args parameter", "LeafSpec", "Using ModelCheckpoint with manual optimization")


def _logged_steps(directory: Path) -> list[int]:
    (metrics,) = directory.glob("**/metrics.csv")
    with metrics.open() as f:
        return sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("meta/loss")})


@pytest.mark.slow
def test_resume_from_logs_at_the_true_meta_step_and_says_when_nothing_is_left(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.log_every_n_steps", "1"]
    every_step = [  # a periodic full checkpoint at every step: Lightning's manual-optimization warning
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath=full_every_step", "--trainer.callbacks.every_n_train_steps=1",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["meta-fit", "--config", RECIPE, "--trainer.max_steps", "2", *every_step,
              *logger, "--trainer.logger.save_dir", "first"])  # fmt: skip
        main(["meta-fit", "--config", RECIPE, "--trainer.max_steps", "4", "--model.resume_from", "runs/digits_tiny/light",
              *logger, "--trainer.logger.save_dir", "resumed"])  # fmt: skip
    assert _logged_steps(tmp_path / "first") == [0, 1]
    assert _logged_steps(tmp_path / "resumed") == [2, 3]  # meta-steps 3 and 4, as an uninterrupted run logs them
    out = capsys.readouterr().out
    # Not a terminal: plain lines, counted in meta-steps of the whole run.
    assert "meta-step 4/4 | meta/loss" in out and "Epoch" not in out
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if any(n in m for n in NOISE)]
    assert (tmp_path / "full_every_step").is_dir()

    with pytest.warns(UserWarning, match="resumes at meta-step 4 and max_steps is 3: nothing is left to run"):
        main(["meta-fit", "--config", RECIPE, "--trainer.max_steps", "3", "--model.resume_from", "runs/digits_tiny/light",
              "--trainer.logger", "false"])  # fmt: skip


def test_bad_recipe_values_and_missing_checkpoints_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args, message in [
        (["--model.initial_offset", "-1"], "error: MetaTrainer: initial_offset must be >= 0, got -1"),
        (["--ckpt_path", "runs/none.ckpt"], "error: --ckpt_path runs/none.ckpt: no such file"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["meta-fit", "--config", RECIPE, "--trainer.max_steps", "1", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "digits_tiny" / "light").exists()  # nothing ran


def test_noise_filters_are_narrow(monkeypatch):
    from lightning_utilities.core.rank_zero import log, rank_zero_info, rank_zero_only, rank_zero_warn

    # Other tests (multi-process strategies run in this process) may leave a non-zero rank or a
    # disabled logger behind; this test is about the filters only.
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    monkeypatch.setattr(log, "disabled", False)

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)  # other tests quieten Lightning's loggers
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with known_noise_filtered():
                _emit_noise_and_a_real_warning(rank_zero_info, rank_zero_warn)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert records == ["💡 Tip: something else"]
    assert [str(w.message) for w in caught] == ["a real warning"]


def _emit_noise_and_a_real_warning(rank_zero_info, rank_zero_warn):
    rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](...)")
    rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](...)")
    rank_zero_info("💡 Tip: something else")
    rank_zero_warn("LightningCLI's args parameter is intended to run from within Python like ...")
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
    warnings.warn("a real warning", UserWarning)


def test_the_terminal_bar_and_the_lines_count_meta_steps_of_the_whole_run():
    from types import SimpleNamespace

    import torch

    from lightning_lopt.meta.progress import MetaStepBar, MetaStepLines

    trainer = SimpleNamespace(max_steps=300, global_step=40, callback_metrics={"meta/loss": torch.tensor(1.8734)})
    bar = MetaStepBar()
    bar._trainer = trainer
    assert (bar.train_batch_idx, bar.total_train_batches, bar._get_train_description(0)) == (40, 300, "meta-steps")
    lines = MetaStepLines()
    lines._start = (100.0, 30)  # resumed at meta-step 30, 10 steps in 5 s
    assert lines.line(trainer, 105.0) == "meta-step 40/300 | meta/loss 1.873 | 2 steps/s | ETA 2m10s"
