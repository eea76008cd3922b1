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

Command line (``python train.py coord-check --help``)::

    python train.py coord-check --model mlp --widths 64,128,256,512,1024 \\
        --optimizers adamw:sp,muadam:mup --steps 0,1,2,5,10 --seeds 0,1 --out outputs/coord_check

``--optimizers`` takes registry names (``lightning_lopt.optim.available()``); ``name:mup`` or
``name:sp`` pins the parametrization of that entry, plain names run under every ``--param``.

Python::

    from lightning_lopt.eval.coord_sweep import run_coord_sweep
    result = run_coord_sweep("mlp", widths=(64, 256, 1024), optimizers=("muadam:mup", "adamw:sp"))
    result.summary["slopes"]["muadam"]["mup"]["hidden_layers.0"]["delta_std"]["mean"]   # ~0

Outputs under ``out``: ``records.csv`` (model, optimizer, param, width, seed, step, layer, stat,
value), ``summary.json``, ``<model>_<optimizer>_<param>_<stat>_vs_width.png`` and ``..._vs_step.png``,
and each fit's Lightning CSV log under ``logs/``.
"""

from __future__ import annotations

import argparse
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
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_lopt import optim
from lightning_lopt.callbacks import CoordCheck
from lightning_lopt.callbacks.coord_check import STATS, ModuleFilter, resolve_module_filter, write_records_csv
from lightning_lopt.datamodules import DATAMODULES, get_datamodule
from lightning_lopt.models import MuMLP, MuTransformerLM, MuViT
from lightning_lopt.optimizee import OptimizeeModule

__all__ = ["CoordSweepResult", "SyntheticTokens", "build_parser", "main", "plot_sweep", "run_coord_sweep", "summarize"]

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


class SyntheticTokens:
    """Offline token data for the LM sweep: a fixed random bigram (Markov) chain.

    Each token has ``branching`` likely successors, so there is structure to learn and the loss
    moves within a few steps. It mimics a data module's ``sample`` (``[n, batch_size, seq_len]``
    int64 inputs, targets shifted by one token).

    Usage::

        data = SyntheticTokens(vocab_size=64, seq_len=32)
        x, y = data.sample(batch_size=8, n=2, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, vocab_size: int = 64, seq_len: int = 32, branching: int = 4, seed: int = 1234) -> None:
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.input_shape = (seq_len,)
        g = torch.Generator().manual_seed(seed)
        logits = torch.full((vocab_size, vocab_size), -4.0)
        successors = torch.stack([torch.randperm(vocab_size, generator=g)[:branching] for _ in range(vocab_size)])
        logits.scatter_(1, successors, 0.0)
        self.transition = logits.softmax(-1)

    def sample(self, batch_size: int, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rows = n * batch_size
        tokens = [torch.randint(0, self.vocab_size, (rows,), generator=generator)]
        for _ in range(self.seq_len):
            tokens.append(torch.multinomial(self.transition[tokens[-1]], 1, generator=generator).squeeze(1))
        seq = torch.stack(tokens, dim=1).view(n, batch_size, self.seq_len + 1)
        return seq[..., :-1].contiguous(), seq[..., 1:].contiguous()


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


def _check_positive_ints(flag: str, values: Sequence[int], allow_zero: bool = False) -> list[int]:
    values = list(values)
    if not values:
        raise ValueError(f"{flag}: empty list")
    low = 0 if allow_zero else 1
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < low]
    if bad:
        raise ValueError(f"{flag}: expected integers >= {low}, got {bad}")
    return values


def _data_source(model: str, data: Any, seq_len: int) -> Any:
    """The data module (or synthetic source) named by ``--data``, or ``data`` itself when it is an
    object with ``sample`` (a data module of the user's)."""
    if data is not None and not isinstance(data, str):
        if not callable(getattr(data, "sample", None)):
            raise ValueError(f"--data: {type(data).__name__} has no sample(batch_size, n, generator) method")
        return data
    name = data or DEFAULT_DATA[model]
    if name == "synthetic":
        if model != "lm":
            raise ValueError("--data: 'synthetic' token data is for --model lm; use an image data set for mlp/vit")
        return SyntheticTokens(seq_len=seq_len)
    if name not in DATAMODULES:
        raise ValueError(f"--data: unknown data {name!r}; known: synthetic, {', '.join(DATAMODULES)}")
    if (model == "lm") != (name == "text"):
        raise ValueError(f"--data: {name!r} does not suit --model {model}: lm takes text or synthetic, mlp/vit images")
    return get_datamodule(name, seq_len=seq_len) if name == "text" else get_datamodule(name)


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
    seeds: Sequence[int] = (0, 1),
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
        seeds: each seed fixes the model init, the data order and the probe batch.
        lr: learning rate for every optimizer; default :data:`DEFAULT_LR` per optimizer (learned
            optimizers get none and use their own defaults).
        optimizer_kwargs: extra keyword arguments per optimizer name, passed to
            ``lightning_lopt.optim.build``, e.g. ``{"mulo": {"meta_weights": "mulo-m"}}`` for
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
    """
    if model not in MODELS:
        raise ValueError(f"--model: unknown model {model!r}; known models: {', '.join(MODELS)}")
    widths = sorted(set(_check_positive_ints("--widths", widths)))
    runs = _parse_runs(optimizers, param)
    steps = sorted(set(_check_positive_ints("--steps", steps, allow_zero=True)))
    if steps[-1] == 0:
        raise ValueError("--steps: needs a step after 0, the fits run max(steps) optimizer steps")
    seeds = _check_positive_ints("--seeds", seeds, allow_zero=True)
    batch_size = _check_positive_ints("--batch-size", [batch_size])[0]
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--lr: expected a positive number, got {lr!r}")
    unknown = [s for s in stats if s not in STATS]
    if unknown or not stats:
        raise ValueError(f"--stats: unknown {unknown or 'empty list'}; known: {', '.join(STATS)}")
    depth = DEPTH[model] if depth is None else _check_positive_ints("--depth", [depth])[0]
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
    with _quiet_lightning():
        for opt_name, p in runs:
            for seed in seeds:
                for width in widths:
                    torch.manual_seed(seed)
                    run = f"{model}_{opt_name}_{p}_w{width}_s{seed}"
                    module = OptimizeeModule(
                        build(width, p), objective, optimizer=opt_name, optimizer_kwargs=opt_kwargs[opt_name], num_classes=num_classes
                    )
                    cc = _fit_one(module, streams[seed], steps, stats, module_filter, out_dir, run)
                    meta = {"model": model, "optimizer": opt_name, "param": p, "width": width, "seed": seed}
                    records.extend({**meta, **r, "layer": r["layer"].removeprefix("model.")} for r in cc.records)

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
            result.figures = plot_sweep(records, out_dir, stats)
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


def _slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width); NaN when a value is not positive."""
    if len(widths) < 2 or any(not (v > 0 and math.isfinite(v)) for v in values):
        return math.nan
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


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
        return {seed: _slope(sorted(bw), [bw[w] for w in sorted(bw)]) for seed, bw in sorted(by_seed.items())}

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


def _grid(fig: Any, n: int, ncols: int = 4) -> list[Any]:
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return list(axes[:n])


def _save_png(fig: Any, path: Path) -> None:
    """Save as a 256-colour palette PNG: a third of the RGBA size, so the plots can be committed."""
    from PIL import Image

    fig.savefig(path, dpi=80)
    with Image.open(path) as im:
        palette = im.convert("RGB").quantize(colors=256)
    palette.save(path, optimize=True)


def plot_sweep(records: Sequence[dict[str, Any]], out_dir: Path, stats: Sequence[str]) -> list[Path]:
    """Draw both plot styles for every (optimizer, param, stat); returns the PNG paths.

    Lines are seed means; the shaded band spans the seeds' min and max. Non-positive values
    (``delta_std`` at step 0) are left out of the log axes.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
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
                n = len(layers)
                ncols, nrows = min(4, n), math.ceil(n / 4)
                # A fixed layout: constrained layout redraws every tick label several times and
                # dominated the run time with a dozen log-log panels.
                width_in, height_in = 2.9 * ncols + 0.9, 2.3 * nrows + 0.8
                fig = Figure(figsize=(width_in, height_in))
                # Margins in inches: the legend sits in the right one, the title in the top one.
                fig.subplots_adjust(
                    left=0.75 / width_in, right=1 - 0.9 / width_in, bottom=0.45 / height_in,
                    top=1 - 0.75 / height_in, wspace=0.4, hspace=0.5,
                )
                FigureCanvasAgg(fig)
                colors = colormaps[cmap](np.linspace(0.0, 0.85, len(lines)))
                for ax, layer in zip(_grid(fig, n), layers):
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
                path = out_dir / f"{model}_{opt_name}_{p}_{stat}_{style}.png"
                _save_png(fig, path)
                paths.append(path)
    return paths


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"invalid JSON: {err}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError('expected {"optimizer": {"argument": value, ...}, ...}')
    return value


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The ``coord-check`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="train.py coord-check",
        description="μP coordinate check: sweep widths, record per-layer pre-activation statistics, plot them "
        "and write the log-log slopes against width to summary.json.",
    )
    parser.add_argument("--model", default="mlp", help=f"one of {', '.join(MODELS)} (default mlp)")
    parser.add_argument("--widths", type=_int_list, default=[64, 128, 256, 512, 1024], help="comma-separated widths")
    parser.add_argument(
        "--optimizers",
        type=_str_list,
        default=["adamw", "muadam"],
        help="comma-separated registry names; NAME:mup or NAME:sp pins the parametrization (default adamw,muadam)",
    )
    parser.add_argument("--param", default="both", help="mup, sp or both (default): for optimizers without :PARAM")
    parser.add_argument("--steps", type=_int_list, default=[0, 1, 2, 5, 10], help="optimizer steps to record")
    parser.add_argument("--seeds", type=_int_list, default=[0, 1], help="comma-separated seeds")
    parser.add_argument(
        "--lr", type=float, default=None, help=f"learning rate for all optimizers (default per optimizer: {DEFAULT_LR})"
    )
    parser.add_argument(
        "--optimizer-kwargs",
        type=_json_object,
        default=None,
        help='JSON object of keyword arguments per optimizer, e.g. \'{"mulo": {"meta_weights": "mulo-m"}}\'',
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--data", default=None, help="digits (default for mlp/vit), mnist, fashion_mnist, text, synthetic (default for lm)"
    )
    parser.add_argument("--depth", type=int, default=None, help=f"model depth (default {DEPTH})")
    parser.add_argument("--heads", type=int, default=HEADS, help="attention heads for vit and lm")
    parser.add_argument(
        "--stats", type=_str_list, default=["delta_std", "abs_mean"], help=f"statistics among {', '.join(STATS)}"
    )
    parser.add_argument(
        "--modules", type=_str_list, default=None, help="glob patterns over model layer names (default: Linear-like layers)"
    )
    parser.add_argument("--out", default="outputs/coord_check", help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python train.py coord-check ARGS``: run the sweep and print the slopes at the last step."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run_coord_sweep(
            model=args.model,
            widths=args.widths,
            optimizers=args.optimizers,
            param=args.param,
            steps=args.steps,
            seeds=args.seeds,
            lr=args.lr,
            optimizer_kwargs=args.optimizer_kwargs,
            batch_size=args.batch_size,
            data=args.data,
            out=args.out,
            depth=args.depth,
            heads=args.heads,
            stats=args.stats,
            modules=args.modules,
            plot=not args.no_plot,
        )
    except ValueError as err:
        parser.error(str(err))
    print(format_summary(result.summary))
    print(f"wrote {result.out / 'summary.json'}, records.csv and {len(result.figures)} plots to {result.out}")


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
