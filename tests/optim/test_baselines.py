import numpy as np
import pytest
import torch

from lightning_lopt.optim import MuAdam, scaled_param_groups


def _adam_reference(p0, grads, lr, scale, betas=(0.9, 0.999), eps=1e-8):
    """Plain NumPy Adam whose step is multiplied by the μP scale (μLO's μAdam)."""
    p, m, v = p0.astype(np.float64), np.zeros_like(p0, np.float64), np.zeros_like(p0, np.float64)
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        mhat, vhat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * scale * mhat / (np.sqrt(vhat) + eps)
    return p


def test_muadam_matches_scaled_adam_reference():
    hidden = torch.nn.Parameter(torch.randn(16, 16))
    bias = torch.nn.Parameter(torch.randn(16))
    scales = {"hidden": 1 / 16, "bias": 1.0}
    opt = MuAdam([("hidden", hidden), ("bias", bias)], lr=0.1, scales=scales)
    rng = np.random.default_rng(0)
    grads = {n: [rng.standard_normal(p.shape).astype(np.float32) for _ in range(5)] for n, p in [("hidden", hidden), ("bias", bias)]}
    start = {"hidden": hidden.detach().numpy().copy(), "bias": bias.detach().numpy().copy()}
    for t in range(5):
        hidden.grad, bias.grad = torch.from_numpy(grads["hidden"][t]), torch.from_numpy(grads["bias"][t])
        opt.step()
    for name, p in [("hidden", hidden), ("bias", bias)]:
        expected = _adam_reference(start[name], grads[name], 0.1, scales[name])
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_scales_from_parameter_attributes_and_weight_decay_rule():
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.lopt_update_scale = 0.25
    opt = MuAdam([p], lr=1e-2, weight_decay=1e-3)
    (group,) = opt.param_groups
    assert group["lr"] == pytest.approx(2.5e-3)
    assert group["weight_decay"] == pytest.approx(4e-3)  # lr * wd is width-independent


def test_missing_mup_information_names_the_parameter():
    with pytest.raises(ValueError, match=r"parameter 'net.fc.weight' \(shape \[4, 4\]\).*set_base_shapes"):
        MuAdam([("net.fc.weight", torch.nn.Parameter(torch.randn(4, 4)))])
    with pytest.raises(ValueError, match=r"parameter #0"):
        MuAdam([torch.nn.Parameter(torch.randn(4, 4))])
    opt = MuAdam([torch.nn.Parameter(torch.randn(4, 4))], allow_sp=True, lr=0.1)
    assert opt.param_groups[0]["lr"] == 0.1


def test_groups_keep_options_and_split_by_scale():
    a, b, c = (torch.nn.Parameter(torch.randn(2)) for _ in range(3))
    groups = scaled_param_groups(
        [{"params": [("a", a), ("b", b)], "lr": 0.3}, {"params": [c], "update_scale": 0.5}],
        {"a": 1.0, "b": 0.125},
    )
    assert [(g["update_scale"], g["lr"] if "lr" in g else None, len(g["params"])) for g in groups] == [
        (1.0, 0.3, 1),
        (0.125, 0.3, 1),
        (0.5, None, 1),
    ]


def test_empty_params_is_a_clear_error():
    with pytest.raises(ValueError, match="params: .*empty"):
        MuAdam([])
