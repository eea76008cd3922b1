"""Update scales: exact expected tables, agreement with mup, and the helpers on user models."""

from __future__ import annotations

import mup
import pytest
import torch
from mup.infshape import InfDim, InfShape
from torch import nn

from lightning_lopt.models import (
    MuMLP,
    MuTransformerLM,
    MuViT,
    attach_readout_bases,
    attach_update_scales,
    is_hidden_matrix,
    mup_update_scales,
    param_update_scale,
    readout_base,
    relative_update_scale,
    update_scales_of,
)


def block_names(depth: int) -> list[str]:
    names = []
    for i in range(depth):
        for mod in ("norm1", "attn.query", "attn.key", "attn.value", "attn.out", "norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"]
    return names


def expected_mlp(width: int, depth: int, mup_: bool) -> dict[str, float]:
    names = ["input_layer.weight", "input_layer.bias"]
    for i in range(depth - 1):
        names += [f"hidden_layers.{i}.weight", f"hidden_layers.{i}.bias"]
    names += ["readout.weight", "readout.bias"]
    table = dict.fromkeys(names, 1.0)
    if mup_:
        for i in range(depth - 1):
            table[f"hidden_layers.{i}.weight"] = 1 / width
    return table


def expected_transformer(head: list[str], width: int, mlp_dim: int, depth: int, mup_: bool) -> dict[str, float]:
    tail = ["norm.weight", "norm.bias", "readout.weight", "readout.bias"]
    table = dict.fromkeys(head + block_names(depth) + tail, 1.0)
    if mup_:
        for i in range(depth):
            for mod in ("attn.query", "attn.key", "attn.value", "attn.out", "mlp.fc1"):
                table[f"blocks.{i}.{mod}.weight"] = 1 / width
            table[f"blocks.{i}.mlp.fc2.weight"] = 1 / mlp_dim
    return table


def check_scales(model: nn.Module, expected: dict[str, float]) -> None:
    names = [n for n, _ in model.named_parameters()]
    assert set(names) == set(expected)
    got = model.update_scales()
    assert list(got) == names
    assert got == pytest.approx(expected, rel=1e-12)
    assert all(type(v) is float for v in got.values())
    for name, p in model.named_parameters():
        assert p.lopt_update_scale == pytest.approx(expected[name], rel=1e-12)
        assert param_update_scale(p) == pytest.approx(expected[name], rel=1e-12)
    assert update_scales_of(model) == got


@pytest.mark.parametrize("param", ["mup", "sp"])
@pytest.mark.parametrize("width,depth", [(16, 1), (64, 3), (384, 4)])
def test_mlp_update_scales(width, depth, param):
    model = MuMLP((1, 8, 8), width=width, depth=depth, num_classes=10, param=param)
    check_scales(model, expected_mlp(width, depth, param == "mup"))


@pytest.mark.parametrize("param", ["mup", "sp"])
@pytest.mark.parametrize("width,heads,mlp_ratio", [(16, 2, 4), (48, 3, 2), (128, 8, 1.5)])
def test_vit_update_scales(width, heads, mlp_ratio, param):
    model = MuViT(8, 2, width, depth=2, heads=heads, mlp_ratio=mlp_ratio, num_classes=10, param=param)
    head = ["cls_token", "pos_embed", "patch_embed.weight", "patch_embed.bias"]
    check_scales(model, expected_transformer(head, width, int(mlp_ratio * width), 2, param == "mup"))


@pytest.mark.parametrize("param", ["mup", "sp"])
@pytest.mark.parametrize("width,heads", [(16, 2), (48, 3), (128, 4)])
def test_lm_update_scales(width, heads, param):
    model = MuTransformerLM(vocab_size=50, seq_len=16, width=width, depth=2, heads=heads, param=param)
    head = ["tok_embed.weight", "pos_embed.weight"]
    check_scales(model, expected_transformer(head, width, 4 * width, 2, param == "mup"))


@pytest.mark.parametrize(
    "model",
    [
        lambda: MuMLP(64, 128, 3, 10),
        lambda: MuViT(8, 2, 64, 2, 4, 4, 10),
        lambda: MuTransformerLM(50, 16, 64, 2, 4),
    ],
    ids=["mlp", "vit", "lm"],
)
def test_mup_models_carry_mup_shapes_with_base_width_one(model):
    model = model()
    # The same table from mup's own infshapes, and mup's MuAdam gives μLO's μAdam (lr / fan_in).
    assert mup_update_scales(model) == model.update_scales()
    opt = mup.MuAdam(model.parameters(), lr=0.1)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lrs[id(p)] == pytest.approx(0.1 * model.update_scales()[name], rel=1e-12), name


class UserNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 2 * width)
        self.readout = mup.MuReadout(2 * width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.fc3(self.fc2(self.fc1(x).relu()).relu()).relu())


USER_EXPECTED = {
    "fc1.weight": 1.0,
    "fc1.bias": 1.0,
    "fc2.weight": 1 / 96,
    "fc2.bias": 1.0,
    "fc3.weight": 1 / 96,  # fan_in is 96 even though fan_out is 192
    "fc3.bias": 1.0,
    "readout.weight": 1.0,
    "readout.bias": 1.0,
}


def test_mup_update_scales_on_user_model():
    model = mup.set_base_shapes(UserNet(96), UserNet(8), delta=UserNet(16))
    assert mup_update_scales(model) == pytest.approx(USER_EXPECTED, rel=1e-12)
    assert update_scales_of(model) == pytest.approx(USER_EXPECTED, rel=1e-12)  # no update_scales(): falls back
    assert param_update_scale(model.fc2.weight) == pytest.approx(1 / 96)
    attach_update_scales(model)
    assert model.fc3.weight.lopt_update_scale == pytest.approx(1 / 96)


def test_scales_do_not_depend_on_user_base_width(tmp_path):
    """Absolute 1/fan_in (μLO), not mup's 1/width_mult; also with shapes loaded from a .bsh file."""
    other_base = mup.set_base_shapes(UserNet(96), UserNet(32), delta=UserNet(48))
    assert mup_update_scales(other_base) == pytest.approx(USER_EXPECTED, rel=1e-12)
    path = str(tmp_path / "net.bsh")
    mup.make_base_shapes(UserNet(8), UserNet(16), savefile=path)
    model = UserNet(96)
    mup.apply_infshapes(model, mup.load_base_shapes(path))  # InfDim.dim is None here
    assert mup_update_scales(model) == pytest.approx(USER_EXPECTED, rel=1e-12)


def test_missing_shapes_error_names_parameter_and_fix():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"'0\.weight'.*mup\.set_base_shapes\(model, base, delta=delta\)"):
        mup_update_scales(model)
    with pytest.raises(ValueError, match=r"'0\.weight'.*attach_update_scales"):
        update_scales_of(model)
    assert param_update_scale(model[0].weight) is None
    with pytest.raises(ValueError, match=r"'input_layer\.weight'.*set_base_shapes"):
        mup_update_scales(MuMLP(4, 8, 2, 2, param="sp"))  # SP models carry no mup shapes


def test_more_than_two_width_dims_is_rejected():
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(2, 3, 4))
    model.w.infshape = InfShape([InfDim(1, 2), InfDim(1, 3), InfDim(1, 4)])
    with pytest.raises(ValueError, match=r"'w' has 3 width dimensions"):
        mup_update_scales(model)


def test_attach_update_scales_explicit_table_and_errors():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    table = {"0.weight": 0.5, "0.bias": 1.0, "1.weight": 0.25, "1.bias": 1.0}
    assert attach_update_scales(model, table) is model
    assert [param_update_scale(p) for p in model.parameters()] == [0.5, 1.0, 0.25, 1.0]
    assert update_scales_of(model) == table  # attached floats are found without infshape
    with pytest.raises(ValueError, match=r"no update scale for parameter '1\.bias'"):
        attach_update_scales(model, {k: v for k, v in table.items() if k != "1.bias"})
    with pytest.raises(ValueError, match=r"'2\.weight' is not a parameter name"):
        attach_update_scales(model, {**table, "2.weight": 1.0})


@pytest.mark.parametrize("param", ["mup", "sp"])
def test_update_scales_of_wrapped_model_uses_prefixed_names(param):
    inner = MuMLP(16, 32, 3, 4, param=param)
    wrapper = nn.Sequential(inner)
    assert update_scales_of(wrapper) == {f"0.{k}": v for k, v in inner.update_scales().items()}


def test_update_scales_returns_a_copy():
    model = MuMLP(16, 32, 3, 4)
    model.update_scales()["hidden_layers.0.weight"] = 123.0
    assert model.update_scales()["hidden_layers.0.weight"] == pytest.approx(1 / 32)


@pytest.mark.parametrize(
    "model",
    [
        lambda param: MuMLP(16, 32, 3, 4, param=param),
        lambda param: MuViT(8, 2, 32, 1, 2, 4.0, 10, param),
        lambda param: MuTransformerLM(50, 8, 32, 1, 2, param),
    ],
    ids=["mlp", "vit", "lm"],
)
def test_library_readouts_are_marked_with_base_one_and_nothing_else_is(model):
    """μLO's readout multiplies weight and bias by 1/fan_in (base 1); embeddings and cls tokens,
    whose infshape looks like a readout's ([n, width]), are not readouts. Marks survive deepcopy."""
    import copy

    for m in (model("mup"), copy.deepcopy(model("mup"))):
        marked = {n: readout_base(p) for n, p in m.named_parameters() if readout_base(p) is not None}
        assert marked == {"readout.weight": 1.0, "readout.bias": 1.0}
    assert all(readout_base(p) is None for p in model("sp").parameters())


def test_user_mup_readout_base_is_its_base_fan_in_and_its_bias_is_not_a_readout():
    model = mup.set_base_shapes(UserNet(96), UserNet(32), delta=UserNet(48))
    assert all(readout_base(p) is None for p in model.parameters())  # not marked yet
    assert attach_readout_bases(model) == {"readout.weight": pytest.approx(64.0)}  # fan-in 192, base 2x32
    assert readout_base(model.readout.weight) == pytest.approx(64.0)
    assert readout_base(model.readout.bias) is None  # mup scales the readout's input, not its bias


def test_relative_update_scale_arithmetic():
    assert relative_update_scale(1 / 512, None, 128) == pytest.approx(0.25)  # hidden
    assert relative_update_scale(1 / 128, None, 128) == pytest.approx(1.0)  # hidden at the base width
    assert relative_update_scale(1.0, 1.0, 128) == 128.0  # μLO readout, base fan-in 1
    assert relative_update_scale(1.0, 64.0, 128) == 2.0  # mup readout with base fan-in 64
    assert relative_update_scale(1.0, None, 128) == 1.0  # input layer, vectors


def test_is_hidden_matrix_from_the_absolute_scale_the_rank_and_the_readout_mark():
    model = MuMLP((1, 8, 8), width=32, depth=3, num_classes=10)  # marks its readout
    scales = update_scales_of(model)
    hidden = {n for n, p in model.named_parameters() if is_hidden_matrix(p, scales[n])}
    assert hidden == {"hidden_layers.0.weight", "hidden_layers.1.weight"}
    assert not is_hidden_matrix(torch.zeros(32), 1 / 32)  # a vector with a small scale
    assert not is_hidden_matrix(model.readout.weight, 1 / 32)  # marked readout, whatever the scale
