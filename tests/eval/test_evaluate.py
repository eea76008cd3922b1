"""``python train.py evaluate``: checks before any run, tuning, outputs, and the ci suite end to end."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_lopt import provenance
from lightning_lopt.eval import runner
from lightning_lopt.eval.arguments import UsageError
from lightning_lopt.eval.evaluate import evaluate, main
from lightning_lopt.optim.architectures import SmallFCLOpt

FAST = ["--bootstrap-reps", "200", "--no-progress"]


@pytest.fixture
def no_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a run started")

    monkeypatch.setattr(runner, "train", fail)


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--optimizers", "mulo,adam"], "--optimizers: unknown optimizer 'adam'"),
        (["--optimizers", "mulo:/no/such/weights"], "--optimizers: mulo:/no/such/weights cannot be built"),
        (["--optimizers", "mulo,mulo"], "names an optimizer twice"),
        (["--seeds", "0,0"], "--seeds: seeds repeat"),
        (["--seeds", "0"], "--seeds: the number of seeds must be at least 1"),
        (["--size", "gpu"], "--size: expected one of cpu, full"),
        (["--tune", "maybe"], "--tune: expected one of no, missing, all"),
        (["--optimizer-kwargs", '{"sgd": {"lr": 1}}'], "--optimizer-kwargs: \\['sgd'\\] are not among"),
        (["--optimizers", "adamw", "--optimizer-kwargs", '{"adamw": {"bogus": 1}}'], "--optimizers: adamw cannot be built.*bogus"),
        (["--optimizers", "adamw", "--tune", "missing", "--grid", "/no/grid.yaml"], "--grid: expected cpu or full or a YAML file"),
    ],
)
def test_bad_arguments_fail_before_any_run(
    tiny_suite: Path, tmp_path: Path, no_runs: None, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["--suite", str(tiny_suite), "--optimizers", "mulo", "--out", str(tmp_path / "out"), *FAST, *extra]
    err = _usage_error(capsys, argv)
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_unknown_suite_lists_the_known_ones(no_runs: None, capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, ["--suite", "widths"])
    assert "--suite: unknown suite 'widths'; known: ci, depth, diverse, horizon, width" in err


def test_missing_data_names_the_family_and_how_to_get_it(
    tmp_path: Path, write_suite: Callable[..., Path], no_runs: None
) -> None:
    families = {"lm_notes": {"model": "lm", "data": "text", "data_kwargs": {"files": str(tmp_path / "notes.txt")},
                             "batch_size": 4, "base_width": 16, "head_dim": 8}}  # fmt: skip
    suite = write_suite(tmp_path / "s.yaml", [{"kind": "diverse", "steps": 5, "tasks": [{"family": "lm_notes"}]}], families)
    with pytest.raises(UsageError, match="family 'lm_notes' needs data 'text'.*does not exist"):
        evaluate(str(suite), optimizers=["mulo"], progress=False)
    with pytest.raises(UsageError, match="--suite: unknown data|unknown data 'nope'"):
        bad = write_suite(tmp_path / "b.yaml", [{"kind": "diverse", "steps": 5, "tasks": [{"family": "x"}]}],
                          {"x": {"model": "mlp", "data": "nope", "batch_size": 4, "base_width": 8}})  # fmt: skip
        evaluate(str(bad), optimizers=["mulo"], progress=False)


def test_missing_tuned_settings_say_how_to_tune(tiny_suite: Path, tmp_path: Path, no_runs: None) -> None:
    with pytest.raises(UsageError, match="no tuned adamw settings for family 'mlp_tiny'.*--tune missing"):
        evaluate(str(tiny_suite), optimizers=["adamw"], tuned_dir=tmp_path / "tuned", progress=False)


def test_cuda_requested_without_a_gpu(tiny_suite: Path, no_runs: None, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = _usage_error(capsys, ["--suite", str(tiny_suite), "--optimizers", "mulo", "--device", "cuda"])
    assert "--device: CUDA is not available" in err


def test_weights_by_path_and_an_import_path_optimizer(tiny_suite: Path, tmp_path: Path) -> None:
    SmallFCLOpt(step_mult=0.01).save_pretrained(tmp_path / "my-mulo")
    result = evaluate(
        str(tiny_suite), optimizers=[f"mulo:{tmp_path / 'my-mulo'}", "torch.optim:SGD"], seeds=1,
        optimizer_kwargs={"torch.optim:SGD": {"lr": 0.1}}, out=tmp_path / "out", progress=False, plot=False,
        bootstrap_reps=100,
    )  # fmt: skip
    report = result.report.read_text()
    assert "sha256" in report and "random meta-initialisation" not in report
    assert {k[1] for k in result.records} == {f"mulo:{tmp_path / 'my-mulo'}", "torch.optim:SGD"}


def test_tune_then_evaluate_then_resume(
    tiny_suite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"default": {"adamw": {"lr": [1e-3, 3e-2]}, "muadam": {"lr": [0.01, 0.1]}}}))
    out, tuned = tmp_path / "out", tmp_path / "tuned"
    argv = ["--suite", str(tiny_suite), "--optimizers", "adamw,muadam", "--seeds", "2", "--out", str(out),
            "--tune", "missing", "--grid", str(grid), "--tuned-dir", str(tuned), *FAST]  # fmt: skip
    main([*argv, "--tune-only"])
    assert (tuned / "cpu" / "mlp_tiny.yaml").is_file() and not (out / "report.md").exists()
    chosen = yaml.safe_load((tuned / "cpu" / "mlp_tiny.yaml").read_text())["adamw"]["chosen"]

    main(argv)  # tuned settings exist now: evaluate with them
    printed = capsys.readouterr().out
    assert "average rank" in printed and "report:" in printed
    report = (out / "report.md").read_text()
    assert f"lr={chosen['lr']}" in report and "tuned: " in report
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2  # tasks x optimizers x seeds
    assert {r["seed"] for r in rows} == {"0", "1"}  # --seeds 2: two seeds, 0 and 1
    assert all(Path(r["path"], "curve.csv").is_file() for r in rows)
    assert {r["machine"] for r in rows} == {provenance.arithmetic("cpu")}
    assert f"Machines: {provenance.arithmetic('cpu')} (8 runs)." in report and "Warning" not in report

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(runner, "train", fail)
    main(argv)  # everything cached
    assert "8 runs: 8 from the cache" in (out / "report.md").read_text()


def test_config_file_and_flags(tiny_suite: Path, tmp_path: Path) -> None:
    config = tmp_path / "evaluation.yaml"
    config.write_text(yaml.safe_dump({"suite": str(tiny_suite), "optimizers": "mulo", "seeds": 3, "out": str(tmp_path / "o"),
                                      "plot": False, "bootstrap-reps": 100, "progress": False}))  # fmt: skip
    main(["--config", str(config), "--seeds", "[4]"])
    report = (tmp_path / "o" / "report.md").read_text()
    assert "Seeds: 4." in report  # the flag after --config wins
    assert "optimizers: mulo" in report and not list((tmp_path / "o").glob("*.png"))


@pytest.mark.slow
def test_ci_suite_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ci suite with tuned AdamW and μAdam (committed settings), μLO and LO: report, tables, plots."""
    out = tmp_path / "ci"
    main(["--suite", "ci", "--seeds", "2", "--out", str(out), "--bootstrap-reps", "2000", "--no-progress"])
    assert "report:" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for text in ("python train.py evaluate --suite ci --seeds 2", "## Group `width` (width)", "## Group `depth` (depth)",
                 "## Group `horizon` (horizon)", "## Group `diverse` (diverse)", "Average rank (μLO Table 2)",
                 "loss at 100 steps: OoD (XL)", "Celo's scores against `adamw`", "tuned: "):  # fmt: skip
        assert text in report, text
    for name in ("width_loss_vs_width", "width_largest_width_curves", "depth_curves", "horizon_curves", "diverse_aggregates"):
        png = out / f"{name}.png"
        assert png.is_file() and 1_000 < png.stat().st_size < 400_000, name
        assert f"]({name}.png)" in report
    assert len(list((out / "tasks").glob("*.png"))) == 11
    for table in ("final_losses.csv", "ranks.csv", "scores.csv", "aggregates.csv", "runs.csv"):
        assert (out / table).is_file(), table
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 11 * 4 * 2
    summary = json.loads((out / "summary.json").read_text())
    assert [g["kind"] for g in summary["groups"]] == ["width", "depth", "horizon", "diverse"]
    diverse = summary["groups"][3]
    iqm = {a["optimizer"]: a for a in diverse["aggregates"] if a["score"] == "normalized_loss" and a["aggregate"] == "IQM"}
    assert set(iqm) == {"mulo", "lo", "adamw", "muadam"}
    assert all(a["ci_low"] <= a["value"] <= a["ci_high"] for a in iqm.values())
