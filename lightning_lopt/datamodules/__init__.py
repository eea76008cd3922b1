"""LightningDataModules that work without internet: digits, MNIST, Fashion-MNIST and text.

All of them decode their data once into in-memory tensors, give ordinary dataloaders, expose
``input_shape`` and ``num_classes`` (``vocab_size`` for text), and draw batches for meta-training
with ``sample(batch_size, n, generator) -> (x, y)`` of shape ``[n, batch_size, ...]``.

- ``digits``: scikit-learn's bundled 8x8 digits. Needs no set-up: the default everywhere.
- ``mnist``, ``fashion_mnist``: IDX files installed by ``python -m lightning_lopt.datamodules.fetch``.
- ``text``: local text files, a Hugging Face dataset, or the Brown corpus (also fetched).
- :class:`SyntheticTokens` (not a data module): a random bigram chain for offline LM checks.

Names are imported lazily, so that ``python -m lightning_lopt.datamodules.fetch`` (numpy and the
standard library only) does not pay for importing torch and Lightning.

Usage::

    from lightning_lopt.datamodules import get_datamodule
    dm = get_datamodule("fashion_mnist", image_size=32, batch_size=128)
    dm.setup()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_lopt.datamodules.base import CachedDataModule
    from lightning_lopt.datamodules.formats import read_idx
    from lightning_lopt.datamodules.images import DigitsDataModule, ImageDataModule
    from lightning_lopt.datamodules.mnist import FashionMNISTDataModule, IDXDataModule, MNISTDataModule
    from lightning_lopt.datamodules.paths import default_data_dir
    from lightning_lopt.datamodules.synthetic import SyntheticTokens
    from lightning_lopt.datamodules.text import TextDataModule

_EXPORTS = {
    "CachedDataModule": "base",
    "DigitsDataModule": "images",
    "ImageDataModule": "images",
    "MNISTDataModule": "mnist",
    "FashionMNISTDataModule": "mnist",
    "IDXDataModule": "mnist",
    "TextDataModule": "text",
    "SyntheticTokens": "synthetic",
    "read_idx": "formats",
    "default_data_dir": "paths",
}

DATAMODULES: dict[str, str] = {
    "digits": "DigitsDataModule",
    "mnist": "MNISTDataModule",
    "fashion_mnist": "FashionMNISTDataModule",
    "text": "TextDataModule",
}
"""Registry of :func:`get_datamodule`: name → class name in this package."""


def get_datamodule(name: str, **kwargs: Any) -> CachedDataModule:
    """Build the data module registered as ``name`` (``-`` and ``_`` are interchangeable).

    Usage::

        dm = get_datamodule("digits", image_size=16, flatten=True)
    """
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in DATAMODULES:
        raise ValueError(f"unknown dataset name {name!r}; known names: {', '.join(DATAMODULES)}")
    return __getattr__(DATAMODULES[key])(**kwargs)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lightning_lopt.datamodules.{_EXPORTS[name]}"), name)
    # Submodules (``from lightning_lopt.datamodules import fetch``) are found by the import system.
    raise AttributeError(f"module 'lightning_lopt.datamodules' has no attribute {name!r}")


__all__ = [
    "DATAMODULES",
    "CachedDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "IDXDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "SyntheticTokens",
    "TextDataModule",
    "default_data_dir",
    "get_datamodule",
    "read_idx",
]
