"""ImageViTTask: an attention network as a meta-training task (issue 19's distribution change)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_lopt.meta import ImageViTTask, LogUniformLengthSchedule, MetaTrainer, PES
from lightning_lopt.models import MuViT


def _task(**kwargs):
    base = dict(dataset="digits", image_size=8, widths=[16, 32], depth=1, patch_size=2, head_dim=8, batch_size=8)
    return ImageViTTask(**{**base, **kwargs})


def test_builds_one_mup_vit_per_width_with_fixed_head_size_and_mup_scales():
    instances = _task().build(lopt_is_mu=True)
    assert [i.label for i in instances] == ["vit-digits8-d1-mup-w16", "vit-digits8-d1-mup-w32"]
    for inst, width in zip(instances, (16, 32)):
        net = inst.module.model
        assert isinstance(net, MuViT)
        assert net.blocks[0].attn.heads == width // 8
        scales = dict(zip(inst.names, inst.scales))
        # μP: a hidden width x width matrix moves 1/fan_in, the patch embedding (fan_in = 2x2 pixels) 1.
        assert scales["model.blocks.0.attn.query.weight"] == pytest.approx(1 / width)
        assert scales["model.blocks.0.mlp.fc2.weight"] == pytest.approx(1 / (4 * width))
        assert all(s == 1.0 for n, s in scales.items() if n.endswith("bias"))


def test_sp_task_has_unit_scales():
    inst = _task(param="sp", widths=[16]).build(lopt_is_mu=False)[0]
    assert inst.scales == [1.0] * len(inst.names)


def test_bad_arguments_fail_with_the_reason():
    with pytest.raises(ValueError, match="not multiples of head_dim=8"):
        _task(widths=[16, 20])
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        _task(dataset="cifar")


def test_meta_steps_on_a_vit_change_theta_and_stay_finite(tmp_path, fit_kwargs):
    torch.manual_seed(0)
    meta = MetaTrainer(
        "mulo",
        tasks=[_task(widths=[16])],
        estimator=PES(num_pairs=2, trunc_length=4),
        truncation=LogUniformLengthSchedule(8, 16),
        initial_offset=4,
        init_from="mulo-fmnist8-w32-128",
    )
    before = {k: v.detach().clone() for k, v in meta.lopt.state_dict().items()}
    L.Trainer(**fit_kwargs(tmp_path, 2)).fit(meta)
    after = meta.lopt.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved, "two meta-steps on the ViT task left θ unchanged"
    assert all(torch.isfinite(v).all() for v in after.values())
