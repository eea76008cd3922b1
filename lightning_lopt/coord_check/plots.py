"""PNG figures of the coordinate check, drawn with matplotlib's pyplot-free API (the user's global
backend is left alone).

* :func:`plot_records`: one fit's statistics vs step, one line per layer (the callback's ``plot=True``);
* :func:`plot_coord_sweep`: the sweep's figures per optimizer, parametrization and statistic:
  statistic vs width (log-log, one line per step; mup's style) and statistic vs step (one line per
  width; μLO Fig. 3 and appendix F), one panel per layer.

Example::

    from lightning_lopt.coord_check.plots import plot_records
    fig = plot_records(coord_check.records, "coord_check.png")
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_lopt.eval.plots import new_figure, save_png

__all__ = ["file_safe", "plot_coord_sweep", "plot_records"]


def file_safe(name: str) -> str:
    """``name`` as part of a file name: an optimizer key such as ``mulo:runs/my-mulo`` → ``mulo-runs-my-mulo``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def plot_records(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str] | None = None, stats: Sequence[str] | None = None
) -> Any:
    """Plot statistic vs step, one line per layer and one panel per statistic, log y.

    Non-positive values (``delta_std`` at step 0) cannot sit on a log axis and are left out.
    Returns the ``matplotlib.figure.Figure``; saves it as a PNG when ``path`` is given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = list(stats or dict.fromkeys(r["stat"] for r in records))
    layers = list(dict.fromkeys(r["layer"] for r in records))
    # The pyplot-free Figure API leaves the user's global matplotlib backend alone.
    fig = Figure(figsize=(4.2 * len(stats), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(stats), squeeze=False)[0]
    for ax, stat in zip(axes, stats):
        for layer in layers:
            pts = sorted(
                (r["step"], r["value"])
                for r in records
                if r["stat"] == stat and r["layer"] == layer and r["value"] > 0 and math.isfinite(r["value"])
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=layer)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(stat)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="x-small")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_coord_sweep(records: Sequence[Mapping[str, Any]], out_dir: Path, stats: Sequence[str]) -> list[Path]:
    """The coordinate-check sweep's figures (:mod:`~lightning_lopt.coord_check.sweep`): both styles for
    every (optimizer, param, stat); returns the PNG paths.

    Lines are seed means; the shaded band spans the seeds' min and max. Non-positive values
    (``delta_std`` at step 0) are left out of the log axes.
    """
    from matplotlib import colormaps
    from matplotlib.ticker import NullFormatter

    model = records[0]["model"]
    paths: list[Path] = []
    combos = list(dict.fromkeys((r["optimizer"], r["param"]) for r in records))
    for opt_name, p in combos:
        rows = [r for r in records if r["optimizer"] == opt_name and r["param"] == p]
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        widths = sorted({r["width"] for r in rows})
        steps = sorted({r["step"] for r in rows})
        for stat in stats:
            # (layer, step, width) -> values over seeds
            cells: dict[tuple[str, int, int], list[float]] = {}
            for r in rows:
                if r["stat"] == stat:
                    cells.setdefault((r["layer"], r["step"], r["width"]), []).append(r["value"])
            for style, xs, lines, cmap in (
                ("vs_width", widths, steps, "plasma"),
                ("vs_step", steps, widths, "viridis"),
            ):
                fig, axes = new_figure(len(layers), ncols=4, panel_size=(2.9, 2.3))
                colors = colormaps[cmap](np.linspace(0.0, 0.85, len(lines)))
                for ax, layer in zip(axes, layers):
                    for color, line in zip(colors, lines):
                        key = (lambda xv: (layer, line, xv)) if style == "vs_width" else (lambda xv: (layer, xv, line))
                        pts = [(xv, cells[key(xv)]) for xv in xs if key(xv) in cells]
                        pts = [(xv, v) for xv, v in pts if min(v) > 0 and all(map(math.isfinite, v))]
                        if not pts:
                            continue
                        xv = [q[0] for q in pts]
                        label = f"t={line}" if style == "vs_width" else f"w={line}"
                        ax.plot(xv, [float(np.mean(q[1])) for q in pts], marker="o", ms=3, color=color, label=label)
                        low_band, high_band = [min(q[1]) for q in pts], [max(q[1]) for q in pts]
                        ax.fill_between(xv, low_band, high_band, color=color, alpha=0.2, lw=0)
                    ax.set_yscale("log")
                    low, high = ax.dataLim.intervaly
                    if low > 0 and high / low < 10:
                        # At least a decade per panel: autoscaling would blow seed noise around a
                        # flat (μP) curve up to the size of a trend.
                        mid = math.sqrt(low * high)
                        ax.set_ylim(mid / math.sqrt(10), mid * math.sqrt(10))
                    # Past a decade matplotlib still labels some minor ticks, which then overlap.
                    ax.yaxis.set_minor_formatter(NullFormatter())
                    if style == "vs_width":
                        ax.set_xscale("log", base=2)
                    ax.set_title(layer, fontsize="small")
                    ax.set_xlabel("width" if style == "vs_width" else "step", fontsize="small")
                    ax.tick_params(labelsize="x-small")
                    ax.grid(True, which="major", alpha=0.3)
                handles, labels = fig.axes[0].get_legend_handles_labels()
                fig.legend(handles, labels, loc="upper right", fontsize="x-small")
                title = f"{model}: {stat}, {opt_name} ({'μP' if p == 'mup' else 'SP'})"
                fig.suptitle(title + (", one line per step" if style == "vs_width" else ", one line per width"))
                paths.append(save_png(fig, out_dir / f"{model}_{file_safe(opt_name)}_{p}_{stat}_{style}.png"))
    return paths
