"""param_groups_by_role: which tensor lands in which group, what each group sets, and that an optimizer
built on the groups moves each tensor by its own learning rate."""

import pytest
import torch
from torch import nn

from lightning_lopt.models import MuMLP
from lightning_lopt.optim import MuLO, param_groups_by_role

HIDDEN = {"hidden_layers.0.weight", "hidden_layers.1.weight"}  # [128, 128]: fan-in scales with width
VECTORS = {"input_layer.bias", "hidden_layers.0.bias", "hidden_layers.1.bias", "readout.bias"}
REST = {"input_layer.weight", "readout.weight"}


def _model() -> MuMLP:
    torch.manual_seed(0)
    return MuMLP(64, 128, 3, 10)


def _names(group: dict) -> set[str]:
    return {n for n, _ in group["params"]}


def test_groups_by_role_with_their_settings() -> None:
    groups = param_groups_by_role(_model(), 0.5, hidden_lr_mult=2.0, vector_weight_decay=3e-3, vector_lr_mult=0.1)
    assert [_names(g) for g in groups] == [HIDDEN, VECTORS, REST]
    assert [{k: v for k, v in g.items() if k != "params"} for g in groups] == [
        {"lr": 1.0},
        {"weight_decay": 3e-3, "lr": pytest.approx(0.05)},
        {},
    ]


def test_only_the_requested_split_is_made() -> None:
    model = _model()
    assert param_groups_by_role(model) == list(model.named_parameters())  # nothing to split
    only_hidden = param_groups_by_role(model, 0.5, hidden_lr_mult=2.0)
    assert [_names(g) for g in only_hidden] == [HIDDEN, VECTORS | REST]  # 1-D tensors stay with the rest
    only_vectors = param_groups_by_role(model, vector_weight_decay=0.0)
    assert [_names(g) for g in only_vectors] == [VECTORS, HIDDEN | REST]
    assert only_vectors[0]["weight_decay"] == 0.0


def test_scales_come_from_the_tensors_of_a_wrapped_model() -> None:
    # A module without update_scales(): the scales our models attach to their tensors are read instead.
    wrapper = nn.ModuleDict({"net": _model()})
    groups = param_groups_by_role(wrapper, 1.0, hidden_lr_mult=4.0)
    assert _names(groups[0]) == {f"net.{n}" for n in HIDDEN}
    assert groups[0]["lr"] == 4.0


def test_the_hidden_matrices_move_by_their_own_lr() -> None:
    # One MuLO step is lr times a step that does not depend on lr, so doubling the hidden matrices'
    # lr doubles their change and leaves every other tensor's change as it was.
    def step(groups_of) -> dict[str, torch.Tensor]:  # noqa: ANN001
        model = _model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        MuLO(groups_of(model), lr=0.5).step()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}, before

    plain, before = step(lambda m: list(m.named_parameters()))
    split, _ = step(lambda m: param_groups_by_role(m, 0.5, hidden_lr_mult=2.0))
    for name, delta in plain.items():
        assert delta.abs().max() > 0, name
        expected = 2 * delta if name in HIDDEN else delta
        # each delta is (p - lr*u) - p in float32: one rounding of p, at most half an ulp of |p|
        tol = 2 * torch.finfo(torch.float32).eps * (before[name].abs().max() + expected.abs().max())
        torch.testing.assert_close(split[name], expected, rtol=0, atol=float(tol), msg=name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_lr_mult": 2.0}, "hidden_lr_mult needs an explicit lr"),
        ({"vector_lr_mult": 0.5}, "vector_lr_mult needs an explicit lr"),
        ({"lr": 1.0, "hidden_lr_mult": 0.0}, "hidden_lr_mult must be a positive finite number"),
        ({"lr": 1.0, "vector_lr_mult": float("nan")}, "vector_lr_mult must be a positive finite number"),
        ({"vector_weight_decay": -1e-3}, "vector_weight_decay must be a non-negative number"),
        ({"vector_weight_decay": True}, "vector_weight_decay must be a non-negative number"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        param_groups_by_role(_model(), **kwargs)


def test_a_model_without_update_scales_is_refused_for_a_hidden_split() -> None:
    plain = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    with pytest.raises(ValueError):
        param_groups_by_role(plain, 1.0, hidden_lr_mult=2.0)
    with pytest.raises(ValueError, match="no update scale"):
        param_groups_by_role(plain, 1.0, hidden_lr_mult=2.0, scales={"0.weight": 1.0})
    # the 1-D split needs no scales
    assert len(param_groups_by_role(plain, vector_weight_decay=1e-2)) == 2
