"""PES meta-training of learned optimizers on any LightningModule and LightningDataModule.

The pieces, each in its own module (learned_optimization's ``outer_trainers/`` shape):

- :mod:`.tasks`: :class:`Task` (a module factory and a data module) → per-width :class:`TaskInstance`;
  :mod:`.builtin_tasks`: :class:`ImageMLPTask`, :class:`ImageViTTask` and Celo's tasks;
- :mod:`.truncation`: episode lengths; :mod:`.augmentation`: Celo's weight re-parametrisation;
- :mod:`.unroll`: the truncated unroll of a task's particles (the inner state machine);
- :mod:`.pes`: the PES estimator (pure functions);
- :mod:`.meta_optim`: AdamW + warmup/cosine + update clip; :mod:`.rng`: keyed random draws;
- :mod:`.module`: :class:`MetaTrainer`, the LightningModule that drives it all, and light checkpoints.

Example::

    import lightning as L
    from lightning_lopt.meta import MetaTrainer, Task

    task = Task(MyLitModule, datamodule=MyDataModule(batch_size=64), module_kwargs={"width": 256})
    meta = MetaTrainer("mulo", tasks=[task], init_from="mulo-fmnist8-w32-128")  # or init_from=None: from scratch
    L.Trainer(max_steps=500).fit(meta)
    meta.save_pretrained("runs/my-mulo")                              # MuLO(..., meta_weights="runs/my-mulo")
"""

from lightning_lopt.meta.augmentation import ReparamAugmentation
from lightning_lopt.meta.builtin_tasks import ImageMLPTask, ImageViTTask, celo_tasks
from lightning_lopt.meta.meta_optim import WarmupCosine
from lightning_lopt.meta.trainer import LightCheckpoint, MetaTrainer
from lightning_lopt.meta.pes import PES
from lightning_lopt.meta.tasks import Task, TaskInstance
from lightning_lopt.meta.truncation import LogUniformLengthSchedule

__all__ = [
    "ImageMLPTask",
    "ImageViTTask",
    "LightCheckpoint",
    "LogUniformLengthSchedule",
    "MetaTrainer",
    "PES",
    "ReparamAugmentation",
    "Task",
    "TaskInstance",
    "WarmupCosine",
    "celo_tasks",
]
