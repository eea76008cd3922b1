"""``python train.py coord-check``: the command line of the coordinate-check sweep (:mod:`.sweep`).

See :mod:`lightning_lopt.coord_check.sweep` for what it runs and writes, and ``docs/coord_check.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jsonargparse import ActionYesNo

from lightning_lopt.coord_check.callback import STATS
from lightning_lopt.coord_check.summary import format_summary
from lightning_lopt.coord_check.sweep import DEFAULT_LR, DEPTH, HEADS, MODELS, run_coord_sweep
from lightning_lopt.eval.arguments import UsageError, int_list, new_parser, run_command, str_list

__all__ = ["build_parser", "main"]


def _optimizer_kwargs(value: Any) -> dict[str, dict[str, Any]] | None:
    """``--optimizer-kwargs``: a mapping of optimizer name to keyword arguments (JSON or YAML)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--optimizer-kwargs: invalid JSON: {err}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError('--optimizer-kwargs: expected {"optimizer": {"argument": value, ...}, ...}')
    return value


def build_parser() -> Any:
    """The ``coord-check`` argument parser (jsonargparse: ``--config`` YAML plus the flags)."""
    parser = new_parser(
        "train.py coord-check",
        "μP coordinate check: sweep widths, record per-layer pre-activation statistics, plot them "
        "and write the log-log slopes against width to summary.json.",
    )
    parser.add_argument("--model", type=str, default="mlp", help=f"one of {', '.join(MODELS)}")
    parser.add_argument("--widths", type=str | list[int], default="64,128,256,512,1024", help="comma-separated widths")
    parser.add_argument(
        "--optimizers", type=str | list[str], default="adamw,muadam",
        help="comma-separated: NAME, NAME:WEIGHTS or package.module:Class; @mup or @sp pins the parametrization",
    )  # fmt: skip
    parser.add_argument("--param", type=str, default="both", help="mup, sp or both: for optimizers without :PARAM")
    parser.add_argument("--steps", type=str | list[int], default="0,1,2,5,10", help="optimizer steps to record")
    parser.add_argument("--seeds", type=int | list[int] | str, default=2, help="N for seeds 0..N-1, or a list: 0,3,7")
    parser.add_argument(
        "--lr", type=float | None, default=None, help=f"learning rate for all optimizers (default per optimizer: {DEFAULT_LR})"
    )
    parser.add_argument(
        "--optimizer-kwargs", type=str | dict | None, default=None,
        help='keyword arguments per optimizer entry, e.g. \'{"adamw": {"weight_decay": 0.0}}\'',
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--data", type=str | None, default=None,
        help="digits (default for mlp/vit), mnist, fashion_mnist, text, synthetic (default for lm)",
    )  # fmt: skip
    parser.add_argument("--depth", type=int | None, default=None, help=f"model depth (default {DEPTH})")
    parser.add_argument("--heads", type=int, default=HEADS, help="attention heads for vit and lm")
    parser.add_argument("--stats", type=str | list[str], default="delta_std,abs_mean", help=f"among {', '.join(STATS)}")
    parser.add_argument(
        "--modules", type=str | list[str] | None, default=None,
        help="glob patterns over model layer names (default: Linear-like layers)",
    )  # fmt: skip
    parser.add_argument("--out", type=str, default="outputs/coord_check", help="output folder")
    parser.add_argument("--plot", action=ActionYesNo(no_prefix="no-"), default=True, help="draw the PNGs")
    parser.add_argument("--progress", action=ActionYesNo(no_prefix="no-"), default=True, help="show the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python train.py coord-check ARGS``: run the sweep and print the slopes at the last step."""

    def run(args: Any) -> None:
        try:
            # The command prints slopes against width: one width gives none (the Python API still
            # records the statistics of a single width).
            widths = sorted(set(int_list(args.widths, "--widths", minimum=1)))
            if len(widths) < 2:
                raise ValueError(f"--widths: a slope against width needs at least two distinct widths, got {widths}")
            result = run_coord_sweep(
                model=args.model,
                widths=args.widths,
                optimizers=str_list(args.optimizers, "--optimizers"),
                param=args.param,
                steps=args.steps,
                seeds=args.seeds,
                lr=args.lr,
                optimizer_kwargs=_optimizer_kwargs(args.optimizer_kwargs),
                batch_size=args.batch_size,
                data=args.data,
                out=args.out,
                depth=args.depth,
                heads=args.heads,
                stats=str_list(args.stats, "--stats"),
                modules=None if args.modules is None else str_list(args.modules, "--modules"),
                plot=args.plot,
                progress=args.progress,
            )
        except ValueError as err:  # every check runs before the first fit
            raise UsageError(str(err)) from err
        print(format_summary(result.summary))
        print(f"wrote {result.out / 'summary.json'}, records.csv and {len(result.figures)} plots to {result.out}")

    run_command(build_parser(), argv, run)
