"""The README's headline figure: final training loss vs width on the Fashion-MNIST MLP, from the
committed width-suite results (``docs/results/width/final_losses.csv``).

Unlike the report's Fig. 1, the loss axis is zoomed on the optimizers that train, and diverged LO
points are drawn at the top edge with their count, so the differences between μLO and the tuned
baselines stay visible.

Usage::

    python scripts/readme_figure.py   # -> docs/img/results_width.png
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SOURCE = Path("docs/results/width/final_losses.csv")
OUT = Path("docs/img/results_width.png")
LABELS = {"mulo": "μLO (packaged)", "lo": "LO (packaged, same compute)", "adamw": "AdamW (tuned at 128)", "muadam": "μAdam (tuned at 128)"}
TOP = 0.6


def main() -> None:
    rows = [r for r in csv.DictReader(SOURCE.open()) if r["family"] == "mlp_fashion_mnist"]
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    for name, label in LABELS.items():
        mine = sorted((int(r["width"]), float(r["final_loss_mean"]), float(r["final_loss_sem"]), int(r["diverged"])) for r in rows if r["optimizer"] == name)
        widths = [w for w, *_ in mine]
        shown = [min(m, TOP) for _, m, _, _ in mine]
        line = ax.errorbar(widths, shown, yerr=[s if m < TOP else 0 for _, m, s, _ in mine], marker="o", capsize=3, label=label)
        for w, m, _, div in mine:
            if m >= TOP:
                ax.annotate(f"{m:.2f}" + (f"\n{div}/5 diverged" if div else ""), (w, TOP), textcoords="offset points",
                            xytext=(0, -28), ha="center", fontsize=7, color=line[0].get_color())
    ax.set(xscale="log", xlabel="width (μLO/LO meta-trained at widths 32-128, 8x8 inputs)", ylabel="final training loss",
           title="Fashion-MNIST 28x28 MLP, depth 3, 300 steps, 5 seeds", ylim=(0.37, TOP + 0.01))
    ax.set_xticks([128, 256, 512, 1024, 2048], labels=["128", "256", "512", "1024", "2048"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)


if __name__ == "__main__":
    main()
