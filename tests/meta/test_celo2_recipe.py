"""Celo2 meta-trains through MetaTrainer: the reference's inner configuration and a θ that moves."""

from __future__ import annotations

import lightning as L
import torch

from lightning_lopt.meta import ImageMLPTask, LogUniformLengthSchedule, MetaTrainer, PES, ReparamAugmentation
from lightning_lopt.optim import pretrained
from lightning_lopt.optim.celo2_lopt import Celo2LOpt


def test_celo2_meta_trains_with_the_meta_training_inner_rule(tmp_path, fit_kwargs):
    task = ImageMLPTask("digits", widths=[16], depth=1, param="sp", batch_size=16)
    meta = MetaTrainer(
        "celo2",
        tasks=[task],
        estimator=PES(num_pairs=2, trunc_length=5),
        truncation=LogUniformLengthSchedule(8, 30),
        initial_offset=5,
        augmentation=ReparamAugmentation("global", 1e-3, 1e3),
    )
    assert isinstance(meta.lopt, Celo2LOpt) and meta.lopt.num_meta_params() == 347
    assert (meta.lopt.step_mult, meta.lopt.adam_mode, meta.lopt.adam_lr_mult) == (1e-3, "meta_training", 20.0)
    before = {k: v.clone() for k, v in meta.lopt.state_dict().items()}
    L.Trainer(**fit_kwargs(tmp_path, 2)).fit(meta)
    after = meta.lopt.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(after["mlp.0.weight"], before["mlp.0.weight"])
    meta.save_pretrained(tmp_path / "w")
    assert pretrained.from_pretrained(tmp_path / "w").config["adam_mode"] == "meta_training"


def test_celo2_base_meta_trains_every_tensor_with_the_learned_rule():
    task = ImageMLPTask("digits", widths=[16], depth=1, param="sp", batch_size=16)
    meta = MetaTrainer("celo2-base", tasks=[task], estimator=PES(num_pairs=1, trunc_length=3))
    assert (meta.lopt.orthogonalize, meta.lopt.adam_1d, meta.lopt.step_mult) == (False, False, 1e-3)
    params = [torch.zeros(4, 3), torch.zeros(4)]
    theta = dict(meta.lopt.state_dict())
    assert all("adam_m" not in acc for acc in meta.lopt.functional.init_state(theta, params)["tensors"])
    assert "adam_m" in Celo2LOpt().functional.init_state(theta, params)["tensors"][1]
