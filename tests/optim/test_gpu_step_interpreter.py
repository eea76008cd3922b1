"""Runs ``test_gpu_step.py`` through Triton's interpreter in a fresh process (CPU machines).

The interpreter is chosen when Triton is imported, which in this process has already happened
(importing lightning imports Triton), so the GPU step's tests run in a child pytest with
``TRITON_INTERPRET=1``. With a GPU, ``test_gpu_step.py`` runs directly and this is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="test_gpu_step.py runs on CUDA directly")
def test_gpu_step_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).with_name("test_gpu_step.py")), "-q", "-x", "-p",
         "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
