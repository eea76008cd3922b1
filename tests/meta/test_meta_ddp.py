"""DDP: two gloo CPU processes split the pairs and reach the θ of one process with the same seeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("_meta_ddp_script.py")


@pytest.mark.slow
def test_two_ranks_give_the_theta_of_one_process(tmp_path):
    for devices in (1, 2):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path), str(devices)], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
    single = load_file(str(tmp_path / "theta_devices1_rank0.safetensors"))
    ranks = [load_file(str(tmp_path / f"theta_devices2_rank{r}.safetensors")) for r in (0, 1)]
    sys.path.insert(0, str(SCRIPT.parent))
    from _meta_ddp_script import build

    start = build().lopt.state_dict()
    assert not torch.equal(start["mlp.0.weight"], single["mlp.0.weight"])  # the runs did train
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # replicas agree
        # fp32: the pair sums are split over two processes, so they round differently.
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-6, msg=name)
