"""The coordinate check's numbers: ``summary.json`` (:func:`summarize`) and its text table
(:func:`format_summary`).

Example::

    from lightning_lopt.coord_check.summary import format_summary
    print(format_summary(result.summary))          # result: a CoordSweepResult
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_lopt.eval.metrics import loglog_slope

__all__ = ["format_summary", "summarize"]


def _json_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


def summarize(records: Sequence[dict[str, Any]], **meta: Any) -> dict[str, Any]:
    """``summary.json``: ``meta``, ``last_step`` and ``slopes``, which maps optimizer → param → layer
    → stat to the log-log slope of the statistic against width at the last step::

        {"mean": ..., "std": ..., "per_seed": {"0": ..., "1": ...},
         "values": {"64": ..., ...},          # width -> statistic at the last step, seed mean
         "by_step": {"1": ..., "2": ...}}     # step -> mean slope: early blow-ups that later saturate

    ``std`` is the sample std over seeds (0 for one seed). A slope that cannot be taken (a value
    ≤ 0, e.g. ``delta_std`` at step 0) is ``null``, and so is a mean over seeds that includes one.
    """
    last = max(r["step"] for r in records)
    # (optimizer, param, layer, stat) -> step -> seed -> width -> value
    table: dict[tuple[str, str, str, str], dict[int, dict[int, dict[int, float]]]] = {}
    for r in records:
        key = (r["optimizer"], r["param"], r["layer"], r["stat"])
        table.setdefault(key, {}).setdefault(r["step"], {}).setdefault(r["seed"], {})[r["width"]] = r["value"]

    def seed_slopes(by_seed: dict[int, dict[int, float]]) -> dict[int, float]:
        return {seed: loglog_slope(sorted(bw), [bw[w] for w in sorted(bw)]) for seed, bw in sorted(by_seed.items())}

    slopes: dict[str, Any] = {}
    for (opt_name, p, layer, stat), by_step in table.items():
        at_last = by_step.get(last)
        if at_last is None:
            continue
        per_seed = seed_slopes(at_last)
        vals = np.array(list(per_seed.values()))
        widths = sorted({w for bw in at_last.values() for w in bw})
        entry = {
            "mean": _json_float(float(vals.mean())),
            "std": _json_float(float(vals.std(ddof=1)) if len(vals) > 1 else 0.0),
            "per_seed": {str(s): _json_float(v) for s, v in per_seed.items()},
            "values": {str(w): float(np.mean([bw[w] for bw in at_last.values() if w in bw])) for w in widths},
            "by_step": {
                str(step): _json_float(float(np.mean(list(seed_slopes(by_step[step]).values()))))
                for step in sorted(by_step)
            },
        }
        slopes.setdefault(opt_name, {}).setdefault(p, {}).setdefault(layer, {})[stat] = entry
    return {**meta, "last_step": last, "slopes": slopes}


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the slopes: one row per optimizer, param and layer."""
    stats = sorted({s for o in summary["slopes"].values() for p in o.values() for lay in p.values() for s in lay})
    head = f"log-log slope vs width at step {summary['last_step']} (mean ± std over seeds)"
    # Entries such as "mulo:runs/my-mulo" are longer than registry names: the column fits the longest.
    name_w = max([10, *(len(o) for o in summary["slopes"])])
    lines = [head, f"{'optimizer':<{name_w}} {'param':<5} {'layer':<28} " + " ".join(f"{s:>16}" for s in stats)]
    for opt_name, by_param in summary["slopes"].items():
        for p, by_layer in by_param.items():
            for layer, by_stat in by_layer.items():
                cells = []
                for s in stats:
                    e = by_stat.get(s)
                    cells.append(
                        f"{'n/a':>16}" if e is None or e["mean"] is None else f"{e['mean']:>+9.2f} ± {e['std']:<4.2f}"
                    )
                lines.append(f"{opt_name:<{name_w}} {p:<5} {layer:<28} " + " ".join(cells))
    return "\n".join(lines)
