"""The package surface: the registry, exports, the default data directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lightning_lopt.datamodules as dms
from lightning_lopt.datamodules import get_datamodule, paths


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("digits", dms.DigitsDataModule),
        ("mnist", dms.MNISTDataModule),
        ("fashion_mnist", dms.FashionMNISTDataModule),
        ("Fashion-MNIST", dms.FashionMNISTDataModule),
        ("text", dms.TextDataModule),
    ],
)
def test_registry_builds_each_module(name: str, cls: type) -> None:
    dm = get_datamodule(name, batch_size=7)
    assert type(dm) is cls and dm.batch_size == 7
    assert isinstance(dm, dms.CachedDataModule)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="'cifar10'.*digits, mnist, fashion_mnist, text"):
        get_datamodule("cifar10")


def test_registry_passes_validation_errors_through() -> None:
    with pytest.raises(ValueError, match="image_size"):
        get_datamodule("mnist", image_size=20)


def test_every_export_exists() -> None:
    for name in dms.__all__:
        assert hasattr(dms, name), name


def test_attributes_known_before_setup() -> None:
    assert get_datamodule("digits", flatten=True).input_shape == (64,)
    assert get_datamodule("mnist", image_size=32).input_shape == (1, 32, 32)
    assert get_datamodule("mnist").num_classes == 10
    assert get_datamodule("text", seq_len=64).vocab_size == 256
    assert get_datamodule("text", tokenizer="bpe").vocab_size == 4096


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    assert dms.default_data_dir() == tmp_path
    monkeypatch.delenv(paths.DATA_ENV)
    assert dms.default_data_dir() == Path.home() / ".cache" / "lightning_lopt"
    monkeypatch.setenv(paths.DATA_ENV, "")  # empty counts as unset
    assert dms.default_data_dir() == Path.home() / ".cache" / "lightning_lopt"


def test_fetch_script_imports_neither_torch_nor_lightning() -> None:
    # CI and users run the fetch script as a set-up step: it should start in a fraction of a second.
    code = "import sys, lightning_lopt.datamodules.fetch; print('torch' in sys.modules, 'lightning' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
