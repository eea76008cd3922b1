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

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningCLI, _InstantiatorFn

from lightning_lopt.cli import OneLineErrors, usage_error
from lightning_lopt.meta.checkpoint import check_same_run
from lightning_lopt.meta.trainer import MetaTrainer
from lightning_lopt.meta.progress import meta_progress_callback


class MetaCLI(OneLineErrors, LightningCLI):
    """LightningCLI for :class:`MetaTrainer`, whose tasks carry their own data modules.

    LightningCLI's instantiator for data modules records them as the fit's ``data`` hyperparameters;
    there is no such entry here (a task's data module is nested inside ``model.tasks``), so only the
    model's instantiator is registered.
    """

    def _parse_ckpt_path(self) -> None:
        """Keep the recipe's model arguments when ``--ckpt_path`` is given.

        LightningCLI would re-parse the checkpoint's hyper-parameters as model arguments; ours are a
        plain-JSON record of the run (task instance labels, not import paths), so they cannot be
        parsed back. The recipe builds the model; :meth:`instantiate_classes` checks that the
        checkpoint comes from the same run before any compute.
        """

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        ckpt_path = self.config.get(str(self.subcommand), {}).get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
            try:
                check_same_run(saved, dict(self.model.hparams))
            except ValueError as err:
                raise usage_error(err) from None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        # Meta-steps, not "Epoch 0/-2"; plain lines when the output is not a terminal.
        given = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, meta_progress_callback()]
        return super()._instantiate_trainer(config, callbacks)

    def _add_instantiators(self) -> None:
        self.parser.add_instantiator(_InstantiatorFn(cli=self, key="model"), MetaTrainer, subclasses=True)


def main(argv: Sequence[str]) -> LightningCLI:
    """Run ``fit`` on a :class:`MetaTrainer` built from ``argv`` (LightningCLI arguments)."""
    with warnings.catch_warnings():
        # A full checkpoint of a meta-step holds the state after its update: exactly what resuming needs.
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
        return MetaCLI(
            MetaTrainer,
            None,
            trainer_class=L.Trainer,
            args=["fit", *argv],
            save_config_kwargs={"overwrite": True},
        )
