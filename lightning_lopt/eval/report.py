"""The markdown report of an evaluation: the command and configuration that made it, the optimizers
and their settings, and every group's tables and figures.

Tables follow the papers: final losses (mean ± standard error over seeds, diverged runs counted at
the cap and marked), μLO's Table 2 (average rank; the best of each column in bold, the second
underlined, the third in italics), Celo's aggregates with 95% intervals, and paired per-seed
comparisons against the tuned baselines ("wins k of n", the mean difference and its paired s.e.).

Example::

    path = write_report(plan, tables, figures, command="python train.py evaluate --suite ci", config={})
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_lopt.eval.optimizers import weights_identity
from lightning_lopt.eval.plan import Plan
from lightning_lopt.eval.summary import GroupTables, Summary, rank_columns

REPORT_NAME = "report.md"


def _num(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _podium(values: Mapping[str, float]) -> dict[str, str]:
    """Table 2's emphasis: the lowest value bold, the second underlined, the third italic (ties
    share the emphasis of their place)."""
    styles = ("**{}**", "<u>{}</u>", "*{}*")
    distinct = sorted(set(values.values()))
    out = {}
    for opt, v in values.items():
        place = distinct.index(v)
        text = f"{v:.2f}"
        out[opt] = styles[place].format(text) if place < len(styles) else text
    return out


def final_loss_table(g: GroupTables, optimizers: Sequence[str]) -> list[str]:
    """Tasks × optimizers: final training loss, mean ± s.e.m.; ``(k div.)`` marks diverged runs."""
    rows = []
    for task in g.group.tasks:
        cells = [f"`{task.id}`"]
        for opt in optimizers:
            r = next(x for x in g.final if x["task"] == task.id and x["optimizer"] == opt)
            cell = f"{_num(r['final_loss_mean'])} ± {_num(r['final_loss_sem'], 2)}"
            if r["diverged"]:
                cell += f" ({r['diverged']} div.)"
            cells.append(cell)
        rows.append(cells)
    return _table(["task", *optimizers], rows)


def rank_table(g: GroupTables, optimizers: Sequence[str]) -> list[str]:
    """μLO Table 2: one column per (horizon, in/out of distribution), average rank per optimizer."""
    columns = [(h, c) for h in g.group.horizons for c in rank_columns(g.group)]
    by = {(r["horizon"], r["column"], r["optimizer"]): r["rank"] for r in g.ranks}
    styled = {col: _podium({o: by[(*col, o)] for o in optimizers}) for col in columns}
    header = ["optimizer", *(f"loss at {h} steps: {c}" for h, c in columns)]
    return _table(header, [[opt, *(styled[col][opt] for col in columns)] for opt in optimizers])


def aggregate_table(g: GroupTables, optimizers: Sequence[str]) -> list[str]:
    """Celo Table 1: median, optimality gap and IQM of the normalised loss and of the speedup."""
    by = {(r["optimizer"], r["score"], r["aggregate"]): r for r in g.aggregates}
    cols = [(s, a) for s in ("normalized_loss", "speedup") for a in ("median", "optimality gap", "IQM")]
    header = ["optimizer", *(f"{s.replace('_', ' ')}: {a} {'↓' if a == 'optimality gap' else '↑'}" for s, a in cols)]
    rows = []
    for opt in optimizers:
        cells = [opt]
        for s, a in cols:
            r = by[(opt, s, a)]
            cells.append(f"{_num(r['value'], 3)} [{_num(r['ci_low'], 3)}, {_num(r['ci_high'], 3)}]")
        rows.append(cells)
    return _table(header, rows)


def paired_table(g: GroupTables) -> list[str]:
    """Tasks × (optimizer vs baseline): mean per-seed difference ± paired s.e., and wins k of n.

    A difference inside two paired s.e. is marked "(noise)": no claim either way."""
    pairs = list(dict.fromkeys((r["optimizer"], r["baseline"]) for r in g.paired))
    by = {(r["task"], r["optimizer"], r["baseline"]): r for r in g.paired}
    rows = []
    for task in g.group.tasks:
        cells = [f"`{task.id}`"]
        for opt, base in pairs:
            r = by[(task.id, opt, base)]
            noise = " (noise)" if abs(r["mean_diff"]) <= 2 * r["paired_se"] else ""
            cells.append(f"{r['mean_diff']:+.3g} ± {_num(r['paired_se'], 2)}, wins {r['wins']} of {r['n']}{noise}")
        rows.append(cells)
    return _table(["task", *(f"{o} − {b}" for o, b in pairs)], rows)


def machines_note(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Which machines (:func:`lightning_lopt.provenance.arithmetic`, which says why it matters) made
    the runs, with a warning when there are several: a seed then no longer shares its rounding across
    optimizers."""
    counts = Counter(r.get("machine") or "not recorded (cached before machines were)" for r in runs)
    lines = ["Machines: " + "; ".join(f"{m} ({n} runs)" for m, n in counts.most_common()) + ".", ""]
    if len(counts) > 1:
        lines += [
            "> **Warning.** These runs come from more than one machine, so the paired comparisons above mix "
            "seeds whose runs did not share their rounding. Re-run on one machine (a fresh `--cache-dir`) "
            "before reading a paired difference.",
            "",
        ]
    return lines


def write_report(
    plan: Plan,
    tables: Summary,
    figures: Sequence[Path],
    *,
    command: str,
    config: Mapping[str, Any],
    random_weights: Sequence[str] = (),
    wall_s: float = 0.0,
    cached: int = 0,
) -> Path:
    """Write ``report.md`` under ``plan.out`` and return its path."""
    out: Path = plan.out
    suite = plan.suite
    opts = tables.optimizers
    lines = [f"# Evaluation: `{suite.name}` suite, size `{suite.size}`", ""]
    if suite.description:
        lines += [f"> {suite.description}", ""]
    lines += ["Command:", "", "```bash", command or "(called from Python)", "```", ""]
    if config:
        lines += ["Configuration (the resolved flags; as a `--config` file they repeat this evaluation):", "",
                  "```yaml", yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```", ""]  # fmt: skip
    lines += [f"Suite file: `{suite.path}`. Seeds: {', '.join(map(str, tables.seeds))}.", ""]

    lines += ["## Optimizers", ""]
    lines += _table(
        ["optimizer", "class", "trains", "learned-optimizer weights"],
        [[f"`{s.label}`", f"`{s.factory}`", "μP models" if s.param == "mup" else "SP models",
          weights_identity(s) or "—"] for s in plan.optimizers],
    )  # fmt: skip
    lines.append("")
    if random_weights:
        lines += [
            f"> **Warning.** {', '.join(f'`{o}`' for o in random_weights)} found no meta-trained weights and ran a "
            "random meta-initialisation: their numbers say nothing about what the learned optimizer can do. "
            "Pass weights with `NAME:PATH` in `--optimizers`.",
            "",
        ]
    rows = []
    for family in suite.families():
        for spec in plan.optimizers:
            setting = plan.settings[(family.name, spec.label)]
            values = ", ".join(f"{k}={v}" for k, v in setting.values.items()) or "defaults"
            rows.append([f"`{family.name}`", f"`{spec.label}`", values, setting.origin])
    lines += ["Settings per family (baselines tuned at the family's base width; see `configs/eval/tuned/`):", ""]
    lines += _table(["family", "optimizer", "settings", "from"], rows)
    lines.append("")
    ema_note = f", after an EMA of coefficient {tables.ema}" if tables.ema else ""
    lines += [
        "Final loss: the mean training loss of the last 10 batches" + ema_note + ". A run diverges at a non-finite "
        "loss or one above 10x the task's reference loss (ln C for classification, ln vocabulary for LMs, the mean "
        "squared input for autoencoders); it is kept, with its loss at the cap (1.5x the reference) from there on.",
        "",
    ]

    figure_names = {p.name: p for p in figures}
    for g in tables.groups:
        group = g.group
        lines += [f"## Group `{g.name}` ({group.kind})", ""]
        lines += [f"{len(group.tasks)} tasks: " + ", ".join(f"`{t.id}`" for t in group.tasks) + ".", ""]
        lines += [f"### Final training loss (mean ± s.e.m. over {len(tables.seeds)} seeds)", ""]
        lines += final_loss_table(g, opts) + [""]
        if g.paired:
            lines += [
                "### Paired per-seed comparisons with the tuned baselines", "",
                f"Each cell: the mean over the {len(tables.seeds)} seeds of (optimizer − baseline) final loss "
                "(negative: the optimizer is lower), its paired standard error, and on how many seeds the optimizer "
                "is strictly lower. Every optimizer sees the same initialisations and batches on a seed, so the "
                "paired s.e. is the one that decides; \"(noise)\": inside two paired s.e.", "",
            ]  # fmt: skip
            lines += paired_table(g) + [""]
        lines += ["### Average rank (μLO Table 2)", ""]
        if group.kind == "width":
            lines += ["Per family, optimizers are ranked by the seed-mean loss at each horizon; ranks are averaged over "
                      "families. ID (Base): the width the baselines were tuned at; OoD (Large): the next width; "
                      "OoD (XL): the largest.", ""]  # fmt: skip
        lines += rank_table(g, opts) + [""]
        if g.aggregates:
            lines += [
                f"### Celo's scores against `{tables.reference}`", "",
                f"Normalised loss `L_ref / L_opt` and speedup `T / t*` per run, on curves smoothed with an EMA of "
                f"{tables.celo_ema}; `L_ref` is the reference's final loss averaged over seeds; the speedup is 0 "
                f"where a run never reaches it. Aggregates over {len(group.tasks)} tasks x {len(tables.seeds)} seeds "
                f"with 95% stratified-bootstrap intervals ({tables.bootstrap_reps} replicates).", "",
            ]  # fmt: skip
            lines += aggregate_table(g, opts) + [""]
        for suffix in ("loss_vs_width", "largest_width_curves", "curves", "aggregates"):
            name = f"{g.name}_{suffix}.png"
            if name in figure_names:
                lines += [f"![{name}]({name})", ""]
    task_figures = [p for p in figures if p.parent.name == "tasks"]
    if task_figures:
        lines += ["## Per-task curves", ""]
        lines += [f"- [`{p.stem}`](tasks/{p.name})" for p in task_figures] + [""]
    runs = len(tables.runs)
    lines += [
        "## Runs", "",
        f"{runs} runs: {cached} from the cache, {runs - cached} trained here in {wall_s:.0f} s of run time. Every run's "
        "curves (training loss every step, test loss and accuracy at about 10 evenly spaced steps) are CSV files listed in `runs.csv`; "
        "the tables are in `final_losses.csv`, `ranks.csv`, `scores.csv`, `aggregates.csv` and `summary.json`.", "",
    ]  # fmt: skip
    lines += machines_note(tables.runs)
    path = out / REPORT_NAME
    path.write_text("\n".join(lines))
    return path


def console_summary(tables: Summary | None) -> str:
    """A few lines for the terminal: each group's average ranks at its last horizon."""
    if tables is None:
        return ""
    lines = []
    for g in tables.groups:
        last = g.group.horizons[-1]
        for column in rank_columns(g.group):
            ranks = {r["optimizer"]: r["rank"] for r in g.ranks if r["horizon"] == last and r["column"] == column}
            text = ", ".join(f"{o} {ranks[o]:.2f}" for o in sorted(ranks, key=ranks.get))
            lines.append(f"{g.name} · average rank at {last} steps · {column}: {text}")
    return "\n".join(lines)
