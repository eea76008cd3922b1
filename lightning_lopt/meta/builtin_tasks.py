"""Built-in meta-training tasks from the library's models and data modules.

- :class:`ImageMLPTask`: μLO's task family, a ReLU MLP (μP or SP) on an image data set, at one or
  several widths (docs/reference/pes.md#recipe: ``mumlp-w128-d3`` on ImageNet 32x32; here the offline sets).
- :func:`celo_tasks`: Celo's four 8x8 MLP tasks
  (docs/reference/celo.md#meta-training-tasks) from what is available offline.

Example::

    task = ImageMLPTask("fashion_mnist", image_size=8, widths=[32, 64, 128], depth=3, param="mup")
    tasks = celo_tasks()
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_lopt.datamodules import get_datamodule
from lightning_lopt.meta.tasks import Task
from lightning_lopt import models
from lightning_lopt.optimizee import OptimizeeModule

#: Data sets an ImageMLPTask can use (all 10-class, grey).
IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist")


class ImageMLPTask(Task):
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
        key = dataset.replace("-", "_").lower()
        if key not in IMAGE_DATASETS:
            raise ValueError(f"ImageMLPTask: unknown dataset {dataset!r}; known: {', '.join(IMAGE_DATASETS)}")
        kwargs = {"image_size": image_size, "batch_size": batch_size}
        if root is not None and key != "digits":
            kwargs["root"] = root
        datamodule = get_datamodule(key, **kwargs)
        self.dataset, self.image_size, self.depth, self.param = key, image_size, depth, param
        in_shape = (1, image_size, image_size)

        def factory(seed: int, width: int | None) -> OptimizeeModule:
            return OptimizeeModule(
                models.build("mlp", width, depth, param, input_shape=in_shape, num_classes=datamodule.num_classes)
            )

        factory.__name__ = name or f"mlp-{key}{image_size}-d{depth}-{param}"
        super().__init__(factory, datamodule, widths=list(widths), batch_size=batch_size, name=factory.__name__)


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
