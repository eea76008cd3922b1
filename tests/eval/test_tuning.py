"""Baseline tuning: grids, the written settings, caching and staleness (lightning_lopt.eval.tuning)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_lopt.eval import runner
from lightning_lopt.eval.optimizers import parse_optimizer
from lightning_lopt.eval.tasks import Family
from lightning_lopt.eval.tuning import (
    TUNE_SEED,
    extend_past_edges,
    grid_edges,
    grid_settings,
    load_grids,
    load_tuned,
    tune_family,
)

FAMILY = Family.from_dict(
    "mlp_tiny",
    {"model": "mlp", "data": "digits", "data_kwargs": {"image_size": 8}, "batch_size": 32, "base_width": 16,
     "tune_steps": 20, "eval_examples": 64},
)  # fmt: skip


def test_grid_settings_combine_betas_in_order() -> None:
    settings = grid_settings({"lr": [1e-3, 1e-2], "beta1": [0.9, 0.95], "beta2": [0.99]})
    assert settings == [
        {"lr": 1e-3, "betas": [0.9, 0.99]},
        {"lr": 1e-3, "betas": [0.95, 0.99]},
        {"lr": 1e-2, "betas": [0.9, 0.99]},
        {"lr": 1e-2, "betas": [0.95, 0.99]},
    ]
    assert grid_settings({"lr": [0.1], "hidden_lr_mult": [1.0, 4.0]}) == [
        {"lr": 0.1, "hidden_lr_mult": 1.0},
        {"lr": 0.1, "hidden_lr_mult": 4.0},
    ]
    with pytest.raises(ValueError, match="non-empty lists"):
        grid_settings({"lr": []})


def test_grid_edges_flag_optima_at_the_border_of_three_or_more_values() -> None:
    axes = {"lr": [1e-3, 1e-2, 1e-1], "beta1": [0.9, 0.95]}
    assert grid_edges(axes, {"lr": 1e-1, "beta1": 0.9}) == ["lr"]
    assert grid_edges(axes, {"lr": 1e-2, "beta1": 0.95}) == []


def test_committed_grids_match_the_papers_at_full_size() -> None:
    full = load_grids("full")["default"]
    assert len(grid_settings(full["adamw"])) == 504 and len(grid_settings(full["muadam"])) == 500
    assert 7.02e-4 in full["adamw"]["lr"]  # μLO's chosen AdamW learning rate is a grid point
    for name, grids in load_grids("cpu").items():
        assert set(grids) == {"adamw", "muadam"}, name


def _grid_file(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"default": {"adamw": {"lr": [1e-4, 3e-2], "weight_decay": [0.0]},
                                                "muadam": {"lr": [1e-3, 0.1], "output_mult": [1.0]}}}))  # fmt: skip
    return path


def test_tuning_writes_the_best_setting_and_every_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seeds_seen: list[int] = []
    real_train = runner.train

    def spy(spec: Any, *args: Any, **kwargs: Any) -> Any:
        seeds_seen.append(spec.seed)
        return real_train(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "train", spy)
    opts = [parse_optimizer("adamw"), parse_optimizer("muadam"), parse_optimizer("mulo")]  # mulo is not tuned
    path = tune_family(FAMILY, opts, size="cpu", grid=str(_grid_file(tmp_path)), tuned_dir=tmp_path / "tuned",
                       cache_dir=tmp_path / "cache", seeds=2, progress=False, command="python train.py evaluate ...")  # fmt: skip
    assert path == tmp_path / "tuned" / "cpu" / "mlp_tiny.yaml"
    assert sorted(set(seeds_seen)) == [TUNE_SEED, TUNE_SEED + 1]  # never the evaluation seeds 0..N-1
    assert len(seeds_seen) == 2 * 2 + 2 * 2
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"family", "size", "family_config", "grid_file", "tuned_at", "command", "adamw", "muadam"}
    assert data["tuned_at"] == {"width": 16, "depth": 3, "steps": 20, "seeds": [TUNE_SEED, TUNE_SEED + 1]}
    for name in ("adamw", "muadam"):
        results = data[name]["results"]
        assert len(results) == 2 and results[0]["final_loss"] <= results[1]["final_loss"]
        assert data[name]["final_loss"] == results[0]["final_loss"]
        assert data[name]["chosen"]["lr"] == results[0]["lr"]
    assert data["adamw"]["chosen"]["lr"] == 3e-2  # 20 steps: the large learning rate wins clearly
    setting = load_tuned(tmp_path / "tuned", "cpu", FAMILY, "adamw")
    assert setting is not None and setting.values == data["adamw"]["chosen"] and str(path) in setting.origin
    assert load_tuned(tmp_path / "tuned", "cpu", FAMILY, "sgd") is None
    assert load_tuned(tmp_path / "none", "cpu", FAMILY, "adamw") is None

    # Re-tuning AdamW alone reruns nothing (cached) and keeps μAdam's section.
    seeds_seen.clear()
    tune_family(FAMILY, opts[:1], size="cpu", grid=str(_grid_file(tmp_path)), tuned_dir=tmp_path / "tuned",
                cache_dir=tmp_path / "cache", seeds=2, progress=False)  # fmt: skip
    assert seeds_seen == []
    assert yaml.safe_load(path.read_text())["muadam"] == data["muadam"]


def test_settings_of_a_changed_family_are_stale(tmp_path: Path) -> None:
    tune_family(FAMILY, [parse_optimizer("adamw")], size="cpu", grid=str(_grid_file(tmp_path)),
                tuned_dir=tmp_path / "tuned", cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    changed = dataclasses.replace(FAMILY, batch_size=64)
    with pytest.raises(ValueError, match="different definition of family 'mlp_tiny'.*--tune all"):
        load_tuned(tmp_path / "tuned", "cpu", changed, "adamw")
    # What is scored (eval_examples) does not make settings stale.
    assert load_tuned(tmp_path / "tuned", "cpu", dataclasses.replace(FAMILY, eval_examples=32), "adamw")


def test_settings_of_a_changed_grid_are_stale(tmp_path: Path) -> None:
    grid = _grid_file(tmp_path)
    tune_family(FAMILY, [parse_optimizer("adamw")], size="cpu", grid=str(grid),
                tuned_dir=tmp_path / "tuned", cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    assert load_tuned(tmp_path / "tuned", "cpu", FAMILY, "adamw") is not None
    changed = yaml.safe_load(grid.read_text())
    changed["default"]["adamw"]["lr"].append(0.1)
    grid.write_text(yaml.safe_dump(changed))
    with pytest.raises(ValueError, match="adamw was tuned on the grid .*--tune all"):
        load_tuned(tmp_path / "tuned", "cpu", FAMILY, "adamw")
    # A family that now asks for another grid is stale too.
    with pytest.raises(ValueError, match="grid 'small'"):
        load_tuned(tmp_path / "tuned", "cpu", dataclasses.replace(FAMILY, grid="small"), "adamw")


def test_extend_past_edges_steps_geometrically_beyond_the_winner() -> None:
    axes = {"lr": [1e-3, 3e-3, 1e-2], "beta1": [0.9, 0.95]}
    up = extend_past_edges(axes, {"lr": 1e-2, "beta1": 0.95})
    assert up["lr"][:3] == [1e-3, 3e-3, 1e-2] and up["lr"][3] == pytest.approx(1e-2 * 1e-2 / 3e-3)
    assert up["beta1"] == [0.9, 0.95]  # two values: no edge
    down = extend_past_edges(axes, {"lr": 1e-3, "beta1": 0.9})
    assert down["lr"][0] == pytest.approx(1e-3 / 3) and down["lr"][1:] == [1e-3, 3e-3, 1e-2]
    assert extend_past_edges(axes, {"lr": 3e-3, "beta1": 0.9}) == axes


def test_tuning_extends_the_grid_until_the_winner_is_interior(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss whose best lr (0.05) lies above the grid: the grid grows past 1e-2 (to 0.1, which then
    wins and is itself an edge) and past 0.1 (to 1.0), where the winner 0.1 is interior."""
    import math

    import numpy as np

    from lightning_lopt.eval import tuning
    from lightning_lopt.eval.store import RunRecord

    def fake_execute(specs, *args, **kwargs):
        out = {}
        for s in specs:
            lr = s.setting.values["lr"]
            loss = 1.0 + (math.log(lr) - math.log(0.05)) ** 2
            out[s.key] = RunRecord(np.full(20, loss), [], [], [], None, 10.0, 0.0, "cpu")
        return out

    monkeypatch.setattr(tuning, "execute", fake_execute)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"default": {"adamw": {"lr": [1e-4, 1e-3, 1e-2], "weight_decay": [0.0]}}}))
    path = tune_family(FAMILY, [parse_optimizer("adamw")], size="cpu", grid=str(grid), tuned_dir=tmp_path / "tuned",
                       cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    data = yaml.safe_load(path.read_text())["adamw"]
    assert data["start_grid"]["lr"] == [1e-4, 1e-3, 1e-2]
    assert data["grid"]["lr"] == pytest.approx([1e-4, 1e-3, 1e-2, 0.1, 1.0])
    assert data["chosen"]["lr"] == pytest.approx(0.1)
    assert data["at_grid_edge"] == [] and data["extended_past"] == [{"lr": 1e-2}, {"lr": pytest.approx(0.1)}]
    assert load_tuned(tmp_path / "tuned", "cpu", FAMILY, "adamw") is not None  # the start grid is what is checked


def test_committed_tuned_settings_are_current() -> None:
    """Every committed tuned file matches its family definition (else evaluation asks for a re-tune)."""
    from lightning_lopt.eval.suites import load_families
    from lightning_lopt.eval.tuning import DEFAULT_TUNED_DIR

    tunable = ("adamw", "muadam", "adamw-cosine", "muadam-cosine")
    for size_dir in sorted(p for p in DEFAULT_TUNED_DIR.iterdir() if p.is_dir()):
        families = load_families(size_dir.name)
        for path in sorted(size_dir.glob("*.yaml")):
            family = families[path.stem]
            # every section the file has (a family tuned for its SP baseline only has just AdamW's)
            optimizers = [name for name in tunable if name in yaml.safe_load(path.read_text())]
            assert "adamw" in optimizers, path
            for optimizer in optimizers:
                setting = load_tuned(DEFAULT_TUNED_DIR, size_dir.name, family, optimizer)
                assert setting is not None, (path, optimizer)


def test_no_committed_winner_sits_on_an_edge_of_its_grid() -> None:
    """Every committed baseline was tuned until its winner is interior on every axis of three or
    more numbers (an edge winner may have its optimum outside the grid: an under-tuned baseline)."""
    from lightning_lopt.eval.tuning import DEFAULT_TUNED_DIR

    for path in sorted(DEFAULT_TUNED_DIR.glob("*/*.yaml")):
        data = yaml.safe_load(path.read_text())
        for name, section in data.items():
            if isinstance(section, dict) and "chosen" in section:
                assert section["at_grid_edge"] == [], (path.name, name, section["at_grid_edge"])
                # results are best first, as grid rows (betas as beta1, beta2)
                assert grid_edges(section["grid"], section["results"][0]) == [], (path.name, name)


def test_the_cosine_variant_is_tuned_on_the_same_grid_under_its_own_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from lightning_lopt.eval import tuning
    from lightning_lopt.eval.store import RunRecord

    seen = []

    def fake_execute(specs, *args, **kwargs):
        seen.extend(s.optimizer.schedule for s in specs)
        # constant rate: 1e-3 best; cosine: 1e-2 best (a schedule usually takes a larger peak rate)
        best = 1e-2 if specs[0].optimizer.schedule else 1e-3
        return {s.key: RunRecord(np.full(20, 1.0 + abs(np.log(s.setting.values["lr"] / best))), [], [], [], None, 10.0, 0.0, "cpu")
                for s in specs}  # fmt: skip

    monkeypatch.setattr(tuning, "execute", fake_execute)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"default": {"adamw": {"lr": [1e-4, 1e-3, 1e-2, 1e-1]}}}))
    opts = [parse_optimizer("adamw"), parse_optimizer("adamw-cosine")]
    path = tune_family(FAMILY, opts, size="cpu", grid=str(grid), tuned_dir=tmp_path / "tuned", cache_dir=tmp_path / "c", progress=False)
    data = yaml.safe_load(path.read_text())
    assert data["adamw"]["chosen"]["lr"] == 1e-3 and data["adamw-cosine"]["chosen"]["lr"] == 1e-2
    assert set(seen) == {None, "cosine"}
    assert load_tuned(tmp_path / "tuned", "cpu", FAMILY, "adamw-cosine").values == {"lr": 1e-2}
