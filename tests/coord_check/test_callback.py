"""Tests of lightning_lopt.callbacks.CoordCheck (lightning_lopt.coord_check.callback) inside real lightning.Trainer fits on CPU."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_lopt.callbacks import CoordCheck

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

IN, HIDDEN, OUT = 5, 7, 3


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g), torch.randint(0, OUT, (n,), generator=g)


class TinyNet(L.LightningModule):
    """Linear-ReLU-Linear classifier; optional dropout and batch norm exercise the probe's mode handling."""

    def __init__(self, lr: float = 0.1, extras: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        layers: list[nn.Module] = [nn.BatchNorm1d(HIDDEN), nn.Dropout(0.3)] if extras else []
        self.mid = nn.Sequential(*layers, nn.ReLU(inplace=True))
        self.fc2 = nn.Linear(HIDDEN, OUT)
        self.lr = lr
        self.train_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.mid(self.fc1(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.train_steps += 1
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _loader(batch_size: int = 8, n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(*_data(n=n)), batch_size=batch_size, shuffle=False)


def _trainer(tmp_path: Path, max_steps: int, callbacks: list, **kw: Any) -> L.Trainer:
    kw.setdefault("logger", CSVLogger(tmp_path, name="logs"))
    kw.setdefault("log_every_n_steps", 1)
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def _table(records: list[dict]) -> dict[tuple[int, str, str], float]:
    return {(r["step"], r["layer"], r["stat"]): r["value"] for r in records}


class WeightSnapshots(L.Callback):
    """Copies fc1/fc2 weights at every step start and at train end, to recompute outputs by hand."""

    def __init__(self) -> None:
        self.snaps: dict[int, dict[str, np.ndarray]] = {}

    def _snap(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.snaps.setdefault(
            trainer.global_step, {k: v.detach().double().numpy().copy() for k, v in pl_module.state_dict().items()}
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        self._snap(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._snap(trainer, pl_module)


def test_statistics_match_independent_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    probe_x = _data(n=16, seed=1)[0]
    # Snapshots listed first so they are taken before the probe at every step.
    snaps = WeightSnapshots()
    cc = CoordCheck(steps=(0, 1, 2, 4), probe_batch=(probe_x, None), stats=("delta_std", "abs_mean", "std", "rms"))
    _trainer(tmp_path, 4, [snaps, cc]).fit(TinyNet(), _loader())

    x = probe_x.double().numpy()

    def preacts(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h1 = x @ w["fc1.weight"].T + w["fc1.bias"]
        return {"fc1": h1, "fc2": np.maximum(h1, 0) @ w["fc2.weight"].T + w["fc2.bias"]}

    h0 = preacts(snaps.snaps[0])
    got = _table(cc.records)
    assert cc.layers == ["fc1", "fc2"]
    assert {k[0] for k in got} == {0, 1, 2, 4}
    for step in (0, 1, 2, 4):
        h = preacts(snaps.snaps[step])
        for layer in ("fc1", "fc2"):
            expected = {
                "delta_std": np.std(h[layer] - h0[layer]),
                "abs_mean": np.mean(np.abs(h[layer])),
                "std": np.std(h[layer]),
                "rms": np.sqrt(np.mean(h[layer] ** 2)),
            }
            for stat, value in expected.items():
                assert got[(step, layer, stat)] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, layer, stat)
    assert got[(0, "fc1", "delta_std")] == 0.0
    assert got[(4, "fc2", "delta_std")] > 0.0


def test_training_is_untouched(tmp_path: Path) -> None:
    def fit(callbacks: list) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = TinyNet(extras=True)
        loader = DataLoader(TensorDataset(*_data()), batch_size=8, shuffle=True)
        _trainer(tmp_path, 6, callbacks, logger=False).fit(model, loader)
        return model.state_dict()

    plain = fit([])
    checked = fit([CoordCheck(steps=(0, 1, 2, 3, 5, 6), stats=("delta_std", "abs_mean"))])
    assert plain.keys() == checked.keys()
    for k in plain:
        assert torch.equal(plain[k], checked[k]), k


def test_csv_logger_rows_and_files(tmp_path: Path) -> None:
    cc = CoordCheck(steps=(0, 2, 5))
    trainer = _trainer(tmp_path, 5, [cc], log_every_n_steps=1)
    trainer.fit(TinyNet(), _loader())
    log_dir = Path(trainer.log_dir)

    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    coord_rows = {int(r["step"]) for r in rows if r.get("coord/delta_std/fc1")}
    # Only the recorded steps carry coord values: no stale repeats on the steps in between.
    assert coord_rows == {0, 2, 5}
    assert {k for k in rows[0] if k.startswith("coord/")} == {
        f"coord/{s}/{layer}" for s in ("delta_std", "abs_mean") for layer in ("fc1", "fc2")
    }

    with open(log_dir / "coord_check.csv") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == ["step", "layer", "stat", "value"]
    assert len(written) == len(cc.records) == 3 * 2 * 2
    assert {(int(r["step"]), r["layer"], r["stat"]): float(r["value"]) for r in written} == pytest.approx(
        _table(cc.records)
    )
    png = log_dir / "coord_check.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_logger(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    cc = CoordCheck(steps=(0, 1, 3))
    _trainer(tmp_path, 3, [cc], logger=logger).fit(TinyNet(), _loader())
    acc = EventAccumulator(logger.log_dir).Reload()
    events = acc.Scalars("coord/abs_mean/fc2")
    assert [e.step for e in events] == [0, 1, 3]
    recorded = [r["value"] for r in cc.records if r["layer"] == "fc2" and r["stat"] == "abs_mean"]
    assert [e.value for e in events] == pytest.approx(recorded)
    assert (Path(logger.log_dir) / "coord_check.csv").exists()


def test_wrong_probe_batch_fails_before_training(tmp_path: Path) -> None:
    model = TinyNet()
    cc = CoordCheck(probe_batch=(torch.randn(4, IN + 1), torch.zeros(4)))
    with pytest.raises(ValueError, match="probe_batch"):
        _trainer(tmp_path, 3, [cc]).fit(model, _loader())
    assert model.train_steps == 0


def test_module_filters(tmp_path: Path) -> None:
    by_glob = CoordCheck(steps=(0, 1), modules="fc*")
    by_pred = CoordCheck(steps=(0, 1), modules=lambda name, m: name == "mid", filename="mid")
    _trainer(tmp_path, 1, [by_glob, by_pred]).fit(TinyNet(), _loader())
    assert by_glob.layers == ["fc1", "fc2"]
    # Any module can be watched by name: here the ReLU's output, i.e. the activations.
    assert by_pred.layers == ["mid"]
    assert all(r["value"] >= 0 for r in by_pred.records if r["stat"] == "abs_mean")
    with pytest.raises(ValueError, match="modules"):
        _trainer(tmp_path, 1, [CoordCheck(modules="nothing.*")]).fit(TinyNet(), _loader())


class DictBatches(Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class DictNet(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])


def _collate_as_list(items: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    return [torch.stack(t) for t in zip(*items)]


class ListNet(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class TensorNet(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch).pow(2).mean()


@pytest.mark.parametrize(
    ("module", "loader"),
    [
        (DictNet, lambda: DataLoader(DictBatches(), batch_size=8)),
        (ListNet, lambda: DataLoader(list(zip(*_data())), batch_size=8, collate_fn=_collate_as_list)),
        (TensorNet, lambda: DataLoader(_data()[0], batch_size=8)),
    ],
    ids=["dict", "list", "tensor"],
)
def test_batch_formats(tmp_path: Path, module: type[TinyNet], loader: Any) -> None:
    cc = CoordCheck(steps=(0, 2))
    _trainer(tmp_path, 2, [cc]).fit(module(), loader())
    assert {r["step"] for r in cc.records} == {0, 2}
    assert all(np.isfinite(r["value"]) for r in cc.records)


def test_forward_fn_override(tmp_path: Path) -> None:
    calls: list[tuple[int, ...]] = []

    def forward(pl_module: L.LightningModule, batch: Any) -> torch.Tensor:
        calls.append(tuple(batch["features"].shape))
        return pl_module(batch["features"])

    probe = {"labels": torch.zeros(3), "features": torch.randn(3, IN)}
    cc = CoordCheck(steps=(0, 1), probe_batch=probe, forward_fn=forward, save=False)
    trainer = _trainer(tmp_path, 1, [cc])
    trainer.fit(TinyNet(), _loader())
    assert calls and set(calls) == {(3, IN)}
    assert len(cc.records) == 2 * 2 * 2
    assert not list(Path(trainer.log_dir).glob("coord_check.*"))  # save=False: loggers only


def test_gradient_accumulation_records_each_step_once(tmp_path: Path) -> None:
    cc = CoordCheck(steps=(0, 1, 2))
    _trainer(tmp_path, 2, [cc], accumulate_grad_batches=3).fit(TinyNet(), _loader())
    assert [r["step"] for r in cc.records if r["layer"] == "fc1" and r["stat"] == "abs_mean"] == [0, 1, 2]


def test_delta_reference_without_step_zero(tmp_path: Path) -> None:
    """delta_std is relative to initialization even when step 0 itself is not recorded."""
    full, sparse = CoordCheck(steps=(0, 3)), CoordCheck(steps=(3,), filename="sparse")
    torch.manual_seed(0)
    _trainer(tmp_path, 3, [full]).fit(TinyNet(), _loader())
    torch.manual_seed(0)
    _trainer(tmp_path, 3, [sparse]).fit(TinyNet(), _loader())
    assert {r["step"] for r in sparse.records} == {3}
    assert _table(sparse.records) == pytest.approx({k: v for k, v in _table(full.records).items() if k[0] == 3})


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path: Path) -> None:
    # One batch per epoch, so that where Lightning resumes in the plain (non-resumable) DataLoader
    # cannot change the data the resumed steps see.
    torch.manual_seed(0)
    whole = CoordCheck(steps=(0, 1, 3, 4))
    _trainer(tmp_path / "a", 4, [whole]).fit(TinyNet(), _loader(n=8))

    torch.manual_seed(0)
    first = CoordCheck(steps=(0, 1, 3, 4))
    trainer = _trainer(tmp_path / "b", 2, [first])
    trainer.fit(TinyNet(), _loader(n=8))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = CoordCheck(steps=(0, 1, 3, 4))
    _trainer(tmp_path / "b", 4, [resumed]).fit(TinyNet(), _loader(n=8), ckpt_path=ckpt)
    # Steps 0 and 1 come back from the checkpoint; the delta reference too, so step 3 and 4 match.
    assert _table(resumed.records) == pytest.approx(_table(whole.records), rel=1e-6, abs=1e-8)

    # A resumed fit keeps probing the original batch, whatever its own first batch is.
    other = CoordCheck(steps=(0, 1, 3, 4))
    other_data = DataLoader(TensorDataset(*_data(n=8, seed=5)), batch_size=8)
    _trainer(tmp_path / "c", 4, [other]).fit(TinyNet(), other_data, ckpt_path=ckpt)
    assert torch.equal(other.probe_batch[0], first.probe_batch[0])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="stats"):
        CoordCheck(stats=("l1",))
    with pytest.raises(ValueError, match="steps"):
        CoordCheck(steps=(-1, 2))
    with pytest.raises(ValueError, match="modules"):
        CoordCheck(modules=[])


DDP_SCRIPT = """
import json, logging, os, sys
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch.loggers import CSVLogger
from lightning_lopt.callbacks import CoordCheck

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
out = sys.argv[1]
rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning's launcher in the relaunched process

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 16), nn.Linear(16, 3)
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g))
cc = CoordCheck(steps=(0, 1, 3), dirpath=os.path.join(out, f"coord_rank{rank}"))
trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cc],
                    logger=CSVLogger(out, name="logs"), enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Net(), DataLoader(data, batch_size=8))
with open(os.path.join(out, f"records_rank{trainer.global_rank}.json"), "w") as f:
    json.dump(cc.records, f)
"""


@pytest.mark.slow
def test_ddp_two_processes_only_rank_zero_writes(tmp_path: Path) -> None:
    script = tmp_path / "ddp_coord.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    assert (tmp_path / "coord_rank0" / "coord_check.csv").exists()
    assert (tmp_path / "coord_rank0" / "coord_check.png").exists()
    assert not (tmp_path / "coord_rank1").exists()
    # The logger's metrics come from rank 0 only, and at the recorded steps only.
    (metrics,) = tmp_path.glob("logs/version_*/metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("coord/abs_mean/fc1")]
    assert sorted(int(r["step"]) for r in rows) == [0, 1, 3]

    with open(tmp_path / "coord_rank0" / "coord_check.csv") as f:
        written = list(csv.DictReader(f))
    values = {(int(r["step"]), r["layer"], r["stat"]): float(r["value"]) for r in written}
    assert len(values) == 3 * 2 * 2 and all(np.isfinite(v) for v in values.values())
    assert values[(0, "fc1", "delta_std")] == 0.0
    assert all(values[(s, layer, "delta_std")] > 0 for s in (1, 3) for layer in ("fc1", "fc2"))
    assert all(0 < values[(s, layer, "abs_mean")] < 10 for s in (0, 1, 3) for layer in ("fc1", "fc2"))
    rank0 = json.loads((tmp_path / "records_rank0.json").read_text())
    assert _table(rank0) == pytest.approx(values)


def test_the_public_import_path_is_the_coord_check_wing() -> None:
    from lightning_lopt.coord_check import CoordCheck as WingCoordCheck

    assert CoordCheck is WingCoordCheck
