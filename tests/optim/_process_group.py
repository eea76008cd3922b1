"""Shared by the two-process scripts that Lightning launches (``_ddp_script.py``, ``_model_parallel_script.py``)."""

from __future__ import annotations

import torch


def tear_down() -> None:
    """Destroy the gloo process group before the interpreter exits: left to exit, its threads can
    abort the process ("terminate called without an active exception") after the script succeeded."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
