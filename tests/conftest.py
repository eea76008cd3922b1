"""Shared test set-up: offline, quiet, deterministic."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

# Tests never touch a hub: fail fast instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# The test models are tiny: intra-op threads cost more than they save, badly so on a busy machine.
torch.set_num_threads(1)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fit_kwargs():
    """``fit_kwargs(root, steps, **extra)``: a quiet, CPU-only, checkpoint-free Trainer configuration."""

    def make(root, steps: int, **extra):
        return {
            "max_steps": steps,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "default_root_dir": root,
            **extra,
        }

    return make
