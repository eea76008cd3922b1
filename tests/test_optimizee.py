import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lopt import OptimizeeModule
from lightning_lopt.models import MuMLP, MuTransformerLM


def _stack(params_list):
    return {k: torch.stack([p[k] for p in params_list]) for k in params_list[0]}


@pytest.mark.parametrize("objective", ["classification", "autoencoder"])
def test_loss_under_vmap_over_4_copies_equals_4_separate_calls(objective):
    out = 10 if objective == "classification" else 64
    module = OptimizeeModule(MuMLP(64, width=32, depth=3, num_classes=out), objective=objective, num_classes=10)
    base = {k: v.detach() for k, v in module.model.named_parameters()}
    copies = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(4)]
    x = torch.randn(4, 8, 64)
    y = torch.randint(0, 10, (4, 8))
    batched = torch.func.vmap(module.loss)(_stack(copies), (x, y))
    separate = torch.stack([module.loss(copies[i], (x[i], y[i])) for i in range(4)])
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)
    assert batched.std() > 0  # the copies really differ


def test_loss_is_pure_and_matches_an_independent_cross_entropy():
    module = OptimizeeModule(MuMLP(16, width=8, depth=2, num_classes=3))
    params = {k: torch.randn_like(v) for k, v in module.model.named_parameters()}
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    x, y = torch.randn(5, 16), torch.randint(0, 3, (5,))
    logits = torch.func.functional_call(module.model, params, (x,))
    log_probs = logits - logits.logsumexp(dim=1, keepdim=True)
    expected = -log_probs[torch.arange(5), y].mean()
    torch.testing.assert_close(module.loss(params, (x, y)), expected)
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, before[k])  # the module's own weights are untouched


def test_lm_objective_and_grad_through_loss():
    model = MuTransformerLM(vocab_size=32, seq_len=8, width=16, depth=1, heads=2)
    module = OptimizeeModule(model, objective="lm")
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    x = torch.randint(0, 32, (2, 8))
    y = torch.roll(x, -1, 1)
    loss = module.loss(params, (x, y))
    assert loss.shape == () and torch.isfinite(loss)
    # zero readout weight under μP: every position's logits are readout.bias / width
    log_probs = torch.log_softmax(model.readout.bias.detach() / 16, dim=0)
    torch.testing.assert_close(loss, -log_probs[y].mean())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_update_scales_are_prefixed_like_named_parameters():
    module = OptimizeeModule(MuMLP(16, width=8, depth=3, num_classes=3))
    scales = module.update_scales()
    assert set(scales) == {n for n, _ in module.named_parameters()}
    assert min(scales.values()) == pytest.approx(1 / 8)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="objective"):
        OptimizeeModule(MuMLP(16, 8, 2, 3), objective="regression")
    with pytest.raises(ValueError, match="num_classes"):
        OptimizeeModule(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="model"):
        OptimizeeModule("mlp")


def test_plain_user_model_trains_with_adamw_without_mup_information():
    module = OptimizeeModule(nn.Linear(4, 3), num_classes=3, optimizer="adamw", optimizer_kwargs={"lr": 0.5})
    opt = module.configure_optimizers()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    first = F.cross_entropy(module(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    assert F.cross_entropy(module(x), y).item() < first


def test_allow_sp_reaches_mu_optimizers_for_models_without_mup_information():
    module = OptimizeeModule(nn.Linear(4, 3), num_classes=3, optimizer="muadam", optimizer_kwargs={"allow_sp": True})
    opt = module.configure_optimizers()
    assert {g["update_scale"] for g in opt.param_groups} == {1.0}
    with pytest.raises(ValueError, match="set_base_shapes"):
        OptimizeeModule(nn.Linear(4, 3), num_classes=3, optimizer="muadam").configure_optimizers()
