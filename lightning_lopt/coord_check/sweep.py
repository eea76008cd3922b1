"""The μP coordinate-check width sweep: ``python train.py coord-check``.

For every width, optimizer, parametrization and seed, one short ``lightning.Trainer`` fit on CPU
with :class:`~lightning_lopt.callbacks.CoordCheck` records per-layer pre-activation statistics on a
fixed probe batch. All widths of one seed see the same batches in the same order and the same probe
batch, so the only thing that changes along the width axis is the width. The sweep then draws

* mup-style plots: statistic vs width (log-log), one line per step, one panel per layer;
* μLO-style plots (μLO Fig. 3 and appendix F): statistic vs step, one line per width;

and writes ``summary.json``: for each optimizer, parametrization, layer and statistic, the slope of
``log(statistic)`` against ``log(width)`` at the last step, per seed and its mean and std over seeds.
Under μP the slope is near 0 (coordinates do not grow with width); standard parametrization with
Adam blows up, which shows as a positive slope (about 1 for hidden layers: ``ΔW x`` sums ``width``
coordinates of size ``lr``).

Command line (``python train.py coord-check --help``; the conventions of
:mod:`lightning_lopt.eval.arguments`: ``--config`` YAML, ``--seeds 2`` for two seeds, ``--seeds 0,3``
for those seeds)::

    python train.py coord-check --model mlp --widths 64,128,256,512,1024 \\
        --optimizers adamw:sp,muadam:mup --steps 0,1,2,5,10 --seeds 2 --out outputs/coord_check

``--optimizers`` takes registry names (``lightning_lopt.optim.available()``); ``name:mup`` or
``name:sp`` pins the parametrization of that entry, plain names run under every ``--param``.
The sweep shares the evaluation's data sources (:mod:`~lightning_lopt.eval.data`), progress bar
(:mod:`~lightning_lopt.eval.runner`), slope fit (:mod:`~lightning_lopt.eval.metrics`) and figure
helpers (:mod:`~lightning_lopt.eval.plots`); its fits are Lightning fits, because the sweep is what
the :class:`~lightning_lopt.callbacks.CoordCheck` callback looks like in use.

Python::

    from lightning_lopt.eval.coord_sweep import run_coord_sweep
    result = run_coord_sweep("mlp", widths=(64, 256, 1024), optimizers=("muadam:mup", "adamw:sp"))
    result.summary["slopes"]["muadam"]["mup"]["hidden_layers.0"]["delta_std"]["mean"]   # ~0

Outputs under ``out``: ``records.csv`` (model, optimizer, param, width, seed, step, layer, stat,
value), ``summary.json``, ``<model>_<optimizer>_<param>_<stat>_vs_width.png`` and ``..._vs_step.png``,
and each fit's Lightning CSV log under ``logs/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse import ActionYesNo
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_lopt import optim
from lightning_lopt.callbacks import CoordCheck
from lightning_lopt.callbacks.coord_check import STATS, ModuleFilter, resolve_module_filter, write_records_csv
from lightning_lopt.eval.arguments import UsageError, int_list, new_parser, resolve_seeds, run_command, str_list
from lightning_lopt.eval.data import SOURCES, load_source
from lightning_lopt.eval.metrics import loglog_slope
from lightning_lopt.eval.plots import plot_coord_sweep
from lightning_lopt.eval.runner import progress_bar
from lightning_lopt.models import MuMLP, MuTransformerLM, MuViT
from lightning_lopt.optimizee import OptimizeeModule

__all__ = ["CoordSweepResult", "build_parser", "main", "run_coord_sweep", "summarize"]

MODELS = ("mlp", "vit", "lm")
PARAMS = ("mup", "sp")
# Learning rates when --lr is not given, per optimizer: large enough that an SP blow-up shows within
# a few steps (mup's README). AdamW at 1e-2 goes further and saturates the SP MLP (dead ReLUs) within
# 5 steps, after which the slope against width turns negative; 1e-3 keeps the blow-up visible up to
# step 20. μAdam scales hidden matrices by 1/fan_in (base width 1), hence its 10x larger base lr.
DEFAULT_LR = {"adamw": 1e-3, "muadam": 1e-2, "sgd": 0.1}
DEPTH = {"mlp": 3, "vit": 2, "lm": 2}
HEADS = 4
DEFAULT_DATA = {"mlp": "digits", "vit": "digits", "lm": "synthetic"}


class _Batches(Dataset):
    """Pre-drawn batches served in order: every width of a seed trains on the same data stream."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


@dataclass
class CoordSweepResult:
    """What :func:`run_coord_sweep` returns.

    Attributes:
        records: one dict per (optimizer, param, width, seed, step, layer, stat) with its ``value``.
        summary: the content of ``summary.json`` (see :func:`summarize`).
        out: the output folder, or ``None`` when nothing was written.
        figures: paths of the written PNGs.
    """

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path | None = None
    figures: list[Path] = field(default_factory=list)


def _parse_runs(optimizers: Sequence[str], param: str | Sequence[str]) -> list[tuple[str, str]]:
    """(optimizer, parametrization) pairs, validated against the registry before any training."""
    params = list(PARAMS) if param == "both" else [param] if isinstance(param, str) else list(param)
    bad = [p for p in params if p not in PARAMS]
    if bad or not params:
        raise ValueError(f"--param: expected mup, sp or both, got {param!r}")
    if not optimizers:
        raise ValueError(f"--optimizers: empty list; known optimizers: {', '.join(optim.available())}")
    runs: list[tuple[str, str]] = []
    for entry in optimizers:
        name, _, pinned = entry.partition(":")
        if name.lower() not in optim.available():
            known = ", ".join(optim.available())
            raise ValueError(f"--optimizers: unknown optimizer {name!r}; known optimizers: {known}")
        if pinned and pinned not in PARAMS:
            raise ValueError(f"--optimizers: {entry!r} pins parametrization {pinned!r}; expected name:mup or name:sp")
        try:
            optim.resolve(name)
        except ValueError as err:
            raise ValueError(f"--optimizers: {err}") from err
        for p in [pinned] if pinned else params:
            if (name.lower(), p) not in runs:
                runs.append((name.lower(), p))
    return runs


def _data_source(model: str, data: Any, seq_len: int) -> Any:
    """The data module (or synthetic source) named by ``--data``, or ``data`` itself when it is an
    object with ``sample`` (a data module of the user's)."""
    if data is not None and not isinstance(data, str):
        if not callable(getattr(data, "sample", None)):
            raise ValueError(f"--data: {type(data).__name__} has no sample(batch_size, n, generator) method")
        return data
    name = data or DEFAULT_DATA[model]
    if name not in SOURCES:
        raise ValueError(f"--data: unknown data {name!r}; known: {', '.join(SOURCES)}")
    if (model == "lm") != (name in ("text", "synthetic")):
        raise ValueError(f"--data: {name!r} does not suit --model {model}: lm takes text or synthetic, mlp/vit images")
    return load_source(name, {"seq_len": seq_len} if model == "lm" else {})


def _model_factory(model: str, source: Any, depth: int, heads: int) -> Callable[[int, str], nn.Module]:
    """``build(width, param)`` for ``model``, sized by the data's ``input_shape`` and ``num_classes``
    (``vocab_size`` and ``seq_len`` for the LM)."""
    needs = ("vocab_size", "seq_len") if model == "lm" else ("input_shape", "num_classes")
    missing = [a for a in needs if not hasattr(source, a)]
    if missing:
        raise ValueError(f"--data: {type(source).__name__} lacks {missing}, which the {model} model is sized by")
    if model == "mlp":
        return lambda w, p: MuMLP(source.input_shape, w, depth, source.num_classes, param=p)
    if model == "vit":
        if len(source.input_shape) != 3:
            raise ValueError(f"--data: the ViT needs [C, H, W] images, the data gives {tuple(source.input_shape)}")
        channels, size = source.input_shape[0], source.input_shape[-1]
        # 16 patches whatever the image size: 8x8 digits get 2x2 patches.
        patch = max(1, size // 4)
        return lambda w, p: MuViT(size, patch, w, depth, heads, 4.0, source.num_classes, param=p, in_channels=channels)
    return lambda w, p: MuTransformerLM(source.vocab_size, source.seq_len, w, depth, heads, param=p)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners and hints for the many tiny fits, restoring the levels after."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*validation_step.*but have no.*val_dataloader.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_coord_sweep(
    model: str = "mlp",
    widths: Sequence[int] = (64, 128, 256, 512, 1024),
    optimizers: Sequence[str] = ("adamw", "muadam"),
    param: str | Sequence[str] = "both",
    steps: Sequence[int] = (0, 1, 2, 5, 10),
    seeds: int | str | Sequence[int] = 2,
    lr: float | None = None,
    optimizer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 64,
    data: Any = None,
    out: str | Path | None = "outputs/coord_check",
    depth: int | None = None,
    heads: int = HEADS,
    seq_len: int = 32,
    stats: Sequence[str] = ("delta_std", "abs_mean"),
    modules: ModuleFilter = None,
    plot: bool = True,
    progress: bool = False,
) -> CoordSweepResult:
    """Run the coordinate-check sweep and return (and, with ``out``, write) its records and summary.

    Every argument is checked before the first fit; a bad one raises ``ValueError`` naming the
    command-line flag (``--widths``, ``--optimizers``, ``--data``, ...).

    Args:
        model: ``mlp``, ``vit`` or ``lm`` (:mod:`lightning_lopt.models`).
        widths: hidden widths; for vit and lm each must be divisible by ``heads``.
        optimizers: registry names, optionally pinned to a parametrization (``"adamw:sp"``).
        param: ``mup``, ``sp`` or ``both``: parametrizations for the unpinned optimizers.
        steps: optimizer steps to record; the fits run ``max(steps)`` steps.
        seeds: N for seeds ``0..N-1``, or a list of seeds; each fixes the model init, the data
            order and the probe batch.
        lr: learning rate for every optimizer; default :data:`DEFAULT_LR` per optimizer (learned
            optimizers get none and use their own defaults).
        optimizer_kwargs: extra keyword arguments per optimizer name, passed to
            ``lightning_lopt.optim.build``, e.g. ``{"mulo": {"meta_weights": "runs/my-mulo"}}`` for
            pretrained learned-optimizer weights (without them MuLO/LO start from a random
            meta-initialisation). They override ``lr``.
        batch_size: training and probe batch size.
        data: data set name: ``digits`` (default for mlp/vit), ``mnist``, ``fashion_mnist``,
            ``text`` or ``synthetic`` (default for lm, a random bigram chain: no set-up); or a
            data module object with ``sample(batch_size, n, generator)``, ``input_shape`` and
            ``num_classes`` (``vocab_size`` and ``seq_len`` for lm).
        out: output folder; ``None`` writes nothing (no logs, CSV, JSON or PNGs).
        depth: model depth; default 3 for mlp, 2 for vit and lm.
        heads: attention heads for vit and lm.
        seq_len: LM sequence length.
        stats: CoordCheck statistics to record.
        modules: CoordCheck module filter, over names inside the model (``"hidden_layers.*"``).
        plot: draw the PNGs (with ``out``).
        progress: show a progress bar over the fits (the command line does).
    """
    if model not in MODELS:
        raise ValueError(f"--model: unknown model {model!r}; known models: {', '.join(MODELS)}")
    widths = sorted(set(int_list(widths, "--widths", minimum=1)))
    runs = _parse_runs(optimizers, param)
    steps = sorted(set(int_list(steps, "--steps")))
    if steps[-1] == 0:
        raise ValueError("--steps: needs a step after 0, the fits run max(steps) optimizer steps")
    seeds = resolve_seeds(seeds)
    batch_size = int_list(batch_size, "--batch-size", minimum=1)[0]
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--lr: expected a positive number, got {lr!r}")
    unknown = [s for s in stats if s not in STATS]
    if unknown or not stats:
        raise ValueError(f"--stats: unknown {unknown or 'empty list'}; known: {', '.join(STATS)}")
    depth = DEPTH[model] if depth is None else int_list(depth, "--depth", minimum=1)[0]
    if model in ("vit", "lm"):
        bad = [w for w in widths if w % heads]
        if bad:
            raise ValueError(f"--widths: the {model} model has {heads} heads; widths {bad} are not divisible by it")

    extra = {name.lower(): dict(kw) for name, kw in (optimizer_kwargs or {}).items()}
    unused = sorted(set(extra) - {name for name, _ in runs})
    if unused:
        raise ValueError(f"--optimizer-kwargs: {unused} are not among --optimizers {[n for n, _ in runs]}")
    opt_kwargs: dict[str, dict[str, Any]] = {}
    for name, _ in runs:
        default_lr = lr if lr is not None else DEFAULT_LR.get(name)
        opt_kwargs[name] = {**({} if default_lr is None else {"lr": default_lr}), **extra.get(name, {})}

    source = _data_source(model, data, seq_len)
    build = _model_factory(model, source, depth, heads)
    objective = "lm" if model == "lm" else "classification"
    num_classes = None if model == "lm" else source.num_classes
    # The CoordCheck filter sees OptimizeeModule names ("model.<name>"); users write model names.
    module_filter = _prefixed_filter(modules)
    try:
        streams = {seed: source.sample(batch_size, steps[-1], torch.Generator().manual_seed(seed)) for seed in seeds}
    except (OSError, RuntimeError, ValueError) as err:  # e.g. data not installed: the message says how to get it
        raise ValueError(f"--data: {err}") from err
    _preflight(build, widths, sorted({p for _, p in runs}), streams[seeds[0]], modules)
    _check_optimizers(build, widths[0], runs, opt_kwargs, objective, num_classes, max(max(steps), 1))

    out_dir = Path(out) if out is not None else None
    records: list[dict[str, Any]] = []
    fits = [(opt_name, p, seed, width) for opt_name, p in runs for seed in seeds for width in widths]
    with _quiet_lightning(), progress_bar(progress) as bar:
        overall = bar.add_task("coord-check fits", total=len(fits), status="")
        for opt_name, p, seed, width in fits:
            run = f"{model}_{opt_name}_{p}_w{width}_s{seed}"
            bar.update(overall, status=f"{opt_name} ({p}) · width {width} · seed {seed}")
            torch.manual_seed(seed)
            module = OptimizeeModule(
                build(width, p), objective, optimizer=opt_name, optimizer_kwargs=opt_kwargs[opt_name], num_classes=num_classes
            )
            cc = _fit_one(module, streams[seed], steps, stats, module_filter, out_dir, run)
            meta = {"model": model, "optimizer": opt_name, "param": p, "width": width, "seed": seed}
            records.extend({**meta, **r, "layer": r["layer"].removeprefix("model.")} for r in cc.records)
            bar.advance(overall)

    data_name = data if isinstance(data, str) else DEFAULT_DATA[model] if data is None else type(data).__name__
    # JSON-safe record of what each optimizer was built with (objects such as modules as their repr).
    settings = {name: {k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in kw.items()}
                for name, kw in opt_kwargs.items()}  # fmt: skip
    summary = summarize(
        records, model=model, widths=widths, steps=steps, seeds=seeds, optimizer_kwargs=settings, data=data_name
    )
    result = CoordSweepResult(records, summary, out_dir)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_records_csv(records, out_dir / "records.csv")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        if plot:
            result.figures = plot_coord_sweep(records, out_dir, stats)
    return result


def _prefixed_filter(modules: ModuleFilter) -> ModuleFilter:
    """Translate a filter over model names into one over OptimizeeModule names (``model.<name>``)."""
    if modules is None:
        return None
    if callable(modules):
        predicate = modules
        return lambda name, m: name.startswith("model.") and predicate(name.removeprefix("model."), m)
    patterns = [modules] if isinstance(modules, str) else list(modules)
    return [f"model.{p}" for p in patterns]


def _preflight(
    build: Callable[[int, str], nn.Module],
    widths: list[int],
    params: list[str],
    stream: tuple[Tensor, Tensor],
    modules: ModuleFilter,
) -> None:
    """Build every (width, param) model once and run it on the probe batch, so that a width the
    model cannot take, data it cannot read or a layer filter that selects nothing fails before the
    first fit rather than midway."""
    probe = stream[0][0]
    selects = resolve_module_filter(_prefixed_filter(modules))
    for width in widths:
        for p in params:
            try:
                net = build(width, p)
            except ValueError as err:
                raise ValueError(f"--widths: the model cannot take width {width}: {err}") from err
            if not any(selects(f"model.{name}", m) for name, m in net.named_modules() if name):
                raise ValueError(f"--modules: {modules!r} selects no layer of the model")
            try:
                with torch.no_grad():
                    net(probe)
            except (RuntimeError, ValueError, IndexError) as err:
                raise ValueError(
                    f"--data: the probe batch (shape {tuple(probe.shape)}) does not fit the model at width {width}: "
                    f"{err}"
                ) from err


def _check_optimizers(
    build: Callable[[int, str], nn.Module],
    width: int,
    runs: list[tuple[str, str]],
    opt_kwargs: dict[str, dict[str, Any]],
    objective: str,
    num_classes: int | None,
    horizon: int,
) -> None:
    """Build each optimizer once on the smallest model, exactly as the fits will, so that a bad
    keyword argument fails before the first fit. No trainer is attached yet, so optimizers with a
    learned schedule get the sweep's length as their horizon, as the fits will."""
    for name, p in runs:
        kwargs = dict(opt_kwargs[name])
        if "num_steps" not in kwargs and optim.registry.accepts(optim.resolve(name), "num_steps"):
            kwargs["num_steps"] = horizon
        module = OptimizeeModule(build(width, p), objective, optimizer=name, optimizer_kwargs=kwargs, num_classes=num_classes)
        try:
            module.configure_optimizers()
        except (TypeError, ValueError) as err:
            raise ValueError(f"--optimizer-kwargs: cannot build {name} with {opt_kwargs[name]}: {err}") from err


def _fit_one(
    module: L.LightningModule,
    stream: tuple[Tensor, Tensor],
    steps: list[int],
    stats: Sequence[str],
    modules: ModuleFilter,
    out_dir: Path | None,
    run: str,
) -> CoordCheck:
    """One short CPU fit of ``module`` on the pre-drawn ``stream``, probed on its first batch."""
    x, y = stream
    # Per-fit CSVs go beside each fit's Lightning log; without an output folder nothing is written.
    cc = CoordCheck(
        steps, modules=modules, probe_batch=(x[0], y[0]), stats=stats, save=out_dir is not None, plot=False
    )
    trainer = L.Trainer(
        max_steps=steps[-1],
        accelerator="cpu",
        devices=1,
        callbacks=[cc],
        logger=CSVLogger(out_dir, name="logs", version=run) if out_dir is not None else False,
        default_root_dir=out_dir,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(_Batches(x, y), batch_size=None, shuffle=False))
    return cc


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
        help="comma-separated registry names; NAME:mup or NAME:sp pins the parametrization",
    )  # fmt: skip
    parser.add_argument("--param", type=str, default="both", help="mup, sp or both: for optimizers without :PARAM")
    parser.add_argument("--steps", type=str | list[int], default="0,1,2,5,10", help="optimizer steps to record")
    parser.add_argument("--seeds", type=int | list[int] | str, default=2, help="N for seeds 0..N-1, or a list: 0,3,7")
    parser.add_argument(
        "--lr", type=float | None, default=None, help=f"learning rate for all optimizers (default per optimizer: {DEFAULT_LR})"
    )
    parser.add_argument(
        "--optimizer-kwargs", type=str | dict | None, default=None,
        help='keyword arguments per optimizer, e.g. \'{"mulo": {"meta_weights": "runs/my-mulo"}}\'',
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


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the slopes: one row per optimizer, param and layer."""
    stats = sorted({s for o in summary["slopes"].values() for p in o.values() for lay in p.values() for s in lay})
    head = f"log-log slope vs width at step {summary['last_step']} (mean ± std over seeds)"
    lines = [head, f"{'optimizer':<10} {'param':<5} {'layer':<28} " + " ".join(f"{s:>16}" for s in stats)]
    for opt_name, by_param in summary["slopes"].items():
        for p, by_layer in by_param.items():
            for layer, by_stat in by_layer.items():
                cells = []
                for s in stats:
                    e = by_stat.get(s)
                    cells.append(
                        f"{'n/a':>16}" if e is None or e["mean"] is None else f"{e['mean']:>+9.2f} ± {e['std']:<4.2f}"
                    )
                lines.append(f"{opt_name:<10} {p:<5} {layer:<28} " + " ".join(cells))
    return "\n".join(lines)
