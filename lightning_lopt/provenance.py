"""Where a result came from: the machine, its CPU and the git commit of the source tree.

One home for the facts that weight cards (:func:`~lightning_lopt.optim.pretrained.save_pretrained`),
meta-training cards (:meth:`~lightning_lopt.meta.MetaTrainer.card`) and benchmark records
(``benchmarks/``) write about their origin.

Example::

    from lightning_lopt import provenance

    provenance.machine()      # 'x86_64 AMD EPYC 7B13, 2 cores'
    provenance.git_commit()   # '1c20c44…' or None outside a git checkout
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

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
