"""The μP coordinate-check width sweep behind ``python train.py coord-check`` (:mod:`.cli`).

For every width, optimizer, parametrization and seed, one short ``lightning.Trainer`` fit on CPU
with :class:`~lightning_lopt.coord_check.CoordCheck` records per-layer pre-activation statistics on a
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
        --optimizers adamw@sp,muadam@mup --steps 0,1,2,5,10 --seeds 2 --out outputs/coord_check

``--optimizers`` takes the grammar of every command (:mod:`.runs`): registry names
(``lightning_lopt.optim.available()``), ``name:weights``, import paths; ``@mup`` or ``@sp`` pins the
parametrization of that entry, unpinned entries run under every ``--param``.
The sweep builds its models with :func:`lightning_lopt.models.build` and shares the evaluation's
data sources (:mod:`~lightning_lopt.eval.data`), progress bar (:mod:`~lightning_lopt.eval.runner`)
and slope fit (:mod:`~lightning_lopt.eval.metrics`); its numbers are in :mod:`.summary`, its figures
in :mod:`.plots`. Its fits are Lightning fits, because the sweep is what the
:class:`~lightning_lopt.coord_check.CoordCheck` callback looks like in use.

Python::

    from lightning_lopt.coord_check import run_coord_sweep
    result = run_coord_sweep("mlp", widths=(64, 256, 1024), optimizers=("muadam@mup", "adamw@sp"))
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
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_lopt import models, optim
from lightning_lopt.coord_check.callback import STATS, CoordCheck, ModuleFilter, resolve_module_filter, write_records_csv
from lightning_lopt.coord_check.plots import file_safe, plot_coord_sweep
from lightning_lopt.coord_check.runs import SweepOptimizer, optimizer_key, parse_runs
from lightning_lopt.coord_check.summary import summarize
from lightning_lopt.eval.arguments import int_list, resolve_seeds
from lightning_lopt.eval.data import SOURCES, load_source
from lightning_lopt.eval.runner import progress_bar
from lightning_lopt.optimizee import OptimizeeModule

__all__ = ["CoordSweepResult", "run_coord_sweep"]

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
    def build(width: int, param: str) -> nn.Module:
        return models.build(model, width, depth, param, data=source, heads=heads)

    # One small model on the meta device (no memory): data the model cannot be sized by fails here,
    # as a --data error, before the per-width checks.
    try:
        with torch.device("meta"):
            build(heads, "sp")
    except ValueError as err:
        raise ValueError(f"--data: {err}") from err
    return build


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
        optimizers: ``--optimizers`` entries (:mod:`.runs`): registry names, ``name:weights`` or
            import paths, optionally pinned to a parametrization (``"adamw@sp"``).
        param: ``mup``, ``sp`` or ``both``: parametrizations for the unpinned optimizers.
        steps: optimizer steps to record; the fits run ``max(steps)`` steps.
        seeds: N for seeds ``0..N-1``, or a list of seeds; each fixes the model init, the data
            order and the probe batch.
        lr: learning rate for every optimizer; default :data:`DEFAULT_LR` per optimizer (learned
            optimizers get none and use their own defaults).
        optimizer_kwargs: extra keyword arguments per optimizer entry (without its ``@`` pin),
            passed to ``lightning_lopt.optim.build``, e.g. ``{"mulo": {"beta": 0.9}}``. They
            override ``lr``. Pretrained learned-optimizer weights are ``mulo:runs/my-mulo`` in
            ``optimizers`` (without them MuLO/LO start from a random meta-initialisation).
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
    runs, sweep_optimizers = parse_runs(optimizers, param)
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

    extra = {optimizer_key(name): dict(kw) for name, kw in (optimizer_kwargs or {}).items()}
    unused = sorted(set(extra) - {name for name, _ in runs})
    if unused:
        raise ValueError(f"--optimizer-kwargs: {unused} are not among --optimizers {[n for n, _ in runs]}")
    opt_kwargs: dict[str, dict[str, Any]] = {}
    for name, _ in runs:
        default_lr = lr if lr is not None else DEFAULT_LR.get(sweep_optimizers[name].optimizer)
        lr_kwargs = {} if default_lr is None else {"lr": default_lr}
        opt_kwargs[name] = {**lr_kwargs, **sweep_optimizers[name].kwargs, **extra.get(name, {})}

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
    _check_optimizers(build, widths[0], runs, sweep_optimizers, opt_kwargs, objective, num_classes, max(max(steps), 1))

    out_dir = Path(out) if out is not None else None
    records: list[dict[str, Any]] = []
    fits = [(opt_name, p, seed, width) for opt_name, p in runs for seed in seeds for width in widths]
    with _quiet_lightning(), progress_bar(progress) as bar:
        overall = bar.add_task("coord-check fits", total=len(fits), status="")
        for opt_name, p, seed, width in fits:
            run = f"{model}_{file_safe(opt_name)}_{p}_w{width}_s{seed}"
            bar.update(overall, status=f"{opt_name} ({p}) · width {width} · seed {seed}")
            torch.manual_seed(seed)
            module = OptimizeeModule(
                build(width, p), objective, optimizer=sweep_optimizers[opt_name].optimizer,
                optimizer_kwargs=opt_kwargs[opt_name], num_classes=num_classes,
            )  # fmt: skip
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
    sweep_optimizers: Mapping[str, SweepOptimizer],
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
        factory = sweep_optimizers[name].optimizer
        if "num_steps" not in kwargs and optim.registry.accepts(optim.resolve(factory), "num_steps"):
            kwargs["num_steps"] = horizon
        module = OptimizeeModule(build(width, p), objective, optimizer=factory, optimizer_kwargs=kwargs, num_classes=num_classes)
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
