"""DigitsDataModule: shapes, labels, normalisation, seeded splits, dataloaders, Lightning fit."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_lopt.datamodules import DigitsDataModule

N_DIGITS = 1797


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("size", [8, 16, 28, 32])
def test_shapes_and_dtypes(size: int, flatten: bool) -> None:
    dm = DigitsDataModule(image_size=size, flatten=flatten, batch_size=32)
    expected = (size * size,) if flatten else (1, size, size)
    assert dm.input_shape == expected  # known before setup, so models can be built first
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, *expected) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert dm.num_classes == 10


def test_labels_cover_all_classes_and_sizes_add_up() -> None:
    dm = DigitsDataModule()
    dm.setup()
    sizes = {k: len(dm.split(k)[1]) for k in ("train", "val", "test")}
    assert sum(sizes.values()) == N_DIGITS
    assert sizes["val"] == sizes["test"] == round(0.1 * N_DIGITS)
    for k in sizes:
        y = dm.split(k)[1]
        assert 0 <= int(y.min()) and int(y.max()) <= 9
    assert dm.split("train")[1].unique().tolist() == list(range(10))


def test_normalize_uses_training_statistics() -> None:
    dm = DigitsDataModule(normalize=True)
    dm.setup()
    x = dm.split("train")[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    raw = DigitsDataModule(normalize=False)
    raw.setup()
    xr = raw.split("train")[0]
    assert float(xr.min()) == 0.0 and float(xr.max()) == 1.0
    torch.testing.assert_close((xr - dm.mean) / dm.std, x)


def _fingerprint(dm: DigitsDataModule, split: str) -> set[bytes]:
    # Identify items by content: the digits set has few exact duplicates, so sets of images compare splits.
    return {row.numpy().tobytes() for row in dm.split(split)[0].flatten(1)}


def test_split_is_seeded_disjoint_and_independent_of_image_size() -> None:
    a = DigitsDataModule(seed=3, normalize=False)
    b = DigitsDataModule(seed=3, normalize=False)
    c = DigitsDataModule(seed=4, normalize=False)
    for dm in (a, b, c):
        dm.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split)[0], b.split(split)[0])
        assert torch.equal(a.split(split)[1], b.split(split)[1])
    assert not torch.equal(a.split("val")[0], c.split("val")[0])
    assert not _fingerprint(a, "val") & _fingerprint(a, "test")
    # Same items whatever the size: the labels of the split agree.
    big = DigitsDataModule(seed=3, image_size=16)
    big.setup()
    assert torch.equal(big.split("val")[1], a.split("val")[1])


def test_test_fraction_zero_reuses_validation() -> None:
    dm = DigitsDataModule(test_fraction=0.0)
    dm.setup()
    assert torch.equal(dm.split("test")[0], dm.split("val")[0])
    assert len(dm.split("train")[1]) == N_DIGITS - round(0.1 * N_DIGITS)


def test_enlarging_resizes_rather_than_pads() -> None:
    dm = DigitsDataModule(image_size=32, normalize=False)
    dm.setup()
    x = dm.split("train")[0]
    # A padded 8x8 image would leave a 12-pixel empty border; bilinear upsampling spreads the digit.
    assert float(x[:, :, :12, :].abs().sum()) > 0


def test_dataloaders_cover_each_split_once() -> None:
    dm = DigitsDataModule(batch_size=100)
    dm.setup()
    for name, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        ys = torch.cat([y for _, y in loader])
        assert torch.equal(ys, dm.split(name)[1])  # in order, nothing dropped
    ys = torch.cat([y for _, y in dm.train_dataloader()])
    assert torch.equal(ys.sort().values, dm.split("train")[1].sort().values)  # a permutation
    first = [y for _, y in dm.train_dataloader()][0]
    again = [y for _, y in dm.train_dataloader()][0]
    assert torch.equal(first, again)  # shuffling is seeded


def test_loaders_survive_lightnings_distributed_sampler_injection() -> None:
    # Under DDP, Lightning rebuilds each DataLoader around a DistributedSampler; the batches must
    # stay whole batches. _update_dataloader is the function Lightning uses for that.
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    dm = DigitsDataModule(batch_size=50)
    dm.setup()
    loader = dm.train_dataloader()
    shards = []
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        batches = list(_update_dataloader(loader, sampler))
        assert batches[0][0].shape == (50, 1, 8, 8) and batches[0][1].shape == (50,)
        shards.append(torch.cat([y for _, y in batches]))
    assert len(shards[0]) + len(shards[1]) == len(dm.split("train")[1]) + 1  # one item padded


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image_size": 10}, "image_size"),
        ({"image_size": 64}, "image_size"),
        ({"image_size": 8.0}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -5}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_invalid_arguments_name_themselves(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)


def test_fractions_leaving_no_training_data_are_rejected() -> None:
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.5)


class _Tiny(L.LightningModule):
    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.net = nn.Linear(in_features, 10)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_works_with_lightning_trainer() -> None:
    dm = DigitsDataModule(flatten=True, batch_size=64)
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    model = _Tiny(dm.input_shape[0])
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    (metrics,) = trainer.validate(model, datamodule=dm, verbose=False)
    assert metrics["val_loss"] > 0
