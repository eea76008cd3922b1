"""The main job: ``python train.py`` with no arguments.

Trains the same μP MLP on scikit-learn's bundled digits (no set-up, no network) twice, with the
packaged pretrained μLO and with AdamW, and shows both side by side: one summary table and one PNG
with both loss curves. It finishes in well under a minute on 2 CPU cores.

Example::

    from lightning_lopt.quickstart import run_default_job
    summaries = run_default_job(out_dir="outputs/default", max_steps=300)
    summaries["mulo"]["val_acc"], summaries["adamw"]["val_acc"]
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from lightning_lopt.datamodules import DigitsDataModule  # noqa: E402
from lightning_lopt.models import MuMLP  # noqa: E402
from lightning_lopt.optimizee import OptimizeeModule  # noqa: E402

#: The optimizers the main job compares, with their keyword arguments. MuLO runs its packaged
#: meta-trained weights with no tuning; AdamW runs at lr 1e-2, a good fixed choice for this task.
DEFAULT_OPTIMIZERS: dict[str, dict[str, Any]] = {"mulo": {}, "adamw": {"lr": 1e-2}}


class LossHistory(L.Callback):
    """Keeps the training loss of every step and the validation loss of every validation run."""

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.train.append((trainer.global_step, float(loss)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


def plot_losses(histories: dict[str, LossHistory], path: Path, title: str) -> None:
    """Write the train (minibatch) and validation loss curves of every run to ``path`` (PNG)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for (name, history), color in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        if history.train:
            steps, losses = zip(*history.train)
            ax.plot(steps, losses, lw=0.8, alpha=0.6, color=color, label=f"{name} train (minibatch)")
        if history.val:
            steps, losses = zip(*history.val)
            ax.plot(steps, losses, "o-", color=color, label=f"{name} validation")
    ax.set(xlabel="step", ylabel="cross-entropy", yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train_once(
    optimizer: str, optimizer_kwargs: dict[str, Any], out: Path, max_steps: int, width: int, seed: int
) -> tuple[dict[str, float], LossHistory]:
    """One fit of the μP MLP on digits with ``optimizer``; returns its summary and loss history."""
    L.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(batch_size=128, seed=seed)
    model = MuMLP(datamodule.input_shape, width=width, depth=3, num_classes=datamodule.num_classes)
    module = OptimizeeModule(model, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs)
    history = LossHistory()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=CSVLogger(out, name=f"logs-{optimizer}"),
        callbacks=[history],
        val_check_interval=50,
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_time = time.perf_counter() - start
    # validate() resets callback_metrics, so read the training epoch metrics first.
    final_train = {k: float(v) for k, v in trainer.callback_metrics.items()}
    val = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    summary = {
        "train_loss": final_train["train/loss_epoch"],
        "train_acc": final_train["train/acc"],
        "val_loss": float(val["val/loss"]),
        "val_acc": float(val["val/acc"]),
        "steps": float(trainer.global_step),
        "wall_time_s": train_time,
    }
    return summary, history


def run_default_job(
    out_dir: str | Path = "outputs/default",
    max_steps: int = 300,
    width: int = 128,
    optimizers: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, dict[str, float]]:
    """Train a μP MLP on digits with each optimizer; report final train/val loss, accuracy, wall time."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    optimizers = DEFAULT_OPTIMIZERS if optimizers is None else optimizers
    if not optimizers:
        raise ValueError("optimizers must name at least one optimizer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|log_every_n_steps|does not have many workers).*")
    # A width-128 MLP is far too small for intra-op threads to pay off; on a busy 2-core machine they
    # made this job 7x slower (44 s vs 6.6 s for 300 steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    summaries: dict[str, dict[str, float]] = {}
    histories: dict[str, LossHistory] = {}
    try:
        for name, kwargs in optimizers.items():
            summaries[name], histories[name] = train_once(name, kwargs, out, max_steps, width, seed)
    finally:
        torch.set_num_threads(threads)
    png = out / "loss_curve.png"
    plot_losses(histories, png, f"μP MLP (width {width}) on digits: {' vs '.join(optimizers)}")
    title = f"lightning_lopt main job: μP MLP w{width} on digits, {max_steps} steps, seed {seed}"
    console = console or Console()
    console.print(summary_table(title, summaries, optimizers))
    console.print(f"loss curves: {png}")
    return summaries


def summary_table(title: str, summaries: dict[str, dict[str, float]], optimizers: dict[str, dict[str, Any]]) -> Table:
    """The main job's table. The settings column is never cut (``weights=mulo-…`` named nothing on
    an 80-column terminal); the numeric headers wrap instead."""
    # No vertical rules and two-line headers: the table fits 80 columns with the settings whole.
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("optimizer", justify="right", no_wrap=True)
    table.add_column("settings", justify="right", overflow="fold")
    for column in ("train\nloss", "train\nacc", "val\nloss", "val\nacc", "time\n(s)"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, summary in summaries.items():
        settings = ", ".join(f"{k}={v}" for k, v in optimizers[name].items()) or _weights_label(name)
        table.add_row(
            name,
            settings,
            f"{summary['train_loss']:.4f}",
            f"{summary['train_acc']:.3f}",
            f"{summary['val_loss']:.4f}",
            f"{summary['val_acc']:.3f}",
            f"{summary['wall_time_s']:.1f}",
        )
    return table


def _weights_label(name: str) -> str:
    """The packaged weights a learned optimizer uses by default (e.g. ``weights=mulo-...``)."""
    from lightning_lopt.optim import registry
    from lightning_lopt.optim.learned import LearnedOptimizer

    factory = registry.resolve(name)
    default = factory.default_meta_weights() if isinstance(factory, type) and issubclass(factory, LearnedOptimizer) else None
    return f"weights={default}" if default else "defaults"
