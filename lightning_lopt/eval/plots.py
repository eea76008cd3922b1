"""PNG plots of the evaluation, drawn with matplotlib's pyplot-free API
(the user's global backend is left alone) and saved as small palette PNGs that can be committed.

Evaluation figures, per group of a suite (:func:`plot_suite`):

* ``width``: final loss vs width, one panel per family (μLO Fig. 1); training curves at each
  family's largest width (Fig. 4);
* ``depth``: training curves of the deep networks (Fig. 5);
* ``horizon``: training curves with the meta-training unroll marked (Fig. 6);
* ``diverse`` (and any group with a tuned AdamW reference): Celo's IQM, median and optimality gap
  of the normalised loss and of the speedup, with their 95% intervals;
* every task: training and test loss of every optimizer (``tasks/<task>.png``).

The coordinate check's figures are in :mod:`lightning_lopt.coord_check.plots`, drawn with the
helpers here (:func:`new_figure`, :func:`save_png`).

Curves are the mean over seeds of the per-step training loss, smoothed for display with an EMA of
coefficient :data:`DISPLAY_EMA`, with the standard error over seeds shaded; diverged runs sit at the
cap from their divergence on. Colours follow the order of ``--optimizers`` in every figure.

Example::

    figures = plot_suite(suite, tables, records, Path("outputs/eval/ci"))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_lopt.eval import metrics
from lightning_lopt.eval.store import RunRecord
from lightning_lopt.eval.suites import Suite
from lightning_lopt.eval.summary import GroupTables, Summary
from lightning_lopt.eval.tasks import Task

#: EMA coefficient of the displayed curves (the stored curves are raw).
DISPLAY_EMA = 0.9
#: Most points drawn per curve.
MAX_POINTS = 400

Records = Mapping[tuple[str, str, int], RunRecord]


def save_png(fig: Any, path: Path, dpi: int = 80) -> Path:
    """Save as a 256-colour palette PNG: a third of the RGBA size, so plots can be committed."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    with Image.open(path) as im:
        palette = im.convert("RGB").quantize(colors=256)
    palette.save(path, optimize=True)
    return path


def new_figure(panels: int, ncols: int = 4, panel_size: tuple[float, float] = (3.4, 2.7)) -> tuple[Any, list[Any]]:
    """A figure with ``panels`` axes on a grid of at most ``ncols`` columns, with margins in inches
    for a legend on the right and a title on top (a fixed layout: constrained layout redraws every
    tick label several times)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    width_in, height_in = panel_size[0] * ncols + 2.6, panel_size[1] * nrows + 0.9
    fig = Figure(figsize=(width_in, height_in))
    fig.subplots_adjust(
        left=0.75 / width_in, right=1 - 2.0 / width_in, bottom=0.5 / height_in, top=1 - 0.7 / height_in,
        wspace=0.35, hspace=0.55,
    )  # fmt: skip
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, list(axes[:panels])


def optimizer_colors(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per optimizer label, in order (tab10)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _legend(fig: Any, axes: Sequence[Any]) -> None:
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.legend(list(handles.values()), list(labels), loc="center right", fontsize="small")


def mean_curve(recs: Sequence[RunRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, the display-smoothed mean over seeds and its standard error, thinned to
    :data:`MAX_POINTS` points."""
    curves = np.stack([metrics.ema(r.train_loss, DISPLAY_EMA) for r in recs])
    mean = curves.mean(axis=0)
    sem = curves.std(axis=0, ddof=1) / math.sqrt(len(recs)) if len(recs) > 1 else np.zeros_like(mean)
    stride = max(1, len(mean) // MAX_POINTS)
    steps = np.arange(1, len(mean) + 1)
    return steps[::stride], mean[::stride], sem[::stride]


def _curve_panel(
    ax: Any, task: Task, optimizers: Sequence[str], seeds: Sequence[int], records: Records,
    colors: Mapping[str, Any], meta_unroll: int | None,
) -> None:  # fmt: skip
    notes = []
    for opt in optimizers:
        recs = [records[(task.id, opt, s)] for s in seeds]
        steps, mean, sem = mean_curve(recs)
        ax.plot(steps, mean, color=colors[opt], lw=1.2, label=opt)
        ax.fill_between(steps, mean - sem, mean + sem, color=colors[opt], alpha=0.2, lw=0)
        diverged = sum(r.diverged for r in recs)
        if diverged:
            notes.append(f"{opt}: {diverged}/{len(recs)} diverged")
    if notes:
        ax.text(0.98, 0.97, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize="x-small")
    if meta_unroll is not None and meta_unroll < task.steps:
        ax.axvline(meta_unroll, color="red", ls=":", lw=1.0, label="meta-training unroll")
    ax.set_title(task.id, fontsize="small")
    ax.set_xlabel("step", fontsize="small")
    ax.set_ylabel("train loss", fontsize="small")
    ax.tick_params(labelsize="x-small")
    ax.grid(True, alpha=0.3)


def plot_curves(
    tasks: Sequence[Task], optimizers: Sequence[str], seeds: Sequence[int], records: Records, path: Path,
    title: str, meta_unroll: int | None = None,
) -> Path:  # fmt: skip
    """Training curves of ``tasks``, one panel each (μLO Figs. 4, 5, 6)."""
    fig, axes = new_figure(len(tasks), ncols=3)
    colors = optimizer_colors(optimizers)
    for ax, task in zip(axes, tasks):
        _curve_panel(ax, task, optimizers, seeds, records, colors, meta_unroll)
    _legend(fig, axes)
    fig.suptitle(title)
    return save_png(fig, path)


def plot_loss_vs_width(tables: GroupTables, optimizers: Sequence[str], path: Path) -> Path:
    """Final training loss against width, one panel per family (μLO Fig. 1): seed mean ± standard
    error; a hollow marker where a run diverged (its loss counted at the cap)."""
    families = list(dict.fromkeys(r["family"] for r in tables.final))
    fig, axes = new_figure(len(families), ncols=4)
    colors = optimizer_colors(optimizers)
    for ax, family in zip(axes, families):
        for opt in optimizers:
            rows = sorted((r for r in tables.final if r["family"] == family and r["optimizer"] == opt), key=lambda r: r["width"])
            widths = [r["width"] for r in rows]
            ax.errorbar(
                widths, [r["final_loss_mean"] for r in rows], yerr=[r["final_loss_sem"] for r in rows],
                color=colors[opt], marker="o", ms=4, lw=1.2, capsize=2, label=opt,
            )  # fmt: skip
            bad = [r for r in rows if r["diverged"]]
            if bad:
                ax.plot([r["width"] for r in bad], [r["final_loss_mean"] for r in bad], ls="none", marker="o", ms=9,
                        mfc="none", mec=colors[opt])  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_title(family, fontsize="small")
        ax.set_xlabel("width", fontsize="small")
        ax.set_ylabel("final train loss", fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.grid(True, alpha=0.3)
    _legend(fig, axes)
    steps = sorted({r["steps"] for r in tables.final})
    fig.suptitle(f"{tables.name}: final training loss after {', '.join(map(str, steps))} steps vs width (hollow: diverged runs)")
    return save_png(fig, path)


def plot_aggregates(tables: GroupTables, optimizers: Sequence[str], reference: str, path: Path) -> Path:
    """Celo's aggregates with 95% stratified-bootstrap intervals: one panel per (score, aggregate)."""
    scores = ("normalized_loss", "speedup")
    names = list(dict.fromkeys(r["aggregate"] for r in tables.aggregates))
    fig, axes = new_figure(len(scores) * len(names), ncols=len(names), panel_size=(3.0, 0.35 * len(optimizers) + 1.2))
    colors = optimizer_colors(optimizers)
    for ax, (score, aggregate) in zip(axes, [(s, a) for s in scores for a in names]):
        rows = {r["optimizer"]: r for r in tables.aggregates if r["score"] == score and r["aggregate"] == aggregate}
        for i, opt in enumerate(optimizers):
            r = rows[opt]
            ax.errorbar([r["value"]], [i], xerr=[[r["value"] - r["ci_low"]], [r["ci_high"] - r["value"]]],
                        color=colors[opt], marker="o", capsize=3, label=opt)  # fmt: skip
        ax.axvline(0.0 if aggregate == "optimality gap" else 1.0, color="grey", ls=":", lw=1.0)
        ax.set_yticks(range(len(optimizers)), optimizers, fontsize="x-small")
        ax.set_ylim(-0.7, len(optimizers) - 0.3)
        ax.set_title(f"{score.replace('_', ' ')}: {aggregate}", fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{tables.name}: Celo's scores against {reference} (higher IQM and median, lower optimality gap are better)")
    return save_png(fig, path)


def plot_task(task: Task, optimizers: Sequence[str], seeds: Sequence[int], records: Records, path: Path) -> Path:
    """One task: training curves (left) and test loss at the evaluation steps (right)."""
    fig, (left, right) = new_figure(2, ncols=2)
    colors = optimizer_colors(optimizers)
    _curve_panel(left, task, optimizers, seeds, records, colors, None)
    for opt in optimizers:
        recs = [records[(task.id, opt, s)] for s in seeds]
        steps = recs[0].eval_steps
        test = np.array([r.test_loss for r in recs]).mean(axis=0)
        right.plot(steps, test, color=colors[opt], marker="o", ms=3, lw=1.2, label=opt)
    right.set_title("test loss", fontsize="small")
    right.set_xlabel("step", fontsize="small")
    right.tick_params(labelsize="x-small")
    right.grid(True, alpha=0.3)
    _legend(fig, [left])
    fig.suptitle(f"{task.id}: mean over {len(seeds)} seeds")
    return save_png(fig, path)


def plot_suite(suite: Suite, tables: Summary, records: Records, out: Path) -> list[Path]:
    """Every figure of an evaluation (see the module docstring); returns the PNG paths."""
    opts, seeds = tables.optimizers, tables.seeds
    paths: list[Path] = []
    for g in tables.groups:
        group = g.group
        if group.kind == "width":
            paths.append(plot_loss_vs_width(g, opts, out / f"{g.name}_loss_vs_width.png"))
            largest = {}
            for task in group.tasks:
                if task.width >= largest.get(task.family.name, task).width:
                    largest[task.family.name] = task
            paths.append(plot_curves(list(largest.values()), opts, seeds, records, out / f"{g.name}_largest_width_curves.png",
                                     f"{g.name}: training curves at the largest widths", suite.meta_unroll))  # fmt: skip
        elif group.kind in ("depth", "horizon"):
            unroll = suite.meta_unroll if group.kind == "horizon" else None
            paths.append(plot_curves(list(group.tasks), opts, seeds, records, out / f"{g.name}_curves.png",
                                     f"{g.name}: training curves", unroll))  # fmt: skip
        if g.aggregates:
            paths.append(plot_aggregates(g, opts, str(tables.reference), out / f"{g.name}_aggregates.png"))
    for task in suite.tasks():
        paths.append(plot_task(task, opts, seeds, records, out / "tasks" / f"{task.id}.png"))
    return paths
