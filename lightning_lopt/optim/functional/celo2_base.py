"""Celo2Base's functional interface: Celo2's step with every tensor on the learned rule.

The same :func:`~lightning_lopt.optim.functional.celo2.step`; only the initial state differs, because
the routing to the Adam branch is fixed when the state is created. Callers that build state through
``module.functional.init_state(theta, params, layout=...)`` (the meta-trainer's unroll) therefore
get Celo2Base's routing from :class:`~lightning_lopt.optim.celo2_lopt.Celo2LOpt` with
``adam_1d=False``.

Example::

    state = celo2_base.init_state(theta, params)        # no tensor goes to Adam
    params, state = celo2_base.step(theta, params, grads, state, ctx, orthogonalize=False)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_lopt.optim.functional import celo2
from lightning_lopt.optim.functional.celo2 import State, step


def init_state(theta: dict[str, Tensor], params: Sequence[Tensor], *, layout: str = "torch") -> State:
    """Zero state with every tensor on the learned rule (Celo2Base,
    docs/reference/celo2.md#variants-and-configuration)."""
    return celo2.init_state(theta, params, layout=layout, adam_1d=False)


__all__ = ["init_state", "step"]
