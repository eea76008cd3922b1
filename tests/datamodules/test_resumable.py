"""The library's data modules resume mid-epoch from a Lightning checkpoint exactly."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lopt import OptimizeeModule
from lightning_lopt.datamodules import DigitsDataModule
from lightning_lopt.datamodules.resumable import ResumableRandomSampler
from lightning_lopt.models import MuMLP


def test_the_orders_are_a_plain_seeded_shuffles_and_an_epoch_can_start_part_way():
    data = TensorDataset(torch.arange(37))
    plain = DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(7))
    reference = [torch.cat([b for (b,) in plain]).tolist() for _ in range(3)]
    sampler = ResumableRandomSampler(data, seed=7)
    assert [list(sampler) for _ in range(3)] == reference
    fresh = ResumableRandomSampler(data, seed=7)
    fresh.resume(epoch=1, items=10)
    assert list(fresh) == reference[1][10:]
    assert list(fresh) == reference[2]


def _fit(root, steps, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    model = MuMLP(in_shape=[1, 8, 8], width=16, depth=2, num_classes=10, param="sp")
    module = OptimizeeModule(model, "classification", optimizer="lo", num_classes=10)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(callbacks), callbacks=list(callbacks), limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_a_fit_resumed_mid_epoch_matches_the_uninterrupted_fit_bit_for_bit(tmp_path):
    # Digits has 1437 training items, 23 batches of 64 per epoch: step 10 is mid-epoch 0, step 30 is in epoch 1.
    straight = _fit(tmp_path / "a", 30)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    _fit(tmp_path / "b", 10, callbacks=[ckpt])
    resumed = _fit(tmp_path / "c", 30, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=10.ckpt"))
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
