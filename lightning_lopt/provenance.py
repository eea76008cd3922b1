"""Where a result came from: the machine, its CPU and the git commit of the source tree.

One home for the facts that weight cards (:func:`~lightning_lopt.optim.pretrained.save_pretrained`),
meta-training cards (:meth:`~lightning_lopt.meta.MetaTrainer.card`) and benchmark records
(``benchmarks/``) write about their origin.

Example::

    from lightning_lopt import provenance

    provenance.machine()      # 'x86_64 AMD EPYC 7B13, 2 cores'
    provenance.arithmetic()   # 'AMD EPYC 7B13, AVX2, torch 2.10.0'
    provenance.git_commit()   # '1c20c44…' or None outside a git checkout
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

_SOURCE_DIR = Path(__file__).resolve().parent


def cpu_model() -> str | None:
    """The CPU's model name (``platform.processor()`` says only ``x86_64`` on Linux), or ``None``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> str:
    """The architecture, CPU model and core count in one line, for cards."""
    return f"{platform.machine()} {cpu_model() or ''}, {os.cpu_count()} cores".replace("  ", " ")


def arithmetic(device: str = "cpu") -> str:
    """What decides a run's float rounding, in one line: the processor, the instruction set torch's
    kernels use on it (``ATEN_CPU_CAPABILITY``) and the torch version.

    Two runs of the same seed pair like for like only when this matches: training amplifies
    rounding differences, so the same seed on another CPU (or with AVX2 instead of AVX-512
    kernels) ends somewhere else, by about a third of the seed-to-seed spread for μLO and μAdam on
    a μP MLP (``docs/results.md``, section 16).
    """
    where = torch.device(device)
    if where.type == "cuda":
        return f"{torch.cuda.get_device_name(where)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"{cpu_model() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def git(*args: str) -> str | None:
    """The output of a read-only git command in the source tree, or ``None`` (no git, not a checkout)."""
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=_SOURCE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> str | None:
    """The commit of the lightning_lopt source tree, or ``None`` outside a git checkout."""
    return git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (``None``: unknown)."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)
