"""Celo's task augmentation: re-parametrise the optimizee's weights (docs/reference/celo.md#task-augmentation).

A factor τ, log-uniform in ``[low, high]``, is drawn at every episode reset. The stored parameters
are θ0/τ and the loss is evaluated at τ·θ, so the network computes the same function but the
learned optimizer sees parameters scaled by 1/τ and gradients τ·∇L(τθ). The loss handed to the
optimizer and the meta-objective are the true network loss. Levels:

- ``"global"``: one τ for every tensor (Celo's recipe, range [1e-3, 1e3]);
- ``"tensor"``: one τ per tensor;
- ``"parameter"``: one τ per element.

The ± particles of a pair share τ (they share every random draw).

Example::

    aug = ReparamAugmentation("global")
    taus = aug.sample([p.shape for p in params], generator)    # one tensor per parameter tensor
    stored = [p / t for p, t in zip(params, taus)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

LEVELS = ("global", "tensor", "parameter")


@dataclass(frozen=True)
class ReparamAugmentation:
    """Log-uniform weight re-parametrisation at ``level`` over ``[low, high]``."""

    level: str = "global"
    low: float = 1e-3
    high: float = 1e3

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"augmentation level must be one of {LEVELS}, got {self.level!r}")
        if not (0 < self.low <= self.high):
            raise ValueError(f"augmentation range must satisfy 0 < low <= high, got [{self.low}, {self.high}]")

    def _log_uniform(self, shape: Sequence[int], generator: torch.Generator) -> Tensor:
        u = torch.rand(tuple(shape), generator=generator, device=generator.device)
        return torch.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))

    def sample(self, shapes: Sequence[torch.Size], generator: torch.Generator) -> list[Tensor]:
        """One τ tensor per parameter tensor, broadcastable against it."""
        if self.level == "global":
            tau = self._log_uniform((), generator)
            return [tau.expand([1] * len(s)).clone() for s in shapes]
        if self.level == "tensor":
            return [self._log_uniform([1] * len(s), generator) for s in shapes]
        return [self._log_uniform(s, generator) for s in shapes]
