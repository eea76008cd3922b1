"""The pure functional core of the learned optimizers (docs/reference/design.md#contract-1-a-functional-core).

Every architecture module (:mod:`.small_fc`, :mod:`.celo`, :mod:`.celo2`, :mod:`.velo`) provides

- ``init_state(theta, params, *, layout="torch") -> state`` and
- ``step(theta, params, grads, state, ctx, **config) -> (new_params, new_state)``,

over lists of tensors, with no in-place writes and no Python branching on tensor values, so that
``torch.func.vmap`` can map them over a leading particle dimension of ``theta``, ``params``,
``grads`` and ``state``. ``theta`` is a ``dict[str, Tensor]``, exactly the ``state_dict()`` of the
matching module in :mod:`lightning_lopt.optim.architectures`; ``ctx`` is a :class:`StepContext`.
Math follows the dtype of the parameters (the wrappers pass fp32).

Example::

    from lightning_lopt.optim.functional import StepContext, small_fc
    theta = dict(SmallFCLOpt().state_dict())
    state = small_fc.init_state(theta, params)
    params, state = small_fc.step(theta, params, grads, state, StepContext(scales, None, 1000))

    # Eight particles at once (every tensor stacked on a leading axis):
    step8 = torch.func.vmap(lambda th, p, g, s: small_fc.step(th, p, g, s, ctx))
"""

from lightning_lopt.optim.functional import celo, celo2, small_fc, velo
from lightning_lopt.optim.functional.context import StepContext

__all__ = ["StepContext", "celo", "celo2", "small_fc", "velo"]
