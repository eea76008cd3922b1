"""Image classification data modules: the shared image pipeline and the bundled 8x8 digits.

Every image module yields ``x`` float32 ``[B, 1, S, S]`` (or ``[B, S*S]`` with ``flatten=True``)
and ``y`` int64 ``[B]`` in ``0..9``, for ``S = image_size`` in {8, 16, 28, 32}.

Usage::

    from lightning_lopt.datamodules import DigitsDataModule
    dm = DigitsDataModule(image_size=16, flatten=True, batch_size=64)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))          # [64, 256] float32, [64] int64
    dm.input_shape, dm.num_classes                     # (256,), 10
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_lopt.datamodules.base import CachedDataModule, Split, check_fraction, check_fractions_sum, seeded_split

IMAGE_SIZES = (8, 16, 28, 32)


def resize_images(x: Tensor, size: int, *, pad: bool = False) -> Tensor:
    """Bring square images ``x`` ``[N, C, H, H]`` to ``[N, C, size, size]``.

    With ``pad=True`` and ``size > H`` the images are zero-padded (centred), which keeps the stroke
    scale: the classic way to feed 28x28 MNIST to 32x32 models (LeNet-5, ViT with patch 4 or 8).
    Otherwise they are resized bilinearly; when shrinking, with antialiasing, so that thin strokes
    average into grey instead of being skipped by point sampling.
    """
    h = x.shape[-1]
    if h == size:
        return x
    if pad and size > h:
        before = (size - h) // 2
        after = size - h - before
        return F.pad(x, (before, after, before, after))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < h)


class ImageDataModule(CachedDataModule):
    """Base class of the image modules: resizing, normalisation, flattening and the seeded splits.

    Subclasses supply :meth:`_raw_splits` (grey images in [0, 1] at their native size) and may set
    :attr:`pad_up` (zero-pad rather than resize when enlarging).

    Args:
        image_size: side of the square images, one of 8, 16, 28, 32.
        flatten: yield ``[B, S*S]`` vectors (for MLPs) instead of ``[B, 1, S, S]`` images.
        normalize: standardise with the training split's pixel mean and std (scalars, stored as
            :attr:`mean` and :attr:`std`). Otherwise pixels stay in [0, 1].
        val_fraction: fraction held out for validation, in (0, 1).
        batch_size, seed, num_workers, device: see :class:`CachedDataModule`.
    """

    pad_up: bool = False
    num_classes: int = 10

    def __init__(
        self,
        image_size: int,
        flatten: bool,
        normalize: bool,
        val_fraction: float,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, device=device)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size not in IMAGE_SIZES:
            raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
        self.image_size = image_size
        self.flatten = flatten
        self.normalize = normalize
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.input_shape = (image_size * image_size,) if flatten else (1, image_size, image_size)
        self.mean = 0.0
        self.std = 1.0

    @abstractmethod
    def _raw_splits(self) -> dict[str, Split]:
        """``{"train", "val", "test"}`` → (float32 images ``[N, H, H]`` in [0, 1], int64 labels)."""

    def _build_splits(self) -> dict[str, Split]:
        raw = self._raw_splits()
        xs = {k: resize_images(x.unsqueeze(1), self.image_size, pad=self.pad_up) for k, (x, _) in raw.items()}
        if self.normalize:
            # Statistics of the training split only, so validation and test stay unseen.
            std, mean = torch.std_mean(xs["train"])
            self.mean, self.std = float(mean), float(std)
            xs = {k: (x - self.mean) / self.std for k, x in xs.items()}
        if self.flatten:
            xs = {k: x.flatten(1) for k, x in xs.items()}
        return {k: (xs[k].contiguous(), y) for k, (_, y) in raw.items()}


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no set-up at all.

    There is no official test set, so the test split is a separate seeded fraction of the data,
    disjoint from train and validation; ``test_fraction=0`` makes the test loader reuse validation.
    Images are enlarged to 16/28/32 by bilinear resizing (padding an 8x8 digit would only shrink it).

    Args:
        image_size: 8 (native), 16, 28 or 32.
        flatten: yield ``[B, S*S]`` instead of ``[B, 1, S, S]``.
        normalize: standardise with the training pixel mean/std; otherwise pixels are in [0, 1].
        val_fraction: validation fraction in (0, 1).
        test_fraction: test fraction in [0, 1); 0 means the test split is the validation split.
        batch_size: dataloader batch size.
        seed: seeds the split and the shuffling.
        num_workers: dataloader workers (0: the data is already in memory).
        device: where the cached tensors live.

    Usage::

        dm = DigitsDataModule(image_size=8, batch_size=128)
        x, y = dm.sample(batch_size=128, n=4, generator=torch.Generator().manual_seed(0))
        # x: [4, 128, 1, 8, 8], y: [4, 128]
    """

    def __init__(
        self,
        image_size: int = 8,
        flatten: bool = False,
        normalize: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(image_size, flatten, normalize, val_fraction, batch_size, seed, num_workers, device)
        self.test_fraction = check_fraction("test_fraction", test_fraction, allow_zero=True)
        check_fractions_sum(self.val_fraction, self.test_fraction)
        self.save_hyperparameters()

    def _raw_splits(self) -> dict[str, Split]:
        from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

        digits = load_digits()
        # Pixel values are counts 0..16 of set pixels in 4x4 blocks of the original 32x32 bitmaps.
        x = torch.from_numpy(digits.images).float().div_(16.0)
        y = torch.from_numpy(digits.target).long()
        fractions = {"val": self.val_fraction, "test": self.test_fraction}
        idx = seeded_split(len(y), fractions, self.seed)
        splits = {k: (x[i], y[i]) for k, i in idx.items()}
        if self.test_fraction == 0:
            splits["test"] = splits["val"]
        return splits
