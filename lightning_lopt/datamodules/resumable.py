"""Shuffled training batches that a Lightning checkpoint can resume mid-epoch, exactly.

``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` draws each epoch's order
from one generator that lives only in memory: a run resumed from a checkpoint taken mid-epoch starts
a fresh order, so its batches (and parameters) differ from an uninterrupted run's.

:class:`ResumableRandomSampler` gives the same orders as that DataLoader (epoch ``e`` is recomputed
from ``seed`` alone), and can start an epoch part-way; :class:`ResumableDataLoader` is the
``DataLoader`` that Lightning recognises as resumable (``state_dict`` / ``load_state_dict``). Its
state is where the *trainer* is (epoch and batches trained in it), not how far the loader's iterator
ran: Lightning fetches one batch ahead.

Example::

    loader = ResumableDataLoader(dataset, batch_size=64, sampler=ResumableRandomSampler(dataset, seed=0),
                                 position=lambda: (trainer.current_epoch, batches_done))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler


class ResumableRandomSampler(RandomSampler):
    """``RandomSampler``'s orders under a seeded ``DataLoader`` generator, by epoch, resumable.

    A ``RandomSampler`` (so Lightning still treats the loader as shuffled, e.g. under DDP).

    Args:
        data_source: the dataset (only its length is used).
        seed: the seed of the order (the ``DataLoader`` generator's seed it reproduces).
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, items) to skip once
        self._cache: tuple[int, torch.Generator] | None = None  # (last epoch drawn, generator after it)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration gives (Lightning calls this at every epoch start)."""
        self.epoch = epoch

    def resume(self, epoch: int, items: int) -> None:
        """Make the iteration of ``epoch`` start after its first ``items`` indices."""
        self._skip = (epoch, items)
        self.epoch = epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order: per epoch, the DataLoader draws its workers' base seed, then
        ``RandomSampler`` a ``randperm`` for the order and, at its end, one more for the (empty)
        remainder, all from the one generator."""
        n = len(self.data_source)
        if self._cache is not None and self._cache[0] < epoch:
            first, generator = self._cache[0] + 1, self._cache[1]
        else:
            first, generator = 0, torch.Generator().manual_seed(self.seed)
        for _ in range(first, epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed
            perm = torch.randperm(n, generator=generator)
            torch.randperm(n, generator=generator)  # RandomSampler's remainder, ``[: num_samples % n]``
        self._cache = (epoch, generator)
        return perm

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip = self._skip[1] if self._skip is not None and self._skip[0] == epoch else 0
        self._skip = None
        yield from self.permutation(epoch)[skip:].tolist()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableRandomSampler` whose state Lightning checkpoints.

    Args:
        position: ``() -> (epoch, batches trained in it)`` or ``None`` when unknown (outside a fit).
        *args, **kwargs: as for ``DataLoader``; ``sampler`` must be a :class:`ResumableRandomSampler`.
    """

    def __init__(self, *args: Any, position: Callable[[], tuple[int, int] | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        where = self.position() if self.position is not None else None
        if where is None or not isinstance(self.sampler, ResumableRandomSampler):
            return {}
        epoch, batches = where
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and isinstance(self.sampler, ResumableRandomSampler):
            self.sampler.resume(state["epoch"], state["batches"] * int(self.batch_size or 1))
