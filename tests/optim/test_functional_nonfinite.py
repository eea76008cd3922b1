"""A non-finite loss must not corrupt the loss statistics or the LSTM state of Celo / VeLO."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lopt.optim.architectures import CeloLOpt, VeLOLOpt
from lightning_lopt.optim.functional import StepContext

SHAPES = [(), (6,), (5, 5), (4, 3, 3, 3)]
SCHEDULER_KEYS = ("loss_means", "loss_running_min", "loss_count")


def lstm_state(state):
    if "lstm_hidden" in state:
        return [state["lstm_hidden"], state["lstm_cell"]]
    return [t[k] for t in state["tensors"] for k in ("lstm_hidden", "lstm_cell")]


def run(module, losses, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    state = module.init_state(params)
    history = [state]
    with torch.no_grad():
        for loss in losses:
            grads = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
            params, state = module.step(
                params, grads, state, StepContext([1.0] * len(SHAPES), torch.tensor(loss), 100)
            )
            history.append(state)
    return params, history


@pytest.mark.parametrize(
    "make",
    [lambda: CeloLOpt(lstm_hidden_size=8), lambda: VeLOLOpt(lstm_hidden_size=8, param_inits=4)],
    ids=["celo", "velo"],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_keeps_loss_buffer_and_lstm_state(make, bad):
    module = make()
    params, history = run(module, [2.3, 2.2, 2.0, bad, 1.9, 1.8])
    before, after = history[3], history[4]
    for key in SCHEDULER_KEYS:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    for a, b in zip(lstm_state(after), lstm_state(before)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(after["iteration"]) == int(before["iteration"]) + 1  # the step itself still happens
    assert int(history[-1]["loss_count"]) == 5
    assert all(torch.isfinite(p).all() for p in params)
    for state in history:
        assert torch.isfinite(state["loss_means"]).all()
        assert all(torch.isfinite(x).all() for x in lstm_state(state))


def test_nonfinite_first_loss_is_harmless():
    """With no loss seen yet, the buffer's bias correction is 0/0; the features must stay 0."""
    params, history = run(CeloLOpt(lstm_hidden_size=8), [math.nan, 2.0, 1.9])
    assert int(history[1]["loss_count"]) == 0
    assert all(torch.isfinite(p).all() for p in params)


def test_missing_loss_is_an_error():
    module = CeloLOpt(lstm_hidden_size=8)
    params = [torch.zeros(3)]
    with pytest.raises(ValueError, match="needs the training loss"):
        module.step(params, [torch.ones(3)], module.init_state(params), StepContext([1.0], None, 10))
