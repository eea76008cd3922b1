"""Built-in meta-training tasks from the library's models and data modules.

- :class:`ImageMLPTask`: μLO's task family, a ReLU MLP (μP or SP) on an image data set, at one or
  several widths (docs/reference/pes.md#recipe: ``mumlp-w128-d3`` on ImageNet 32x32; here the offline sets).
- :class:`ImageViTTask`: an attention network on the same image sets (the μLO paper meta-trains on
  MLPs only; issue 19 adds these so the rule sees LayerNorm, attention and GELU layers).
- :func:`celo_tasks`: Celo's four 8x8 MLP tasks
  (docs/reference/celo.md#meta-training-tasks) from what is available offline.

Example::

    task = ImageMLPTask("fashion_mnist", image_size=8, widths=[32, 64, 128], depth=3, param="mup")
    vit = ImageViTTask("mnist", image_size=16, widths=[32, 64], depth=2, patch_size=4, head_dim=16)
    tasks = celo_tasks()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_lopt import models
from lightning_lopt.datamodules import get_datamodule
from lightning_lopt.meta.tasks import Task
from lightning_lopt.optimizee import OptimizeeModule

#: Data sets an ImageMLPTask can use (all 10-class, grey).
IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist")


class _ImageTask(Task):
    """What the image tasks share: the data set by name, and one ``kind`` network per width.

    ``extra(width)`` gives the keyword arguments of :func:`lightning_lopt.models.build` that depend
    on the kind (the ViT's heads and patch size).
    """

    def __init__(
        self,
        kind: str,
        dataset: str,
        image_size: int,
        widths: Sequence[int],
        depth: int,
        param: str,
        batch_size: int,
        root: str | Path | None,
        name: str | None,
        extra: Callable[[int], dict[str, Any]] = lambda width: {},
    ) -> None:
        key = dataset.replace("-", "_").lower()
        if key not in IMAGE_DATASETS:
            raise ValueError(f"{type(self).__name__}: unknown dataset {dataset!r}; known: {', '.join(IMAGE_DATASETS)}")
        kwargs = {"image_size": image_size, "batch_size": batch_size}
        if root is not None and key != "digits":
            kwargs["root"] = root
        datamodule = get_datamodule(key, **kwargs)
        self.dataset, self.image_size, self.depth, self.param = key, image_size, depth, param
        in_shape = (1, image_size, image_size)

        def factory(seed: int, width: int | None) -> OptimizeeModule:
            net = models.build(
                kind, width, depth, param, input_shape=in_shape, num_classes=datamodule.num_classes, **extra(width)
            )
            return OptimizeeModule(net)

        factory.__name__ = name or f"{kind}-{key}{image_size}-d{depth}-{param}"
        super().__init__(factory, datamodule, widths=list(widths), batch_size=batch_size, name=factory.__name__)


class ImageMLPTask(_ImageTask):
    """A depth-``depth`` ReLU MLP classifying ``dataset`` at ``image_size``², one PES estimator per width.

    Args:
        dataset: ``"digits"`` (bundled), ``"mnist"`` or ``"fashion_mnist"`` (see ``python -m
            lightning_lopt.datamodules.fetch``).
        image_size: 8, 16, 28 or 32.
        widths: hidden widths.
        depth: hidden layers (3 in μLO).
        param: ``"mup"`` (μLO's μP MLP) or ``"sp"``.
        batch_size: images per particle per inner step (4096 in μLO on a GPU; less on a CPU).
        root: where to look for the data first.
        name: label in logs and cards (default ``mlp-{dataset}{size}-d{depth}-{param}``).

    Example::

        ImageMLPTask("digits", widths=[32], batch_size=128)
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        image_size: int = 8,
        widths: Sequence[int] = (128,),
        depth: int = 3,
        param: str = "mup",
        batch_size: int = 128,
        root: str | Path | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__("mlp", dataset, image_size, widths, depth, param, batch_size, root, name)


class ImageViTTask(_ImageTask):
    """A depth-``depth`` ViT (:class:`~lightning_lopt.models.MuViT`) classifying ``dataset``.

    Args:
        dataset: as :class:`ImageMLPTask`.
        image_size: the image side; it must be a multiple of ``patch_size``.
        widths: embedding widths; each must be a multiple of ``head_dim`` (heads = width / head_dim,
            so the head size stays fixed as the width grows, as μP transformers are scaled).
        depth: transformer blocks.
        patch_size: patch side (default a quarter of the image side: 16 patches).
        head_dim: the width of one attention head.
        param: ``"mup"`` or ``"sp"``.
        batch_size: images per particle per inner step.
        root: where to look for the data first.
        name: label in logs and cards (default ``vit-{dataset}{size}-d{depth}-{param}``).

    Example::

        ImageViTTask("mnist", image_size=16, widths=[32, 64], depth=2, patch_size=4, head_dim=16)
    """

    def __init__(
        self,
        dataset: str = "mnist",
        image_size: int = 16,
        widths: Sequence[int] = (64,),
        depth: int = 2,
        patch_size: int | None = None,
        head_dim: int = 16,
        param: str = "mup",
        batch_size: int = 32,
        root: str | Path | None = None,
        name: str | None = None,
    ) -> None:
        bad = [w for w in widths if w % head_dim]
        if bad:
            raise ValueError(f"ImageViTTask: widths {bad} are not multiples of head_dim={head_dim}")
        super().__init__(
            "vit", dataset, image_size, widths, depth, param, batch_size, root, name,
            extra=lambda width: {"heads": width // head_dim, "patch_size": patch_size},
        )  # fmt: skip


def celo_tasks(batch_size: int = 64, root: str | Path | None = None) -> list[Task]:
    """Celo's meta-training tasks at 8x8: an MLP 64 → 32 (ReLU) → 10, batch 64
    (docs/reference/celo.md#meta-training-tasks).

    Celo used CIFAR-10, Fashion-MNIST, MNIST and SVHN, greyscale 8x8. CIFAR-10 and SVHN are not
    reachable offline, so the bundled digits stand in for them: three tasks instead of four.
    """
    return [
        ImageMLPTask(dataset, 8, widths=[32], depth=1, param="sp", batch_size=batch_size, root=root)
        for dataset in ("fashion_mnist", "mnist", "digits")
    ]
