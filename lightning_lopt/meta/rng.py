"""Every random draw of meta-training has an owner (docs/reference/design.md#contract-5-every-random-draw-has-an-owner).

A draw is identified by a tuple of integers, for example ``(seed, task, pair, meta_step, purpose)``,
and gets a fresh ``torch.Generator`` seeded from a hash of that tuple. Nothing random is carried from
one meta-step to the next, so a run resumed at step k draws exactly what the uninterrupted run drew,
and a checkpoint needs only the seed and the step. Pair indices are global (not per rank), so
splitting the pairs over DDP ranks does not change any draw.

Example::

    g = generator(seed, task_index, pair, step, Stream.PERTURBATION)
    eps = torch.randn(dim, generator=g)
"""

from __future__ import annotations

import enum

import numpy as np
import torch


class Stream(enum.IntEnum):
    """What a draw is for; part of its key, so different uses never share a stream."""

    PERTURBATION = 1
    DATA = 2
    INIT = 3
    RESET = 4
    LENGTH = 5
    AUGMENTATION = 6
    DROPOUT = 7


def seed_of(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``key``."""
    return torch.Generator(device=device).manual_seed(seed_of(*key))
