"""LightningDataModules that work without internet: digits, MNIST, Fashion-MNIST and text.

All of them decode their data once into in-memory tensors, give ordinary dataloaders, expose
``input_shape`` and ``num_classes`` (``vocab_size`` for text), and draw batches for meta-training
with ``sample(batch_size, n, generator) -> (x, y)`` of shape ``[n, batch_size, ...]``.

- ``digits``: scikit-learn's bundled 8x8 digits. Needs no set-up: the default everywhere.
- ``mnist``, ``fashion_mnist``: IDX files installed by ``python -m lightning_lopt.datamodules.fetch``.
- ``text``: local text files, a Hugging Face dataset, or the Brown corpus (also fetched).

Usage::

    from lightning_lopt.datamodules import get_datamodule
    dm = get_datamodule("fashion_mnist", image_size=32, batch_size=128)
    dm.setup()
"""

from __future__ import annotations

from typing import Any

from lightning_lopt.datamodules.base import CachedDataModule
from lightning_lopt.datamodules.images import DigitsDataModule, ImageDataModule
from lightning_lopt.datamodules.mnist import FashionMNISTDataModule, IDXDataModule, MNISTDataModule, read_idx
from lightning_lopt.datamodules.paths import default_data_dir
from lightning_lopt.datamodules.text import TextDataModule

DATAMODULES: dict[str, type[CachedDataModule]] = {
    "digits": DigitsDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "text": TextDataModule,
}


def get_datamodule(name: str, **kwargs: Any) -> CachedDataModule:
    """Build the data module registered as ``name`` (``-`` and ``_`` are interchangeable).

    Usage::

        dm = get_datamodule("digits", image_size=16, flatten=True)
    """
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in DATAMODULES:
        raise ValueError(f"unknown dataset name {name!r}; known names: {', '.join(DATAMODULES)}")
    return DATAMODULES[key](**kwargs)


__all__ = [
    "DATAMODULES",
    "CachedDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "IDXDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "TextDataModule",
    "default_data_dir",
    "get_datamodule",
    "read_idx",
]
