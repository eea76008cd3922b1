"""``python train.py evaluate``: run a suite against tuned baselines and write tables, plots and a report.

Commands::

    python train.py evaluate --suite ci --out outputs/eval/ci                       # minutes on CPU
    python train.py evaluate --suite width --optimizers mulo,lo,adamw,muadam --seeds 5
    python train.py evaluate --suite width --size full --device cuda                # paper scale
    python train.py evaluate --suite my_suite.yaml --optimizers mulo:runs/my-mulo,adamw
    python train.py evaluate --suite width --optimizers adamw,muadam --tune missing --tune-only
    python train.py evaluate --config my_evaluation.yaml --seeds 3

Everything is checked before the first run: the suite and size, every family's data (with the
command that fetches it), every task's model, every optimizer (built once with its setting, so a bad
weights path or keyword fails here) and the tuned baseline settings. Then missing tuning runs (with
``--tune``), then the suite's runs (cached, so an interrupted evaluation resumes), then the outputs
under ``--out``:

* ``report.md``: the command, the configuration and everything below;
* ``final_losses.csv``, ``ranks.csv``, ``scores.csv``, ``aggregates.csv``, ``runs.csv``, ``summary.json``;
* PNGs: loss vs width (μLO Fig. 1), curves at the largest widths (Fig. 4), depth (Fig. 5), horizon
  (Fig. 6), Celo's aggregates and one curve plot per task.

Per-run curves (training loss every step, test loss and accuracy at intervals) are CSVs in the run
cache (``--cache-dir``, default ``<out>/runs``), linked from ``runs.csv``.

Python::

    from lightning_lopt.eval.evaluate import evaluate
    result = evaluate("ci", seeds=2, out="outputs/eval/ci")
    result.report                                     # Path of report.md
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionYesNo

from lightning_lopt.eval import plots, report, summary
from lightning_lopt.eval.arguments import (
    UsageError,
    command_line,
    new_parser,
    resolve_seeds,
    run_command,
    str_list,
)
from lightning_lopt.eval.optimizers import OptimizerSpec, Setting, make_optimizer, parse_optimizer, uses_random_weights
from lightning_lopt.eval.plan import Plan
from lightning_lopt.eval.runner import execute
from lightning_lopt.eval.suites import SIZES, Suite, load_suite
from lightning_lopt.eval.tasks import Family, Task, build_model, num_classes
from lightning_lopt.eval.tuning import DEFAULT_TUNED_DIR, is_tunable, load_grids, load_tuned, tune_family
from lightning_lopt.optimizee import OptimizeeModule

DEFAULT_OPTIMIZERS = ("mulo", "lo", "adamw", "muadam")
TUNE_MODES = ("no", "missing", "all")
#: The origin of a setting that ``--tune`` has yet to choose.
TO_BE_TUNED = "to be tuned"


@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns: the plan, every run's record, the tables and written files."""

    plan: Plan
    records: dict[tuple[str, str, int], Any]
    tables: summary.Summary | None
    report: Path | None = None
    figures: list[Path] = field(default_factory=list)
    tuned: list[Path] = field(default_factory=list)


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device: expected cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device: CUDA is not available on this machine; use --device cpu")
    return device


def _check_data(suite: Suite) -> None:
    """Load every family's data (kept for the runs); a missing data set fails with its fetch command."""
    for family in suite.families():
        try:
            family.source()
        except (OSError, RuntimeError, ValueError) as err:
            raise UsageError(f"--suite: family {family.name!r} needs data {family.data!r}: {err}") from err


def _check_models(suite: Suite, optimizers: Sequence[OptimizerSpec]) -> None:
    """Build every task's model on the meta device (no memory), so an impossible width fails now."""
    params = sorted({s.param for s in optimizers})
    for task in suite.tasks():
        source = task.family.source()
        for param in params:
            try:
                with torch.device("meta"):
                    build_model(task, param, source)
            except (ValueError, RuntimeError) as err:
                raise UsageError(f"--suite: task {task.id} cannot be built ({param}): {err}") from err


def _check_optimizers(plan: Plan) -> None:
    """Build each optimizer once with its setting on its family's smallest task, as the runs will:
    a bad keyword, weights path or weights architecture fails here."""
    smallest: dict[str, Task] = {}
    for task in plan.suite.tasks():
        current = smallest.get(task.family.name)
        if current is None or (task.width, task.depth) < (current.width, current.depth):
            smallest[task.family.name] = task
    for spec in plan.optimizers:
        for name, task in smallest.items():
            setting = plan.settings[(name, spec.label)]
            if setting.origin == TO_BE_TUNED:
                continue  # no settings yet; tuning builds it with every grid point
            source = task.family.source()
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*RANDOM meta-initialisation.*")
                    model = build_model(task, spec.param, source, **setting.model_kwargs)
                    module = OptimizeeModule(model, task.family.objective, num_classes=num_classes(task, source))
                    make_optimizer(spec, setting, module, task.steps)
            except (TypeError, ValueError, OSError) as err:
                raise UsageError(f"--optimizers: {spec.label} cannot be built on {task.id} with {dict(setting.values)}: {err}") from err


def plan_evaluation(
    suite: str,
    size: str = "cpu",
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    seeds: int | str | Sequence[int] = 5,
    out: str | Path | None = None,
    device: str = "cpu",
    optimizer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    tune: str = "no",
    tuned_dir: str | Path = DEFAULT_TUNED_DIR,
    cache_dir: str | Path | None = None,
    grid: str | None = None,
) -> Plan:
    """Check every argument and resolve the settings; raises :class:`UsageError` naming the flag."""
    if size not in SIZES:
        raise UsageError(f"--size: expected one of {', '.join(SIZES)}, got {size!r}")
    if tune not in TUNE_MODES:
        raise UsageError(f"--tune: expected one of {', '.join(TUNE_MODES)}, got {tune!r}")
    try:
        loaded = load_suite(suite, size)
        seed_list = resolve_seeds(seeds)
        specs = []
        for entry in str_list(optimizers, "--optimizers"):
            try:
                specs.append(parse_optimizer(entry))
            except ValueError as err:
                raise ValueError(f"--optimizers: {err}") from err
    except ValueError as err:
        raise UsageError(str(err)) from err
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--optimizers: {labels} names an optimizer twice")
    given = {k: dict(v) for k, v in (optimizer_kwargs or {}).items()}
    unknown = sorted(set(given) - set(labels))
    if unknown:
        raise UsageError(f"--optimizer-kwargs: {unknown} are not among --optimizers {labels}")
    device = _check_device(device)
    _check_data(loaded)
    _check_models(loaded, specs)

    settings: dict[tuple[str, str], Setting] = {}
    to_tune: dict[str, Family] = {}
    for family in loaded.families():
        for spec in specs:
            key = (family.name, spec.label)
            if spec.label in given:
                settings[key] = Setting(given[spec.label], "given")
            elif is_tunable(spec):
                try:
                    tuned = None if tune == "all" else load_tuned(tuned_dir, size, family, spec.tuned_name)
                except ValueError as err:
                    raise UsageError(f"--tuned-dir: {err}") from err
                if tuned is None and tune == "no":
                    raise UsageError(
                        f"--optimizers: no tuned {spec.tuned_name} settings for family {family.name!r} at size {size} "
                        f"in {tuned_dir}; tune them with `python train.py evaluate --suite {suite} --size {size} "
                        f"--optimizers {spec.label} --tune missing --tune-only`, or give settings with "
                        f"--optimizer-kwargs '{{\"{spec.label}\": {{\"lr\": ...}}}}'"
                    )
                if tuned is None:
                    to_tune[family.name] = family
                    tuned = Setting({}, TO_BE_TUNED)
                settings[key] = tuned
            else:
                settings[key] = Setting({}, "defaults")
    out_dir = Path(out) if out is not None else Path("outputs") / "eval" / loaded.name
    plan = Plan(
        suite=loaded,
        optimizers=specs,
        seeds=seed_list,
        settings=settings,
        to_tune=list(to_tune.values()),
        out=out_dir,
        cache_dir=Path(cache_dir) if cache_dir is not None else out_dir / "runs",
        tuned_dir=Path(tuned_dir),
        device=device,
    )
    _check_optimizers(plan)
    if plan.to_tune:
        _check_grids(plan, grid or size)
    return plan


def _check_grids(plan: Plan, grid: str) -> None:
    """Every family to tune finds its grid, with axes for every baseline to tune."""
    try:
        grids = load_grids(grid)
    except (ValueError, OSError) as err:
        raise UsageError(f"--grid: {err}") from err
    for family in plan.to_tune:
        axes = grids.get(family.grid)
        if axes is None:
            raise UsageError(f"--grid: {grid} has no grid {family.grid!r} (family {family.name!r}); it has {sorted(grids)}")
        missing = [s.factory for s in plan.optimizers if is_tunable(s) and s.factory not in axes]
        if missing:
            raise UsageError(f"--grid: grid {family.grid!r} of {grid} has no axes for {missing}")


def evaluate(
    suite: str,
    size: str = "cpu",
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    seeds: int | str | Sequence[int] = 5,
    out: str | Path | None = None,
    device: str = "cpu",
    optimizer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    tune: str = "no",
    tune_only: bool = False,
    tune_seeds: int = 1,
    grid: str | None = None,
    tuned_dir: str | Path = DEFAULT_TUNED_DIR,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    ema: float = 0.0,
    celo_ema: float = 0.9,
    bootstrap_reps: int = 50_000,
    progress: bool = True,
    plot: bool = True,
    command: str = "",
    config: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Plan, tune what is missing (with ``tune``), run and summarise a suite; see the module docstring.

    Args:
        suite: a suite name (``width``, ``depth``, ``horizon``, ``diverse``, ``ci``) or YAML path.
        size: ``cpu`` or ``full``.
        optimizers: ``--optimizers`` entries (see :mod:`lightning_lopt.eval.optimizers`).
        seeds: N for seeds ``0..N-1``, or an explicit list.
        out: output folder (default ``outputs/eval/<suite>``).
        device: ``cpu`` or ``cuda``.
        optimizer_kwargs: settings per optimizer label; they replace tuned settings.
        tune: ``no`` (missing tuned settings are an error), ``missing`` or ``all``.
        tune_only: stop after tuning.
        tune_seeds: seeds per grid point.
        grid: tuning grids: ``cpu``, ``full`` or a YAML path (default: ``size``).
        tuned_dir: where tuned settings are read and written.
        cache_dir: the run cache (default ``<out>/runs``); tuning runs go to ``<out>/tuning``.
        workers: runs trained at a time, each in its own single-threaded process.
        ema: EMA coefficient applied to curves before final losses and ranks (0: none).
        celo_ema: EMA coefficient of Celo's normalised loss and speedup (the paper's 0.9).
        bootstrap_reps: stratified-bootstrap replicates of the confidence intervals.
        progress: show the progress bar.
        plot: draw the PNGs.
        command: the command line, for the report.
        config: the resolved configuration, for the report.
    """
    for name, value in (("--ema", ema), ("--celo-ema", celo_ema)):
        if not 0.0 <= value < 1.0:
            raise UsageError(f"{name}: expected a coefficient in [0, 1), got {value!r}")
    if workers < 1 or tune_seeds < 1 or bootstrap_reps < 1:
        raise UsageError("--workers, --tune-seeds and --bootstrap-reps must be at least 1")
    plan = plan_evaluation(suite, size, optimizers, seeds, out, device, optimizer_kwargs, tune, tuned_dir, cache_dir, grid)
    tuned_files = []
    if plan.to_tune:
        for family in plan.to_tune:
            tuned_files.append(
                tune_family(
                    family, plan.optimizers, size=size, grid=grid, tuned_dir=plan.tuned_dir,
                    cache_dir=plan.out / "tuning", seeds=tune_seeds, device=plan.device, workers=workers,
                    progress=progress, command=command,
                )  # fmt: skip
            )
        plan = plan_evaluation(suite, size, optimizers, seeds, out, device, optimizer_kwargs, "no", tuned_dir, cache_dir)
    if tune_only:
        return EvaluationResult(plan, {}, None, tuned=tuned_files)

    runs = plan.runs()
    by_key = execute(runs, plan.cache_dir, device=plan.device, workers=workers, progress=progress)
    records = {(r.task.id, r.optimizer.label, r.seed): by_key[r.key] for r in runs}
    paths = {(r.task.id, r.optimizer.label, r.seed): r.directory(plan.cache_dir) for r in runs}
    tables = summary.summarize(
        plan.suite, [s.label for s in plan.optimizers], plan.seeds, records,
        reference=next((s.label for s in plan.optimizers if s.tuned_name == "adamw" and is_tunable(s)), None),
        ema=ema, celo_ema=celo_ema, bootstrap_reps=bootstrap_reps,
        baselines=[s.label for s in plan.optimizers if is_tunable(s)],
    )  # fmt: skip
    plan.out.mkdir(parents=True, exist_ok=True)
    summary.write_tables(tables, plan.out, paths)
    figures = plots.plot_suite(plan.suite, tables, records, plan.out) if plot else []
    random = [s.label for s in plan.optimizers if uses_random_weights(s)]
    path = report.write_report(
        plan, tables, figures, command=command, config=dict(config or {}), random_weights=random,
        wall_s=sum(r.wall_s for r in by_key.values() if not r.cached),
        cached=sum(r.cached for r in by_key.values()),
    )  # fmt: skip
    return EvaluationResult(plan, records, tables, path, figures, tuned_files)


def build_parser() -> Any:
    """The ``evaluate`` argument parser."""
    parser = new_parser(
        "train.py evaluate",
        "Run an evaluation suite against tuned AdamW and μAdam: rank tables, Celo's IQM / median / "
        "optimality gap / speedup, the papers' plots and a markdown report.",
    )
    parser.add_argument("--suite", type=str, required=True, help="width, depth, horizon, diverse, ci, or a path to a suite YAML")
    parser.add_argument("--size", type=str, default="cpu", help="cpu (2 cores) or full (the papers' scale, for a GPU)")
    parser.add_argument(
        "--optimizers", type=str | list[str], default=",".join(DEFAULT_OPTIMIZERS),
        help="comma-separated: registry names, NAME:WEIGHTS for learned-optimizer weights, or package.module:Class; "
        "each optionally @mup or @sp",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int | list[int] | str, default=5, help="N for seeds 0..N-1, or a list: 0,3,7")
    parser.add_argument("--out", type=str | None, default=None, help="output folder (default outputs/eval/SUITE)")
    parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--optimizer-kwargs", type=dict | None, default=None,
        help='settings per optimizer label, replacing tuned ones: \'{"adamw": {"lr": 1e-3}}\'',
    )  # fmt: skip
    parser.add_argument("--tune", type=str, default="no", help="no, missing or all: tune the baselines of the suite's families")
    parser.add_argument("--tune-only", action=ActionYesNo(no_prefix="no-"), default=False, help="stop after tuning")
    parser.add_argument("--tune-seeds", type=int, default=1, help="seeds per tuning grid point")
    parser.add_argument("--grid", type=str | None, default=None, help="tuning grids: cpu, full or a YAML path (default: --size)")
    parser.add_argument("--tuned-dir", type=str, default=str(DEFAULT_TUNED_DIR), help="where tuned settings are read and written")
    parser.add_argument("--cache-dir", type=str | None, default=None, help="run cache (default OUT/runs)")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at a time, one process each")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA coefficient before final losses and ranks (0: none)")
    parser.add_argument("--celo-ema", type=float, default=0.9, help="EMA coefficient of Celo's scores")
    parser.add_argument("--bootstrap-reps", type=int, default=50_000, help="bootstrap replicates of the CIs")
    parser.add_argument("--progress", action=ActionYesNo(no_prefix="no-"), default=True, help="show the progress bar")
    parser.add_argument("--plot", action=ActionYesNo(no_prefix="no-"), default=True, help="draw the PNGs")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python train.py evaluate ARGS``."""
    parser = build_parser()

    def run(args: Any) -> None:
        config = {k.replace("_", "-"): v for k, v in vars(args).items() if k != "config"}
        result = evaluate(
            suite=args.suite, size=args.size, optimizers=args.optimizers, seeds=args.seeds, out=args.out,
            device=args.device, optimizer_kwargs=args.optimizer_kwargs, tune=args.tune, tune_only=args.tune_only,
            tune_seeds=args.tune_seeds, grid=args.grid, tuned_dir=args.tuned_dir, cache_dir=args.cache_dir,
            workers=args.workers, ema=args.ema, celo_ema=args.celo_ema, bootstrap_reps=args.bootstrap_reps,
            progress=args.progress, plot=args.plot, command=command_line("evaluate", argv), config=config,
        )  # fmt: skip
        for path in result.tuned:
            print(f"tuned settings: {path}")
        if result.report is not None:
            print(report.console_summary(result.tables))
            print(f"report: {result.report}")

    try:
        run_command(parser, argv, run)
    except KeyboardInterrupt:
        # Every finished run is already in the cache (written when it ends): say so, without a traceback.
        print(
            "\ninterrupted: the runs that finished are cached; run the same command again to continue from them",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


__all__ = ["EvaluationResult", "Plan", "build_parser", "evaluate", "main", "plan_evaluation"]
