"""``python train.py meta-fit``: meta-training from a YAML recipe, through LightningCLI.

The model is :class:`~lightning_lopt.meta.MetaTrainer`; there is no data module (the tasks bring
their own). Everything else is LightningCLI: ``--config``, dotted overrides, ``--print_config``.

Example::

    python train.py meta-fit --config configs/meta/digits_tiny.yaml
    python train.py meta-fit --config configs/meta/mulo_s_cpu.yaml --trainer.max_steps 500
    python train.py meta-fit --config my_finetune.yaml --model.init_from mulo-fmnist8-w32-128
    python train.py meta-fit --config configs/meta/mulo_s_cpu.yaml --model.resume_from runs/mulo_s_cpu/light
    python train.py meta-fit --config configs/meta/digits_tiny.yaml --ckpt_path runs/digits_tiny/full/last.ckpt

``--ckpt_path`` resumes a full checkpoint exactly: the recipe (``--config`` and overrides) builds the
model, the checkpoint restores its state, and :meth:`MetaTrainer.on_load_checkpoint` refuses a
checkpoint written by a different run (other tasks, optimizer, PES settings or seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI, _InstantiatorFn

from lightning_lopt.meta.module import MetaTrainer


class MetaCLI(LightningCLI):
    """LightningCLI for :class:`MetaTrainer`, whose tasks carry their own data modules.

    LightningCLI's instantiator for data modules records them as the fit's ``data`` hyperparameters;
    there is no such entry here (a task's data module is nested inside ``model.tasks``), so only the
    model's instantiator is registered.
    """

    def _parse_ckpt_path(self) -> None:
        """Keep the recipe's model arguments when ``--ckpt_path`` is given.

        LightningCLI would re-parse the checkpoint's hyper-parameters as model arguments; ours are a
        plain-JSON record of the run (task instance labels, not import paths), so they cannot be
        parsed back. The recipe builds the model and ``MetaTrainer.on_load_checkpoint`` checks that
        the checkpoint comes from the same run.
        """

    def _add_instantiators(self) -> None:
        self.parser.add_instantiator(_InstantiatorFn(cli=self, key="model"), MetaTrainer, subclasses=True)


def main(argv: Sequence[str]) -> LightningCLI:
    """Run ``fit`` on a :class:`MetaTrainer` built from ``argv`` (LightningCLI arguments)."""
    return MetaCLI(
        MetaTrainer,
        None,
        trainer_class=L.Trainer,
        args=["fit", *argv],
        save_config_kwargs={"overwrite": True},
    )
