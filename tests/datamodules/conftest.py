"""Fixtures for the data module tests: an empty data environment and small IDX data sets."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lightning_lopt.datamodules import paths
from lightning_lopt.datamodules.formats import IDX_FILES

_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def _write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip'd when ``path`` ends in ``.gz``), big-endian as the format says."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, _IDX_CODES[big.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + big.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def write_idx() -> Callable[[Path, np.ndarray], Path]:
    """``write_idx(path, array)``: write a small IDX file."""
    return _write_idx


IdxSet = dict[str, np.ndarray]


def _make_idx_set(directory: Path, n_train: int = 60, n_test: int = 20, gz: bool = False, seed: int = 0) -> IdxSet:
    """Write the four MNIST files with random 28x28 images; returns the arrays by IDX_FILES key.

    Label ``i`` is ``i % 10``, and image ``i`` is filled with value ``i % 256`` so a test can tell
    which item it got.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = (np.arange(n) % 10).astype(np.uint8)
    for key, array in arrays.items():
        _write_idx(directory / (IDX_FILES[key] + (".gz" if gz else "")), array)
    return arrays


@pytest.fixture
def make_idx_set() -> Callable[..., IdxSet]:
    """``make_idx_set(directory, n_train=60, n_test=20, gz=False, seed=0)``: a tiny MNIST-style set."""
    return _make_idx_set


@pytest.fixture
def no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A world without installed data: ``$LIGHTNING_LOPT_DATA`` is an empty directory (returned) and
    the Debian location points at an empty one, so a system-wide copy cannot mask anything."""
    env = tmp_path / "env-data"
    env.mkdir()
    debian = tmp_path / "debian" / "fashion-mnist"
    monkeypatch.setenv(paths.DATA_ENV, str(env))
    monkeypatch.setattr(paths, "debian_dir", lambda key: debian if key == "fashion_mnist" else None)
    return env
