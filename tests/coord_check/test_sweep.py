"""Tests of the coord-check width sweep (lightning_lopt.coord_check.sweep and .cli) on CPU."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_lopt.coord_check import sweep as coord_sweep
from lightning_lopt.coord_check.cli import main
from lightning_lopt.coord_check.runs import parse_runs
from lightning_lopt.coord_check.summary import summarize
from lightning_lopt.coord_check.sweep import run_coord_sweep
from lightning_lopt.datamodules import SyntheticTokens


def test_mlp_sweep_discriminates_mup_from_sp() -> None:
    """μAdam on the μP MLP keeps every hidden layer's delta_std flat in width; AdamW on the SP MLP
    blows up (slope about 0.6 and 0.9 on the hidden layers, 1.4 on the readout, at the default lrs)."""
    widths = (64, 128, 256, 512, 1024)
    kw: dict[str, Any] = dict(widths=widths, steps=(0, 1, 2, 5, 10), seeds=(0, 1), batch_size=64, out=None)
    mu = run_coord_sweep("mlp", optimizers=("muadam@mup",), **kw).summary["slopes"]["muadam"]["mup"]
    sp = run_coord_sweep("mlp", optimizers=("adamw@sp",), **kw).summary["slopes"]["adamw"]["sp"]

    hidden = [layer for layer in mu if layer.startswith("hidden_layers.")]
    assert hidden == ["hidden_layers.0", "hidden_layers.1"]
    for layer in hidden:
        assert abs(mu[layer]["delta_std"]["mean"]) < 0.25, (layer, mu[layer]["delta_std"])
    assert max(sp[layer]["delta_std"]["mean"] for layer in sp) > 0.5, {k: v["delta_std"] for k, v in sp.items()}
    assert len(mu["hidden_layers.0"]["delta_std"]["per_seed"]) == 2


def test_cli_writes_records_summary_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cc"
    main(
        ["--model", "mlp", "--widths", "16,32", "--optimizers", "adamw@sp,muadam@mup", "--steps", "0,1,3",
         "--seeds", "0,1", "--stats", "delta_std", "--batch-size", "16", "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "log-log slope vs width at step 3" in printed and "hidden_layers.0" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["widths"] == [16, 32] and summary["last_step"] == 3 and summary["data"] == "digits"
    assert summary["optimizer_kwargs"] == {"adamw": {"lr": 1e-3}, "muadam": {"lr": 1e-2}}
    assert set(summary["slopes"]) == {"adamw", "muadam"}
    assert set(summary["slopes"]["adamw"]) == {"sp"} and set(summary["slopes"]["muadam"]) == {"mup"}
    entry = summary["slopes"]["muadam"]["mup"]["hidden_layers.0"]["delta_std"]
    assert set(entry) == {"mean", "std", "per_seed", "values", "by_step"}
    assert set(entry["by_step"]) == {"0", "1", "3"} and entry["by_step"]["0"] is None  # delta_std is 0 at init
    assert entry["by_step"]["3"] == pytest.approx(entry["mean"])
    assert set(entry["per_seed"]) == {"0", "1"} and set(entry["values"]) == {"16", "32"}
    assert entry["mean"] == pytest.approx(sum(entry["per_seed"].values()) / 2)

    with open(out / "records.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 runs x 2 seeds x 2 widths x 3 steps x 4 layers x 1 stat
    assert len(rows) == 2 * 2 * 2 * 3 * 4
    assert set(rows[0]) == {"model", "optimizer", "param", "width", "seed", "step", "layer", "stat", "value"}
    assert {r["layer"] for r in rows} == {"input_layer", "hidden_layers.0", "hidden_layers.1", "readout"}

    pngs = sorted(p.name for p in out.glob("*.png"))
    runs, styles = (("adamw", "sp"), ("muadam", "mup")), ("vs_width", "vs_step")
    assert pngs == sorted(f"mlp_{o}_{p}_delta_std_{s}.png" for o, p in runs for s in styles)
    assert all((out / p).stat().st_size < 300_000 for p in pngs)
    # One Lightning CSV log per fit, with the coord metrics at the recorded steps.
    logs = sorted((out / "logs").iterdir())
    assert len(logs) == 2 * 2 * 2
    with open(out / "logs" / "mlp_adamw_sp_w16_s0" / "metrics.csv") as f:
        steps = sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("coord/delta_std/model.input_layer"))
    assert steps == [0, 1, 3]


def test_optimizer_kwargs_reach_the_optimizer() -> None:
    kw: dict[str, Any] = dict(widths=(16,), optimizers=("adamw@sp",), steps=(0, 2), seeds=(0,), batch_size=8, out=None)
    default = run_coord_sweep("mlp", **kw)
    faster = run_coord_sweep("mlp", optimizer_kwargs={"AdamW": {"lr": 0.05}}, **kw)
    assert default.summary["optimizer_kwargs"] == {"adamw": {"lr": coord_sweep.DEFAULT_LR["adamw"]}}
    assert faster.summary["optimizer_kwargs"] == {"adamw": {"lr": 0.05}}
    delta = {r["layer"]: r["value"] for r in default.records if r["step"] == 2 and r["stat"] == "delta_std"}
    faster_delta = {r["layer"]: r["value"] for r in faster.records if r["step"] == 2 and r["stat"] == "delta_std"}
    assert faster_delta["readout"] > 5 * delta["readout"]


def test_same_seed_same_data_and_init_across_runs() -> None:
    kw: dict[str, Any] = dict(widths=(16,), optimizers=("adamw@sp",), steps=(0, 2), seeds=(3,), batch_size=8, out=None)
    first, second = run_coord_sweep("mlp", **kw).records, run_coord_sweep("mlp", **kw).records
    assert [r["value"] for r in first] == [r["value"] for r in second]


@pytest.mark.parametrize(
    ("model", "layers"),
    [
        ("vit", {"patch_embed", "blocks.0.attn.query", "blocks.0.attn.out", "blocks.0.mlp.fc2", "readout"}),
        ("lm", {"tok_embed", "blocks.0.attn.key", "blocks.0.mlp.fc1", "readout"}),
    ],
)
def test_vit_and_lm_sweeps(model: str, layers: set[str]) -> None:
    result = run_coord_sweep(
        model, widths=(8, 16), optimizers=("muadam@mup",), steps=(0, 1), seeds=(0,), batch_size=4, depth=1, out=None
    )
    seen = {r["layer"] for r in result.records}
    assert layers <= seen
    assert all(math.isfinite(r["value"]) for r in result.records)
    assert set(result.summary["slopes"]["muadam"]["mup"]) == seen


def test_module_filter_uses_model_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_coord_sweep(
        "mlp", widths=(8, 16), optimizers=("sgd@sp",), steps=(0, 1), seeds=(0,), batch_size=4, out=None,
        modules="hidden_layers.*",
    )  # fmt: skip
    assert {r["layer"] for r in result.records} == {"hidden_layers.0", "hidden_layers.1"}
    assert list(tmp_path.iterdir()) == []  # out=None writes nothing, not even in the working directory


class _WrongShapeData:
    """Claims 64 input features but hands out batches with 65."""

    input_shape = (64,)
    num_classes = 10

    def sample(self, batch_size: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, batch_size, 65, generator=generator), torch.zeros(n, batch_size, dtype=torch.long)


@pytest.mark.parametrize(
    ("kwargs", "flag", "also"),
    [
        ({"widths": ()}, "--widths", "empty"),
        ({"model": "vit", "widths": (32, 30)}, "--widths", "divisible"),
        ({"model": "lm", "widths": (10,)}, "--widths", "[10]"),
        ({"optimizers": ("adam",)}, "--optimizers", "muadam"),
        ({"optimizers": ("adamw@xp",)}, "--optimizers", "@mup"),
        ({"optimizers": ("adamw:xp",)}, "--optimizers", "NAME:WEIGHTS"),
        ({"optimizers": ("adamw-cosine",)}, "--optimizers", "without a schedule"),
        ({"optimizers": ("no_such_module:Opt",)}, "--optimizers", "cannot import"),
        ({"model": "cnn"}, "--model", "mlp, vit, lm"),
        ({"param": "mu"}, "--param", "both"),
        ({"steps": (0,)}, "--steps", "after 0"),
        ({"seeds": ()}, "--seeds", "empty"),
        ({"lr": -1.0}, "--lr", "positive"),
        ({"data": "nope"}, "--data", "digits"),
        ({"model": "lm", "data": "digits"}, "--data", "lm takes text"),
        ({"data": _WrongShapeData()}, "--data", "probe batch"),
        ({"data": object()}, "--data", "sample"),
        ({"modules": "nothing.*"}, "--modules", "selects no layer"),
        ({"stats": ("l1",)}, "--stats", "delta_std"),
        ({"optimizer_kwargs": {"mulo": {"meta_weights": "x"}}}, "--optimizer-kwargs", "not among"),
        ({"optimizers": ("adamw",), "optimizer_kwargs": {"adamw": {"bogus": 1}}}, "--optimizer-kwargs", "bogus"),
    ],
)
def test_bad_input_fails_before_any_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kwargs: dict[str, Any], flag: str, also: str
) -> None:
    def no_fit(*args: Any, **kw: Any) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(L.Trainer, "fit", no_fit)
    args: dict[str, Any] = dict(widths=(8, 16), steps=(0, 1), seeds=(0,), out=tmp_path / "out")
    with pytest.raises(ValueError, match=flag) as err:
        run_coord_sweep(**{**args, **kwargs})
    assert also in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "vit", "--widths", "32,30", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--widths" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--widths", "a,b"])
    assert "--widths" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--optimizer-kwargs", "{not json"])
    assert "--optimizer-kwargs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_summary_slopes_against_power_laws() -> None:
    records = [
        {"optimizer": "o", "param": "mup", "layer": "l", "stat": "s", "seed": seed, "width": w, "step": 5,
         "value": c * w**a}  # fmt: skip
        for seed, (c, a) in enumerate([(2.0, 0.5), (3.0, 0.7)])
        for w in (8, 16, 64)
    ]
    records.append({**records[0], "step": 0, "value": 0.0})  # only the last step counts
    bad = [{**r, "layer": "zero", "value": 0.0 if r["width"] == 8 else 1.0} for r in records if r["step"] == 5]
    summary = summarize(records + bad, model="mlp")
    entry = summary["slopes"]["o"]["mup"]["l"]["s"]
    assert summary["last_step"] == 5 and summary["model"] == "mlp"
    assert entry["per_seed"] == pytest.approx({"0": 0.5, "1": 0.7})
    assert entry["mean"] == pytest.approx(0.6) and entry["std"] == pytest.approx(math.sqrt(0.02))
    assert entry["values"]["16"] == pytest.approx((2.0 * 4 + 3.0 * 16**0.7) / 2)
    assert entry["by_step"] == {"0": None, "5": pytest.approx(0.6)}
    # A zero value has no logarithm: the slope is reported as null, not as a number.
    assert summary["slopes"]["o"]["mup"]["zero"]["s"]["mean"] is None
    json.dumps(summary, allow_nan=False)


def test_synthetic_tokens() -> None:
    data = SyntheticTokens(vocab_size=16, seq_len=12)
    x, y = data.sample(batch_size=5, n=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 5, 12) and x.dtype == torch.int64
    assert torch.equal(x[..., 1:], y[..., :-1])
    assert 0 <= int(x.min()) and int(x.max()) < 16
    again = data.sample(batch_size=5, n=3, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(x, again)


@pytest.mark.filterwarnings("ignore:.*RANDOM meta-initialisation")
def test_learned_optimizers_with_a_schedule_join_the_sweep():
    # Celo needs a horizon: the pre-flight build (no trainer yet) and the fits both use max(steps).
    result = run_coord_sweep(
        "mlp", widths=(8, 16), optimizers=("celo@sp",), steps=(0, 1, 2), seeds=(0,), batch_size=4, depth=2, out=None
    )
    values = [r["value"] for r in result.records if r["stat"] == "delta_std" and r["step"] == 2]
    assert values and all(v > 0 for v in values)  # the parameters moved


@pytest.mark.parametrize(("seeds", "expected"), [("2", [0, 1]), ("[3]", [3]), ("0,4", [0, 4])])
def test_cli_seeds_is_a_count_or_an_explicit_list(tmp_path: Path, seeds: str, expected: list[int]) -> None:
    """``--seeds 2`` means two seeds (0 and 1), as on every command; a list names the seeds."""
    out = tmp_path / "cc"
    main(["--widths", "8,16", "--optimizers", "adamw@sp", "--steps", "0,1", "--seeds", seeds, "--batch-size", "8",
          "--stats", "delta_std", "--no-plot", "--out", str(out)])  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["seeds"] == expected


def test_cli_reads_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "cc.yaml"
    config.write_text(
        "widths: [8, 16]\noptimizers: [muadam@mup]\nsteps: [0, 2]\nseeds: 1\nbatch_size: 8\nplot: false\n"
        f"out: {tmp_path / 'out'}\n"
    )
    main(["--config", str(config), "--stats", "abs_mean"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["widths"] == [8, 16] and summary["seeds"] == [0] and summary["last_step"] == 2
    assert set(summary["slopes"]["muadam"]["mup"]["input_layer"]) == {"abs_mean"}
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize(
    ("widths", "message"),
    [("64", "at least two distinct widths, got \\[64\\]"), ("64,64", "at least two"), ("-64,128", "integers >= 1, got '-64,128'")],
)
def test_cli_refuses_widths_that_give_no_slope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, widths: str, message: str
) -> None:
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--widths", widths, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--widths" in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_optimizers_take_the_grammar_of_every_command() -> None:
    runs, built = parse_runs(["muadam", "torch.optim:SGD@sp", "MuLO:some/dir@mup"], "both")
    assert runs == [("muadam", "mup"), ("muadam", "sp"), ("torch.optim:SGD", "sp"), ("mulo:some/dir", "mup")]
    assert built["torch.optim:SGD"].optimizer is torch.optim.SGD
    assert built["mulo:some/dir"].optimizer == "mulo"
    assert built["mulo:some/dir"].kwargs == {"meta_weights": "some/dir"}


def test_the_former_name_colon_param_form_warns_and_means_the_pin() -> None:
    with pytest.warns(FutureWarning, match="'adamw@sp'"):
        old = parse_runs(["adamw:sp"], "both")
    assert old == parse_runs(["adamw@sp"], "both")
    assert old[0] == [("adamw", "sp")]


def test_an_optimizer_by_import_path_runs_and_names_its_files(tmp_path: Path) -> None:
    result = run_coord_sweep(
        "mlp", widths=(8, 16), optimizers=("torch.optim:SGD@sp",), lr=0.1, steps=(0, 1), seeds=(0,),
        batch_size=4, depth=1, stats=("abs_mean",), out=tmp_path,
    )  # fmt: skip
    assert set(result.summary["slopes"]) == {"torch.optim:SGD"}
    assert {r["optimizer"] for r in result.records} == {"torch.optim:SGD"}
    assert {p.name for p in result.figures} == {f"mlp_torch.optim-SGD_sp_abs_mean_vs_{x}.png" for x in ("width", "step")}
