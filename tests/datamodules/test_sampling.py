"""The on-device sampler: shapes, distinct items per batch, determinism, devices."""

from __future__ import annotations

import pytest
import torch

from lightning_lopt.datamodules import DigitsDataModule
from lightning_lopt.datamodules.base import sample_indices


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=8, batch_size=32)
    dm.setup()
    return dm


@pytest.mark.parametrize("flatten", [False, True])
def test_shapes_and_dtypes(flatten: bool) -> None:
    dm = DigitsDataModule(flatten=flatten, image_size=16)
    x, y = dm.sample(batch_size=24, n=5, generator=torch.Generator().manual_seed(0))  # set up lazily
    assert x.shape == (5, 24, *dm.input_shape) and x.dtype == torch.float32
    assert y.shape == (5, 24) and y.dtype == torch.int64


def test_same_generator_state_gives_same_batches(digits: DigitsDataModule) -> None:
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x1, y1 = digits.sample(32, 4, g1)
    x2, y2 = digits.sample(32, 4, g2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = digits.sample(32, 4, g1)  # the generator advanced
    assert not torch.equal(x1, x3)
    x4, _ = digits.sample(32, 4, torch.Generator().manual_seed(8))
    assert not torch.equal(x1, x4)
    assert not torch.equal(x1[0], x1[1])  # the n batches are different draws


def test_sample_gathers_training_items_by_the_drawn_indices(digits: DigitsDataModule) -> None:
    x_train, y_train = digits.split("train")
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    x, y = digits.sample(16, 3, g)
    idx = sample_indices(x_train.shape[0], 16, 3, torch.Generator().set_state(state))
    assert torch.equal(x, x_train[idx]) and torch.equal(y, y_train[idx])


def test_indices_are_distinct_within_each_batch() -> None:
    g = torch.Generator().manual_seed(0)
    idx = sample_indices(60000, 256, 8, g)
    assert idx.shape == (8, 256) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 60000
    for row in idx:
        assert row.unique().numel() == 256
    full = sample_indices(50, 50, 4, g)  # batch = population: each row is a permutation
    assert all(torch.equal(row.sort().values, torch.arange(50)) for row in full)


def test_indices_are_uniform() -> None:
    idx = sample_indices(10, 3, 20000, torch.Generator().manual_seed(0))
    counts = idx.flatten().bincount(minlength=10).float()
    # Each index appears with probability 3/10 per draw: 6000 expected, std about 65.
    assert (counts - 6000).abs().max() < 300


def test_bad_sample_arguments(digits: DigitsDataModule) -> None:
    g = torch.Generator()
    with pytest.raises(ValueError, match="batch_size"):
        digits.sample(0, 2, g)
    with pytest.raises(ValueError, match="batch_size"):
        digits.sample(digits.num_train + 1, 1, g)
    with pytest.raises(ValueError, match="n must"):
        digits.sample(4, 0, g)


def test_to_device_moves_cached_tensors() -> None:
    dm = DigitsDataModule()
    dm.setup()
    assert dm.device == torch.device("cpu")
    assert dm.to("meta") is dm
    assert dm.split("train")[0].device.type == "meta"
    x, y = dm.sample(8, 2, torch.Generator().manual_seed(0))  # CPU generator, meta data
    assert x.device.type == "meta" and x.shape == (2, 8, 1, 8, 8)
    late = DigitsDataModule(device="meta")  # before setup: applied when the tensors are built
    assert late.split("val")[0].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampling_matches_with_cuda_and_cpu_generators() -> None:
    dm = DigitsDataModule().to("cuda")
    x, y = dm.sample(32, 4, torch.Generator(device="cuda").manual_seed(0))
    x2, _ = dm.sample(32, 4, torch.Generator(device="cuda").manual_seed(0))
    assert x.is_cuda and y.is_cuda and torch.equal(x, x2)
    xc, _ = dm.sample(32, 4, torch.Generator().manual_seed(0))
    assert xc.is_cuda and xc.shape == x.shape
