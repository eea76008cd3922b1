"""Command line: ``python train.py [fit|validate|test|coord-check|meta-fit|evaluate] ...``.

* no arguments: the main job (:func:`lightning_lopt.quickstart.run_default_job`) on digits;
* ``fit`` / ``validate`` / ``test``: LightningCLI over any LightningModule and LightningDataModule,
  defaulting to ``lightning_lopt/configs/fit_digits_mlp.yaml``. Optimizers are chosen with
  ``--optimizer lightning_lopt.MuLO`` (LightningCLI) or ``--trainer.optimizer mulo`` (our Trainer);
* ``coord-check``: the μP coordinate-check width sweep;
* ``meta-fit`` / ``evaluate``: meta-training and evaluation suites.

Example::

    python train.py fit --optimizer lightning_lopt.MuAdam --optimizer.lr 0.01 --trainer.max_steps 100
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_lopt.quiet import known_noise_filtered
from lightning_lopt.trainer import Trainer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "fit_digits_mlp.yaml"
LIGHTNING_COMMANDS = ("fit", "validate", "test")
#: Subcommands outside LightningCLI: name -> "module:function" taking argv, or None while the issue
#: that provides it is open.
EXTRA_COMMANDS: dict[str, str | None] = {
    "coord-check": "lightning_lopt.coord_check.cli:main",
    "meta-fit": "lightning_lopt.meta.cli:main",
    "evaluate": "lightning_lopt.eval.evaluate:main",
}

USAGE = f"""usage: python train.py [COMMAND] [ARGS...]

With no command, runs the main job: a μP MLP on the bundled digits data.

commands:
  {', '.join(LIGHTNING_COMMANDS)}    LightningCLI (see `python train.py fit --help`); default config:
                         {DEFAULT_CONFIG.name}
  coord-check            μP coordinate-check width sweep (`python train.py coord-check --help`)
  meta-fit               meta-train a learned optimizer with PES
  evaluate               evaluation suites against tuned baselines
"""


class OneLineErrors:
    """A LightningCLI mixin: a bad argument found while building the model, data or trainer (before
    any compute) is one line on stderr and exit status 2, not a traceback through jsonargparse."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()  # type: ignore[misc]
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise usage_error(err) from None
        config = self.config.get(str(self.subcommand), {})  # type: ignore[attr-defined]
        ckpt_path = config.get("ckpt_path") if hasattr(config, "get") else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise usage_error(FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file ({Path(ckpt_path).resolve()})"))


def usage_error(err: BaseException) -> SystemExit:
    """Print ``error: <message>`` to stderr; the SystemExit (status 2) to raise."""
    print(f"error: {err}", file=sys.stderr)
    return SystemExit(2)


class _LightningCLI(OneLineErrors, LightningCLI):
    pass


def lightning_cli(args: Sequence[str]) -> LightningCLI:
    """Run LightningCLI on ``args`` (``[subcommand, ...]``) with our Trainer and default config."""
    return _LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=Trainer,
        args=list(args),
        parser_kwargs={cmd: {"default_config_files": [str(DEFAULT_CONFIG)]} for cmd in LIGHTNING_COMMANDS},
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``train.py`` and the ``lightning-lopt`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        from lightning_lopt.quickstart import run_default_job

        run_default_job()
        return
    command = args[0]
    if command in ("-h", "--help"):
        print(USAGE)
        return
    if command not in (*LIGHTNING_COMMANDS, *EXTRA_COMMANDS):
        raise SystemExit(f"unknown command {command!r}\n\n{USAGE}")
    with known_noise_filtered():
        if command in LIGHTNING_COMMANDS:
            lightning_cli(args)
            return
        target = EXTRA_COMMANDS[command]
        if target is None:
            raise SystemExit(f"`{command}` is not available in this version of lightning_lopt yet.")
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(args[1:])
