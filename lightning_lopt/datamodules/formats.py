"""Readers for the on-disk formats of the offline data: IDX files and the tagged Brown corpus.

Only numpy and the standard library, so that the fetch script can validate data without importing
torch or Lightning.

Usage::

    from lightning_lopt.datamodules.formats import read_idx, read_brown_document
    images = read_idx("train-images-idx3-ubyte.gz")   # uint8 [60000, 28, 28]
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np

# IDX type codes (third byte of the magic number) → big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw, or gzip-compressed when its name ends in ``.gz``) into a numpy array.

    Raises ``ValueError`` when the header is malformed or the payload length does not match it
    (a truncated download, for instance).

    Usage::

        images = read_idx("train-images-idx3-ubyte.gz")   # uint8 [60000, 28, 28]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX payload is {len(data) - header} bytes, the header {dims} implies {expected}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def idx_files_in(directory: Path) -> dict[str, Path] | None:
    """The four MNIST-style IDX files in ``directory`` (raw preferred over ``.gz``), or ``None``."""
    found = {}
    for key, name in IDX_FILES.items():
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


_BROWN_FILE = re.compile(r"c[a-r]\d\d")


def brown_files(directory: Path) -> list[Path]:
    """The Brown corpus document files (``ca01`` ... ``cr09``) in ``directory``, sorted."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _BROWN_FILE.fullmatch(p.name) and p.is_file())


def read_brown_document(path: Path) -> str:
    """One Brown document as plain text: ``word/tag`` tokens lose their tag, one paragraph per line.

    Words stay separated by spaces as in the corpus (so punctuation is space-separated, and quotes
    are ```` `` ```` and ``''``). The tag is what follows the *last* slash, since words can contain one.
    """
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(" ".join(tok.rsplit("/", 1)[0] for tok in line.split()) for line in lines if line.strip())
