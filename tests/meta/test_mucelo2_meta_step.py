"""MuCelo2 meta-trains with its μP scales: one inner step of the meta-training path is a MuCelo2 step.

The reference is the ``MuCelo2`` optimizer class in meta-training mode (inner lr 1e-3, Adam branch
without bias correction at 20x lr), resolving the μP scales itself from the μP MLP; the
meta-training path is ``init_particles`` + ``unroll_window`` of ``MetaTrainer("mucelo2")``. Each is
run with the same implementation of the rule (the pure step: the vmapped pure particle step against
``fused=False``; the fused step: the fused particle step against ``fused=True``), so they differ
only by float32 rounding: of the update u (a few ulp of |u|, amplified by Newton–Schulz; 8 eps of
the step is allowed) and of the stored parameter (2 ulp of its largest entry). A path that ignored
the scales would move the hidden matrix by 1e-3 instead of 1e-3/16.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_map

from lightning_lopt.meta import PES, ImageMLPTask, LogUniformLengthSchedule, MetaTrainer
from lightning_lopt.meta.inner_eval import HELD_OUT
from lightning_lopt.meta.rng import generator
from lightning_lopt.meta import unroll
from lightning_lopt.meta.unroll import init_particles, unroll_window
from lightning_lopt.optim.celo2 import MuCelo2
from lightning_lopt.optim.functional import celo2
from lightning_lopt.optim.particle_step import vmapped_pure_step

WIDTH = 16
EPS32 = torch.finfo(torch.float32).eps


def build(lopt: str, base_width: float | None = None, hidden_norm: str = "rms") -> MetaTrainer:
    task = ImageMLPTask("digits", widths=[WIDTH], depth=2, param="mup", batch_size=8)
    return MetaTrainer(
        lopt, tasks=[task], estimator=PES(num_pairs=1, trunc_length=1), truncation=LogUniformLengthSchedule(10, 10),
        base_width=base_width, hidden_norm=hidden_norm,
    )


def meta_training_step(meta: MetaTrainer) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Parameters before and after one unperturbed inner step of particle 0, and its batch."""
    inst, lopt = meta.instances[0], meta.lopt
    theta = {k: v.detach().unsqueeze(0).expand(2, *v.shape) for k, v in lopt.state_dict().items()}
    keys = lambda stream, pair, t: generator(HELD_OUT, 0, int(stream), t)  # noqa: E731
    schedule = LogUniformLengthSchedule(10, 10)
    particles = init_particles(inst, lopt, theta, keys, schedule, 0, None, 1, 1)
    before = [p[0].clone() for p in particles.params]
    batches = inst.sample(1, [generator(HELD_OUT, 0, 99)])
    after, _ = unroll_window(inst, lopt, theta, particles, batches, keys, schedule, None)
    return before, [p[0] for p in after.params], tree_map(lambda x: x[0, 0], batches)


@pytest.mark.parametrize("hidden_norm", ["rms", "spectral"])
@pytest.mark.parametrize("base_width", [None, 4.0], ids=["absolute", "base4"])
@pytest.mark.parametrize("fused", [False, True], ids=["pure", "fused"])
def test_mucelo2_meta_training_step_is_the_mucelo2_class_step_in_meta_training_mode(
    fused, base_width, hidden_norm, monkeypatch
):
    if not fused:
        monkeypatch.setattr(unroll, "particle_step", vmapped_pure_step)
    meta = build("mucelo2", base_width, hidden_norm)
    inst = meta.instances[0]
    before, stepped, batch = meta_training_step(meta)

    model = inst.module
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in named] == inst.names
    with torch.no_grad():
        for (_, p), value in zip(named, before):
            p.copy_(value)
    loss = inst.loss({n: p for n, p in named}, batch)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    opt = MuCelo2(
        named, lr=celo2.META_TRAINING_STEP_MULT, base_width=base_width, meta_weights=meta.lopt, adam_mode="meta_training",
        adam_lr_mult=celo2.META_TRAINING_ADAM_LR_MULT, fused=fused, hidden_norm=hidden_norm,
    )
    resolved = {id(p): g["update_scale"] for g in opt.param_groups for p in g["params"]}
    scales = [resolved[id(p)] for _, p in named]
    assert scales == inst.scales
    for (_, p), g in zip(named, grads):
        p.grad = g
    opt.step()

    # Independent of both paths: the hidden matrix's fan-in is WIDTH; the μLO readout's base fan-in is 1.
    expected = {"model.hidden_layers.0.weight": 1.0 / WIDTH}
    if base_width is not None:
        expected = {"model.hidden_layers.0.weight": base_width / WIDTH, "model.readout.weight": base_width,
                    "model.readout.bias": base_width}
    assert {n: s for n, s in zip(inst.names, scales) if s != 1.0} == expected
    for name, (_, p), new, old in zip(inst.names, named, stepped, before):
        tol = 8 * EPS32 * float((new - old).abs().max()) + 2 * EPS32 * max(float(old.abs().max()), float(new.abs().max()))
        err = float((new - p.detach()).abs().max())
        assert err <= tol, f"{name}: meta-training step differs from MuCelo2's by {err:.3g} > {tol:.3g}"
    # The μP readout starts at zero, so at the first step only the readout has a gradient: the
    # learned rule still moves every matrix (through its parameter features), the Adam branch only
    # the readout bias. The hidden matrix moving by ~1e-3/16 is what the scale check rests on.
    moved = {n for n, new, old in zip(inst.names, stepped, before) if not torch.equal(new, old)}
    assert {"model.hidden_layers.0.weight", "model.readout.bias"} <= moved


def test_mucelo2_scales_are_not_celo2s():
    mu, sp = build("mucelo2").instances[0], build("celo2").instances[0]
    assert mu.names == sp.names and sp.scales == [1.0] * len(sp.names)
    assert [n for n, a in zip(mu.names, mu.scales) if a != 1.0] == ["model.hidden_layers.0.weight"]


def test_spectral_targets_of_the_meta_training_path_and_their_checks():
    """Only the hidden matrix gets a target: sqrt(fan_in / scale) for the square WIDTH x WIDTH one,
    computed here from the widths; the card records the rule; a non-μ optimizer or an unknown rule
    is refused; the default stays the RMS rule (no targets)."""
    for base_width, scale in ((None, 1 / WIDTH), (4.0, 4.0 / WIDTH)):
        meta = build("mucelo2", base_width, "spectral")
        inst = meta.instances[0]
        targets = {n: t for n, t in zip(inst.names, inst.spectral) if t is not None}
        assert targets == {"model.hidden_layers.0.weight": pytest.approx((WIDTH / scale) ** 0.5)}
        assert meta.card()["recipe"]["hidden_norm"] == "spectral"
    assert build("mucelo2").instances[0].spectral is None
    assert build("mucelo2").card()["recipe"]["hidden_norm"] == "rms"
    with pytest.raises(ValueError, match="needs a μ learned optimizer"):
        build("celo2", None, "spectral")
    with pytest.raises(ValueError, match="hidden_norm must be one of"):
        build("mucelo2", None, "frobenius")


def test_base_width_is_checked_and_recorded():
    assert build("mucelo2", 4).card()["recipe"]["base_width"] == 4.0
    assert build("mucelo2").card()["recipe"]["base_width"] is None
    with pytest.raises(ValueError, match="needs a μ learned optimizer"):
        build("celo2", 4.0)
    for bad in (0, -1.0, True, "128"):
        with pytest.raises(ValueError, match="base_width must be a positive number"):
            build("mucelo2", bad)


def test_a_user_mup_model_gets_relative_scales_with_its_readout_marked():
    """A user's LightningModule with a ``mup.MuReadout`` and no marks: building the task marks the
    readout; the scales are computed here from the widths (hidden 64→64 at base 8)."""
    import lightning as L
    import mup
    from torch import nn

    from lightning_lopt.meta import Task
    from meta_toys import ConstantData, LearnedSGD

    class Net(L.LightningModule):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(1, width), nn.Linear(width, width), mup.MuReadout(width, 3)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x))))).square().mean()

    def factory(seed: int, width: int | None) -> Net:
        torch.manual_seed(seed)
        return mup.set_base_shapes(Net(64), Net(8), delta=Net(16))

    def scales(base_width: float | None) -> dict[str, float]:
        meta = MetaTrainer(LearnedSGD(), tasks=[Task(factory, ConstantData())], mu=True, base_width=base_width,
                           estimator=PES(num_pairs=1, trunc_length=1), truncation=LogUniformLengthSchedule(10, 10))
        inst = meta.instances[0]
        return dict(zip(inst.names, inst.scales))

    # readout: base fan-in 8 (width 64 / width_mult 8), so base_width 16 gives 16 / 8; mup's readout
    # bias is not multiplied by 1/width_mult and keeps 1.
    assert scales(16.0) == {"fc1.weight": 1.0, "fc1.bias": 1.0, "fc2.weight": 16 / 64, "fc2.bias": 1.0,
                            "out.weight": 2.0, "out.bias": 1.0}
    assert scales(None)["fc2.weight"] == 1 / 64 and scales(None)["out.weight"] == 1.0
