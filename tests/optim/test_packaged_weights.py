"""The meta-trained weights packaged in ``lightning_lopt/pretrained/``: cards, offline loading by
name, that the optimizer classes use them by default, and what they do on a task they were not
meta-trained on (digits) compared with AdamW."""

from __future__ import annotations

import functools
import json
import math
import re
import warnings

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from lightning_lopt.datamodules import DigitsDataModule
from lightning_lopt.models import MuMLP
from lightning_lopt.models.scales import update_scales_of
from lightning_lopt.optim import build, pretrained
from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt
from lightning_lopt.optim.celo2 import Celo2, MuCelo2
from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.optimizers import LO, Celo, MuLO

PACKAGED = {
    "mulo-fmnist8-w32-128": SmallFCLOpt,
    "mulo-fmnist8-w32-128-long4k": SmallFCLOpt,
    "mulo-fmnist8-16x16-mix10k": SmallFCLOpt,
    "mulo-fmnist8-16x16-mix10k-v2": SmallFCLOpt,
    "lo-fmnist8-w32-128": SmallFCLOpt,
    "lo-fmnist8-w32-128-long4k": SmallFCLOpt,
    "celo-8x8-mlp-w32": CeloLOpt,
    "celo2-8x8-mlp-w32": Celo2LOpt,
    "celo2-8x8-16x16-mlp-mix10k": Celo2LOpt,
    "mucelo2-8x8-mlp-w32-128": Celo2LOpt,
    "mucelo2-8x8-mlp-w32-128-base128": Celo2LOpt,
    "mucelo2-8x8-16x16-mlp-mix10k": Celo2LOpt,
}
DEFAULTS = {
    MuLO: "mulo-fmnist8-w32-128",
    LO: "lo-fmnist8-w32-128",
    Celo: "celo-8x8-mlp-w32",
    Celo2: "celo2-8x8-16x16-mlp-mix10k",
    MuCelo2: "mucelo2-8x8-mlp-w32-128-base128",
}
#: The longest episode of the CPU recipes (truncation max_length): "10x the meta-training unroll".
META_UNROLL = 1000


def test_the_packaged_names_are_exactly_the_shipped_weights() -> None:
    assert sorted(pretrained.available()) == sorted(PACKAGED)


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_card_schema(name: str) -> None:
    directory = pretrained.PACKAGED_DIR / name
    card = json.loads((directory / pretrained.CARD_NAME).read_text())
    assert card["name"] == name and card["format_version"] == pretrained.FORMAT_VERSION
    assert card["architecture"] == PACKAGED[name].architecture
    assert isinstance(card["summary"], str) and len(card["summary"]) > 80
    assert isinstance(card["meta_training_steps"], int) and card["meta_training_steps"] > 0
    compute = card["compute"]
    assert compute["seconds"] > 0 and compute["device"] in ("cpu", "cuda") and compute["machine"]
    recipe = card["recipe"]
    assert recipe["name"] and recipe["estimator"]["num_pairs"] > 0 and recipe["truncation"]["max_length"] > 0
    assert card["tasks"] and all(isinstance(t, str) for t in card["tasks"])
    assert card["data"] and card["commit"]
    # The name says the scale honestly: every meta-training task is at most 16x16 and 128 wide, and
    # a name without "16x16" has only 8x8 tasks (labels like "mlp-mnist16-d2-sp-w64").
    widths = [int(t.rsplit("-w", 1)[1]) for t in card["tasks"]]
    sizes = {int(re.search(r"(\d+)-d\d+-", t).group(1)) for t in card["tasks"]}
    assert max(widths) <= 128 and sizes <= {8, 16}
    assert ("16x16" in name) == (16 in sizes)
    if name.startswith(("mulo", "lo")):
        # Warm start is disclosed with its teacher and how well the regression fit.
        warm = recipe["warm_start"]
        assert warm["settings"]["teacher"] in ("muadam", "adam") and warm["relative_error_end"]
        # ... and so is its compute: the card's total includes it.
        assert compute["warm_start_cpu_seconds"] > 0
        assert compute["total_seconds"] == pytest.approx(compute["seconds"] + compute["warm_start_cpu_seconds"], abs=0.1)
    tensors = safetensors.torch.load_file(str(directory / pretrained.WEIGHTS_NAME))
    assert sum(t.numel() for t in tensors.values()) == card["num_meta_params"]
    assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_loads_by_name_offline(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = pretrained.from_pretrained(name)
    assert type(module) is PACKAGED[name]
    saved = safetensors.torch.load_file(str(pretrained.PACKAGED_DIR / name / pretrained.WEIGHTS_NAME))
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


@pytest.mark.parametrize("cls", list(DEFAULTS), ids=lambda c: c.__name__)
def test_optimizers_use_their_packaged_weights_by_default_without_warning(cls: type) -> None:
    param = torch.nn.Parameter(torch.randn(4, 3))
    kwargs = {"num_steps": 10} if cls is Celo else {"allow_sp": True} if cls in (MuLO, MuCelo2) else {}
    if cls is MuCelo2:
        kwargs["base_width"] = None  # a bare tensor has no readout for the relative scales to find
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = cls([param], **kwargs)
    expected = pretrained.from_pretrained(DEFAULTS[cls]).state_dict()
    for key, value in opt.meta_weights.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def _train_digits(name: str, steps: int, seed: int, **kwargs: float) -> tuple[list[float], torch.nn.Module]:
    """Minibatch training losses of a depth-3, width-64 MLP on digits (a data set none of the
    weights were meta-trained on), μP for the μ optimizers and standard-parametrized for the others,
    as in μLO's evaluation."""
    torch.manual_seed(seed)
    data = DigitsDataModule(batch_size=64, seed=seed)
    param = "mup" if name in ("mulo", "muadam") else "sp"
    model = MuMLP(data.input_shape, width=64, depth=3, num_classes=data.num_classes, param=param)
    opt = build(name, model.named_parameters(), scales=update_scales_of(model), **kwargs)
    xs, ys = data.sample(64, steps, torch.Generator().manual_seed(seed))
    losses = []
    for x, y in zip(xs, ys):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if name == "celo":
            opt.step(loss=loss)
        else:
            opt.step()
        losses.append(loss.item())
    return losses, model


def _final(run: tuple[list[float], torch.nn.Module]) -> float:
    return sum(run[0][-10:]) / 10


@pytest.mark.parametrize("seed", [0, 1])
def test_pretrained_mulo_beats_adamw_at_lr_1e3_on_digits(seed: int) -> None:
    steps = 300
    mulo = _final(_train_digits("mulo", steps, seed))
    adamw = _final(_train_digits("adamw", steps, seed, lr=1e-3))
    initial = math.log(10)
    # Measured 2026-12-04 (seeds 0 / 1): μLO 0.036 / 0.024 with the fused step (0.022 / 0.038 pure),
    # AdamW 0.062 / 0.042. Repeatable on one machine; μLO's digits vary across machines and step
    # paths (another machine: 0.035 / 0.030 fused), so the margin, not the digits, is asserted.
    assert mulo < 0.85 * adamw, (mulo, adamw)
    assert mulo < 0.02 * initial


def test_pretrained_lo_and_celo_train_digits() -> None:
    lo = _final(_train_digits("lo", 300, 0))
    celo = _final(_train_digits("celo", 300, 0, num_steps=300))
    # Measured: LO 0.058, Celo 0.012, from ln 10 = 2.30.
    assert lo < 0.05 * math.log(10) and celo < 0.05 * math.log(10), (lo, celo)


@functools.lru_cache(maxsize=1)
def _mulo_digits_ten_horizons() -> tuple[list[float], bool]:
    """100-step mean losses of one 10x-horizon μLO run on digits (seed 0), and whether every loss and
    parameter stayed finite; run once (about 20 s) for the tests below."""
    losses, model = _train_digits("mulo", 10 * META_UNROLL, seed=0)
    finite = all(math.isfinite(v) for v in losses) and all(torch.isfinite(p).all() for p in model.parameters())
    return [sum(losses[i : i + 100]) / 100 for i in range(0, len(losses), 100)], finite


@pytest.mark.slow
def test_pretrained_mulo_learns_and_stays_finite_for_ten_times_its_meta_training_unroll() -> None:
    """Finite losses and parameters for 10x the longest meta-training episode, and a loss far below
    chance (ln 10 = 2.30) from step 500 to 2x the horizon.

    Measured (100-step means): 0.47 over the first 100 steps, 0.010–0.036 from step 500 to 3000, then
    a drift up: 0.13 at 5000, 0.31 at 8000, 2.08 at 9900. An optimizer that does nothing stays at
    2.30 and fails; the old check (every window under the 1.5 ln 10 divergence cap) let it pass.
    """
    windows, finite = _mulo_digits_ten_horizons()
    assert finite
    assert max(windows[5 : 2 * META_UNROLL // 100]) < 0.1, windows[:20]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="missed target (issue 19, docs/results.md 'Horizon'): the loss drifts up after ~2x the horizon")
def test_pretrained_mulo_loss_at_ten_times_its_meta_training_unroll_is_no_worse_than_at_it() -> None:
    """The issue's target: the loss at 10x the horizon ≤ the loss at the horizon. Measured 2.08 vs
    0.027 with the packaged weights; strict, so weights that meet it turn this red until the mark
    is removed."""
    windows, _ = _mulo_digits_ten_horizons()
    assert windows[-1] <= windows[META_UNROLL // 100], (windows[META_UNROLL // 100], windows[-1])
