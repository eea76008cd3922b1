"""Compile ``kernel.c`` at first use with the system C compiler and load it through ctypes.

The kernel is plain C11 with GNU vector extensions and OpenMP, with no torch headers, so it builds
in about two seconds (``torch.utils.cpp_extension`` takes about a minute on a 2-core machine). One
shared library is built per instruction set and cached in ``$LIGHTNING_LOPT_CACHE`` (default
``$XDG_CACHE_HOME/lightning_lopt`` or ``~/.cache/lightning_lopt``; a per-user folder in the
temporary directory if that is not writable) under ``fused/``, keyed by a hash of the source, the
flags and the compiler's version, so an edit or a new compiler rebuilds it.

Instruction sets (picked at run time from ``torch.backends.cpu.get_cpu_capability()``; no
``-march=native``, so a cached library never uses an instruction the CPU lacks):

- ``avx512``: 16 float lanes (AVX-512 F/VL/BW/DQ with FMA);
- ``avx2``: 8 lanes (AVX2 + FMA);
- ``generic``: the compiler's default target (4 lanes: SSE2 on x86-64, NEON on ARM).

The numbers of the variants differ only by rounding (FMA contraction, vector widths of sums), far
inside the tolerance the tests hold them to against the pure step.

Example::

    from lightning_lopt.optim.fused import build
    kernel = build.load()          # BuildError if no compiler is found or compilation fails
    kernel.vector_width            # 16 on an AVX-512 machine
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernel.c")
ISAS = ("avx512", "avx2", "generic")
ISA_FLAGS: dict[str, list[str]] = {
    "avx512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "generic": [],
}
VECTOR_WIDTH = {"avx512": 16, "avx2": 8}
# No -ffast-math: the step relies on NaN tests (nan_to_num) and IEEE sqrt and division.
BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


class BuildError(RuntimeError):
    """The fused kernel could not be compiled or loaded on this machine."""


@dataclass(frozen=True)
class Kernel:
    """A loaded kernel library: ``lopt_step``, ``lopt_step_phase``, ``lopt_workspace_bytes``,
    ``lopt_exchange_length``, and its ISA."""

    lib: ctypes.CDLL
    isa: str
    path: Path

    @property
    def vector_width(self) -> int:
        """Float lanes the library was compiled for (reported by the library itself)."""
        return int(self.lib.lopt_vector_width())


def native_isa() -> str:
    """The widest variant this CPU runs, as torch detects it (``"generic"`` off x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "avx512"
    return "avx2" if capability == "AVX2" else "generic"


def compiler() -> str:
    """The C compiler: ``$CC``, else ``gcc``, else ``cc``."""
    return os.environ.get("CC") or shutil.which("gcc") or "cc"


def cache_dir() -> Path:
    """Where built libraries are kept (created on demand)."""
    root = os.environ.get("LIGHTNING_LOPT_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "lightning_lopt")
    return Path(root) / "fused"


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"no usable C compiler {cc!r} ({err}); set $CC or install gcc") from err
    return out.stdout.splitlines()[0] if out.stdout else cc


def _writable(directory: Path) -> Path:
    """``directory``, created if needed, or a per-user folder in the temporary directory if it cannot be."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"lightning_lopt-{os.getuid()}" / "fused"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _compile(cc: str, flags: list[str], target: Path) -> None:
    """Compile to a temporary name and rename, so concurrent processes never load a partial file."""
    try:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as err:
        raise BuildError(f"cannot write the kernel library to {target.parent}: {err}") from err
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode != 0:
            raise BuildError(f"{cc} failed to compile {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"{cc} could not compile {SOURCE.name}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    lib.lopt_step.argtypes = [ctypes.c_void_p]
    lib.lopt_step.restype = ctypes.c_int32
    lib.lopt_workspace_bytes.argtypes = [ctypes.c_void_p]
    lib.lopt_workspace_bytes.restype = ctypes.c_int64
    lib.lopt_vector_width.argtypes = []
    lib.lopt_vector_width.restype = ctypes.c_int32
    lib.lopt_step_phase.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.lopt_step_phase.restype = ctypes.c_int32
    lib.lopt_exchange_length.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.lopt_exchange_length.restype = ctypes.c_int64


_LOADED: dict[str, Kernel] = {}


def load(isa: str | None = None) -> Kernel:
    """The kernel for ``isa`` (default: :func:`native_isa`), compiled on first use; raises :class:`BuildError`."""
    isa = isa or native_isa()
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if isa in _LOADED:
        return _LOADED[isa]
    cc = compiler()
    flags = BASE_FLAGS + ISA_FLAGS[isa]
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(encoding="utf-8"), " ".join(flags), _compiler_version(cc)]).encode()
    ).hexdigest()[:16]
    name = f"kernel-{isa}-{key}.so"
    path = cache_dir() / name
    if not path.exists():
        try:
            path = _writable(cache_dir()) / name
        except OSError as err:
            raise BuildError(f"no writable cache directory for the kernel library: {err}") from err
        if not path.exists():
            _compile(cc, flags, path)
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as err:
        raise BuildError(f"could not load {path}: {err}") from err
    kernel = Kernel(lib, isa, path)
    if isa != "generic" and kernel.vector_width != VECTOR_WIDTH[isa]:
        raise BuildError(f"{path} was built for {kernel.vector_width} lanes, expected {VECTOR_WIDTH[isa]} ({isa})")
    _LOADED[isa] = kernel
    return kernel
