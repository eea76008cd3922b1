"""``CoordCheck``: per-layer coordinate statistics of the pre-activations during any Lightning fit.

The μP "coordinate check" (Yang et al., 2022; μLO §4.1.1) asks whether the size of each layer's
pre-activations stays independent of width as training proceeds. This callback records, at a few
chosen optimizer steps, statistics of every selected module's output on one fixed probe batch:

* ``delta_std``: the standard deviation over all coordinates of ``h_t - h_0``, the change of the
  module's output since initialization (μLO's statistic, Fig. 3 and appendix F);
* ``abs_mean``: the mean of ``|h_t|`` (mup's ``l1``);
* ``std`` and ``rms`` of ``h_t`` for completeness.

Usage::

    import lightning as L
    from lightning_lopt.callbacks import CoordCheck

    cc = CoordCheck(steps=(0, 1, 2, 5, 10))
    L.Trainer(max_steps=10, callbacks=[cc]).fit(module, datamodule)
    cc.records      # [{"step": 0, "layer": "model.fc1", "stat": "delta_std", "value": 0.0}, ...]
    # log dir: coord_check.csv (step, layer, stat, value) and coord_check.png

Step semantics: step ``s`` is the model after ``s`` optimizer updates, so step 0 is the
initialization. A step is recorded in ``on_train_batch_start`` when ``trainer.global_step == s`` (the
first micro-batch under gradient accumulation), and in ``on_train_end`` when training stopped exactly
at ``s``. The probe forward runs with hooks attached only at those steps, in eval mode, under
``torch.no_grad`` and with the RNG state forked, then the modules' train/eval flags are restored, so
training itself is bit-for-bit unchanged.

Which modules: by default every ``nn.Linear`` (including subclasses such as ``mup.MuReadout``),
convolution and ``nn.Embedding``; their outputs are the pre-activations. ``modules`` may instead be
shell-style glob patterns (:mod:`fnmatch`, not regular expressions) matched against the qualified
names of ``pl_module.named_modules()``, e.g. ``"model.blocks.*.attn.*"``, or a predicate
``(name, module) -> bool``. A module called several times per forward reports its last call (mup's
convention); a module whose forward hook never fires (e.g. ``nn.MultiheadAttention.out_proj``, which
its parent uses through ``F.linear``) is dropped with a warning.

Which input: the probe forward calls ``pl_module(x)``, with ``x`` taken from the batch as follows: a
tensor is used as is; for a tuple or list, ``x = batch[0]``; for a dict, ``batch["x"]`` when present,
else its first value. Pass ``forward_fn(pl_module, batch)`` for anything else.

State: ``state_dict`` holds the records, the step-0 reference outputs and the probe batch, so a fit
resumed from a checkpoint continues the same check. Use one instance per training run: records
accumulate across ``fit`` calls and a step already recorded is not recorded again.

Distributed: every rank runs the probe (so sharded strategies whose forward needs all ranks keep
working), but only global rank 0 logs metrics and writes files. ``records`` on rank 0 are the ones
written.
"""

from __future__ import annotations

import csv
import fnmatch
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

__all__ = [
    "STATS",
    "CoordCheck",
    "default_module_filter",
    "probe_input",
    "resolve_module_filter",
    "write_records_csv",
]

StatFn = Callable[[Tensor, "Tensor | None"], Tensor]
ModuleFilter = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
ForwardFn = Callable[[L.LightningModule, Any], Any]

# Population statistics (correction=0): the coordinates of one output are the whole population.
STATS: dict[str, StatFn] = {
    "delta_std": lambda h, h0: (h - h0).std(correction=0),
    "abs_mean": lambda h, h0: h.abs().mean(),
    "std": lambda h, h0: h.std(correction=0),
    "rms": lambda h, h0: h.pow(2).mean().sqrt(),
}
# Statistics of the change since step 0, which need the step-0 outputs kept as a reference.
_DELTA_STATS = frozenset({"delta_std"})

_LINEAR_LIKE = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding)


def default_module_filter(name: str, module: nn.Module) -> bool:
    """Select Linear-like modules: ``nn.Linear`` and its subclasses, ``nn.Bilinear``, convolutions and
    ``nn.Embedding`` (an LM's input layer), i.e. the modules whose outputs are pre-activations."""
    return isinstance(module, _LINEAR_LIKE)


def resolve_module_filter(modules: ModuleFilter) -> Callable[[str, nn.Module], bool]:
    """The predicate ``(name, module) -> bool`` for a ``modules`` argument of :class:`CoordCheck`."""
    if modules is None:
        return default_module_filter
    if isinstance(modules, str):
        modules = [modules]
    if callable(modules):
        return modules
    patterns = list(modules)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"modules: expected None, a glob pattern, a list of patterns or a predicate, got {modules!r}")
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def probe_input(batch: Any) -> Any:
    """The model input inside a batch: the tensor itself, ``batch[0]`` of a tuple or list, and
    ``batch["x"]`` (else the first value) of a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping) and batch:
        return batch["x"] if "x" in batch else next(iter(batch.values()))
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}; pass forward_fn")


def _default_forward(pl_module: L.LightningModule, batch: Any) -> Any:
    return pl_module(probe_input(batch))


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return None


def _detached_copy(batch: Any) -> Any:
    """A copy of the batch that later in-place edits by the training step cannot change."""
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


class CoordCheck(L.Callback):
    """Record per-layer coordinate statistics of the pre-activations at chosen optimizer steps.

    Args:
        steps: optimizer steps to record (0 = initialization). Steps beyond the end of the fit are
            ignored.
        modules: which modules to watch: ``None`` for Linear-like modules (see
            :func:`default_module_filter`), glob pattern(s) over qualified module names
            (:func:`fnmatch.fnmatchcase`), or a predicate ``(name, module) -> bool``.
        probe_batch: the batch to probe, in the training batch's format; default: the first
            training batch. A batch the model cannot take raises ``ValueError`` at fit start.
        stats: names from :data:`STATS`: ``delta_std``, ``abs_mean``, ``std``, ``rms``.
        forward_fn: ``forward_fn(pl_module, batch)`` runs the probe forward; default
            ``pl_module(probe_input(batch))``.
        dirpath: where the CSV and PNG go; default ``trainer.log_dir`` (which falls back to
            ``default_root_dir`` without a logger).
        filename: stem of the written files (``<filename>.csv``, ``<filename>.png``).
        save: write the files at the end of the fit; ``False`` keeps the records in memory only
            (they still go to the loggers).
        plot: with ``save``, also write the PNG (and a TensorBoard figure when a TensorBoardLogger
            is attached).

    Attributes:
        records: list of ``{"step", "layer", "stat", "value"}`` dicts in recording order.
        layers: qualified names of the watched modules, in ``named_modules()`` order.
    """

    def __init__(
        self,
        steps: Iterable[int] = (0, 1, 2, 5, 10, 50, 100, 500),
        modules: ModuleFilter = None,
        probe_batch: Any = None,
        stats: Sequence[str] = ("delta_std", "abs_mean"),
        forward_fn: ForwardFn | None = None,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "coord_check",
        save: bool = True,
        plot: bool = True,
    ) -> None:
        self.steps = tuple(sorted({int(s) for s in steps}))
        if not self.steps or self.steps[0] < 0:
            raise ValueError(f"steps: expected non-negative optimizer steps, got {steps!r}")
        unknown = [s for s in stats if s not in STATS]
        if unknown or not stats:
            raise ValueError(f"stats: unknown {unknown or 'empty list'}; known: {sorted(STATS)}")
        self.stats = tuple(stats)
        self._filter = resolve_module_filter(modules)
        self._modules_arg = modules
        self.probe_batch = probe_batch
        self.forward_fn: ForwardFn = forward_fn or _default_forward
        self.dirpath = dirpath
        self.filename = filename
        self.save = save
        self.plot = plot
        self.records: list[dict[str, Any]] = []
        self.layers: list[str] = []
        self._recorded: set[int] = set()
        self._reference: dict[str, Tensor] | None = None
        self._device_probe: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(steps=self.steps, stats=self.stats, filename=self.filename)

    # -- Lightning hooks ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.layers = [n for n, m in pl_module.named_modules() if n and self._filter(n, m)]
        if not self.layers:
            raise ValueError(f"modules: {self._modules_arg!r} selects no module of {type(pl_module).__name__}")
        if self.probe_batch is not None:
            # Fail before the first training step rather than at the first recorded step.
            self._device_probe = self._to_device(trainer, pl_module, self.probe_batch)
            try:
                self._forward(trainer, pl_module, self._device_probe)
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                raise ValueError(
                    f"probe_batch: the model cannot take the given probe batch ({_describe(self.probe_batch)}): {err}"
                ) from err

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.probe_batch is None:
            # The first training batch is already on the device and converted by the precision plugin.
            self.probe_batch = _detached_copy(batch)
            self._device_probe = self.probe_batch
        step = trainer.global_step
        wants_reference = self._reference is None and bool(_DELTA_STATS & set(self.stats))
        if step in self._recorded or not (step in self.steps or wants_reference):
            return
        self._record(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self._recorded and self.probe_batch is not None:
            self._record(trainer, pl_module, step)
        if not self.save:
            return
        # trainer.log_dir broadcasts, so every rank must ask for it before rank 0 writes.
        out_dir = Path(self.dirpath if self.dirpath is not None else (trainer.log_dir or trainer.default_root_dir))
        if trainer.is_global_zero and self.records:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_records_csv(self.records, out_dir / f"{self.filename}.csv")
            if self.plot:
                from lightning_lopt.coord_check.plots import plot_records  # matplotlib only when plotting

                fig = plot_records(self.records, out_dir / f"{self.filename}.png", stats=self.stats)
                for logger in trainer.loggers:
                    if isinstance(logger, TensorBoardLogger):
                        logger.experiment.add_figure("coord_check", fig, global_step=step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "records": [dict(r) for r in self.records],
            "recorded": sorted(self._recorded),
            "reference": None if self._reference is None else dict(self._reference),
            "probe_batch": move_data_to_device(self.probe_batch, "cpu"),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state_dict["records"]]
        self._recorded = set(state_dict["recorded"])
        self._reference = state_dict["reference"]
        # Resuming keeps probing the batch the first part of the run probed.
        self.probe_batch = state_dict["probe_batch"]
        self._device_probe = None

    # -- internals ---------------------------------------------------------------------------------

    def _to_device(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> Any:
        return trainer.precision_plugin.convert_input(move_data_to_device(batch, pl_module.device))

    def _forward(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """Run the probe forward without touching training: eval mode, no autograd, forked RNG."""
        was_training = {m: m.training for m in pl_module.modules()}
        device = pl_module.device
        rng_devices = [device] if device.type == "cuda" else []
        try:
            pl_module.eval()
            with (
                torch.random.fork_rng(devices=rng_devices),
                torch.no_grad(),
                trainer.precision_plugin.forward_context(),
            ):
                self.forward_fn(pl_module, batch)
        finally:
            for m, flag in was_training.items():
                m.training = flag

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if self._device_probe is None:
            self._device_probe = self._to_device(trainer, pl_module, self.probe_batch)
        outputs: dict[str, Tensor] = {}
        named = dict(pl_module.named_modules())

        def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                out = _first_tensor(output)
                if out is not None:
                    # Last call wins for modules used several times per forward (mup's convention).
                    # A copy, because an in-place activation (ReLU(inplace=True)) edits the output next.
                    outputs[name] = out.detach().to("cpu", torch.float32, copy=True)

            return hook

        handles = [named[n].register_forward_hook(hook_for(n)) for n in self.layers]
        try:
            self._forward(trainer, pl_module, self._device_probe)
        finally:
            for h in handles:
                h.remove()

        silent = [n for n in self.layers if n not in outputs]
        if silent:
            rank_zero_warn(f"CoordCheck: no output from {silent} in the probe forward; they are not recorded.")
            self.layers = [n for n in self.layers if n in outputs]
        if self._reference is None and _DELTA_STATS & set(self.stats):
            if step != 0:
                rank_zero_warn(f"CoordCheck: the delta statistics are relative to step {step}, not to initialization.")
            self._reference = dict(outputs)
        self._recorded.add(step)
        if step not in self.steps:
            return

        metrics: dict[str, float] = {}
        for layer in self.layers:
            h = outputs[layer]
            h0 = None if self._reference is None else self._reference.get(layer)
            for stat in self.stats:
                if stat in _DELTA_STATS and (h0 is None or h0.shape != h.shape):
                    continue
                value = float(STATS[stat](h, h0))
                self.records.append({"step": step, "layer": layer, "stat": stat, "value": value})
                metrics[f"coord/{stat}/{layer}"] = value
        if trainer.is_global_zero:
            # Direct logger calls write exactly these rows; self.log would re-emit stale values on the
            # steps in between (docs/reference/design.md#hooks-for-statistics-and-logging).
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def write_records_csv(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write ``records`` (dicts with at least step, layer, stat, value) as a CSV with a header."""
    fields = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
