"""The one-time warning for tensors a learned optimizer cannot move and rounding-noise gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_lopt import Celo, MuLO
from lightning_lopt.models import MuMLP
from lightning_lopt.optim.stuck_tensors import StuckTensorCheck, stuck_tensors


def _steps(model, opt, n=3):
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss=loss)
    ours = ("cannot move", "rounding noise")
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and any(o in str(w.message) for o in ours)]


def _mlp(param):
    torch.manual_seed(0)
    return MuMLP(in_shape=[1, 8, 8], width=32, depth=2, num_classes=10, param=param)


def test_celo_on_a_zero_readout_warns_once_naming_the_tensor_and_the_fix():
    model = _mlp("mup")
    caught = _steps(model, Celo(model.parameters(), num_steps=10))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "parameter 4 [10, 32] is all zero" in message  # the readout weight
    assert "cannot move" in message and "param='sp'" in message and "(MuLO, MuVeLO)" in message
    assert caught[0].filename == __file__  # points at the step call


@pytest.mark.parametrize(
    ("optimizer", "param"), [(lambda p: Celo(p, num_steps=10), "sp"), (lambda p: MuLO(p), "mup")], ids=["celo-sp", "mulo-mup"]
)
def test_no_warning_where_the_optimizer_moves_every_tensor(optimizer, param):
    model = _mlp(param)
    assert _steps(model, optimizer(model.parameters())) == []


def test_rounding_noise_gradients_are_found_and_exact_zeros_are_not():
    torch.manual_seed(0)
    params = [torch.randn(4, 4), torch.randn(4), torch.zeros(3)]
    grads = [torch.randn(4, 4), torch.randn(4) * 1e-11, torch.zeros(3)]
    names = ["w", "b", "z"]
    assert stuck_tensors(names, params, grads, moves_by_param_rms=False) == ([], ["b"])
    assert stuck_tensors(names, params, grads, moves_by_param_rms=True) == (["z"], ["b"])
    grads[1] = torch.randn(4) * 1e-3  # small, but far above float32 rounding of the largest gradient
    assert stuck_tensors(names, params, grads, moves_by_param_rms=False) == ([], [])


def test_noise_alone_does_not_suggest_the_optimizer_that_warned():
    """MuLO warns about rounding-noise gradients behind a zero readout; pointing a MuLO user to MuLO
    would be no advice, so the fix offered is the initialisation only."""
    params = [torch.randn(4, 4), torch.randn(4)]
    grads = [torch.randn(4, 4), torch.randn(4) * 1e-11]
    with pytest.warns(RuntimeWarning) as caught:
        # any module that does not scale steps by the parameter RMS stands for small_fc_lopt here
        StuckTensorCheck("MuLO")(torch.nn.Linear(1, 1), params, grads)
    message = str(caught[0].message)
    assert message.startswith("MuLO: the gradients of parameter 1 [4] are rounding noise")
    assert "param='sp'" in message and "(MuLO, MuVeLO)" not in message
