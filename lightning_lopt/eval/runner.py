"""The runner: train one (task, optimizer, setting, seed) and execute many, cached, resumable and
with a progress bar.

One run is a plain PyTorch loop over the task's model wrapped in an
:class:`~lightning_lopt.optimizee.OptimizeeModule`, with the optimizer built by
:func:`~lightning_lopt.eval.optimizers.make_optimizer` (the registry, the module's μP scales): a
Lightning fit would add tens of milliseconds per step of overhead that tiny tasks cannot hide. Each
step calls ``optimizer.step(closure)``, the ``torch.optim`` protocol every optimizer understands; the
closure returns the loss, which is how Celo and VeLO receive it.

* **Seeds** fix the initialisation (``torch.manual_seed(seed)`` around the model's construction) and
  the data order (a ``torch.Generator`` seeded with ``seed`` draws the batches, in blocks of
  :data:`BLOCK`): the same seed gives the same curve, every optimizer and width of a seed sees the
  same batches, and a longer run starts with the batches of a shorter one.
* **Divergence**: a non-finite training loss, or one above ``DIVERGE_FACTOR`` x the task's
  reference loss, ends the run; it is recorded with ``diverged_at`` and every remaining step at the
  cap (``CAP_FACTOR`` x the reference loss), never dropped.
* **Test metrics**: the loss (and accuracy) on the first ``eval_examples`` test items, before
  training and at :data:`EVALS` evenly spaced steps.
* **Threads**: CPU runs use one intra-op thread; parallelism, where wanted, comes from
  ``workers`` processes running whole runs.

Example::

    records = execute(specs, cache_dir="outputs/eval/runs")   # {spec.key: RunRecord}
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lightning_lopt import provenance
from lightning_lopt.eval import store
from lightning_lopt.eval.optimizers import (
    OptimizerSpec,
    Setting,
    default_identity,
    make_optimizer,
    make_schedule,
    weights_identity,
)
from lightning_lopt.eval.store import RunRecord
from lightning_lopt.eval.tasks import CAP_FACTOR, DIVERGE_FACTOR, Task, build_model, held_out_batch, num_classes, reference_loss
from lightning_lopt.optimizee import OptimizeeModule, objective_loss
from lightning_lopt.progress_lines import ProgressLines

#: Bumped whenever a change to the runner changes curves, so that old cache entries are not reused.
RUNNER_VERSION = 1
#: Batches are drawn in blocks of this many (part of what a seed means, so fixed).
BLOCK = 50
#: Test evaluations per run, evenly spaced, plus one before training.
EVALS = 10
#: Steps between divergence checks (and progress updates): one device sync each.
CHECK_EVERY = 25

StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class RunSpec:
    """One run: a task, an optimizer with its setting, and a seed."""

    task: Task
    optimizer: OptimizerSpec
    setting: Setting
    seed: int

    def identity(self) -> dict[str, Any]:
        """Everything that decides the run's curve (see :mod:`lightning_lopt.eval.store`)."""
        return {
            "runner_version": RUNNER_VERSION,
            "task": self.task.config(),
            "optimizer": {
                "factory": self.optimizer.factory,
                "param": self.optimizer.param,
                "meta_weights": weights_identity(self.optimizer),
                "setting": dict(self.setting.values),
                # only when set: the constant-rate runs keep their cache keys
                **({"schedule": self.optimizer.schedule} if self.optimizer.schedule else {}),
                # only for classes that name such arguments: the others keep their cache keys
                **({"defaults": defaults} if (defaults := default_identity(self.optimizer, self.setting.values)) else {}),
            },
            "seed": self.seed,
        }

    @property
    def key(self) -> str:
        return store.config_hash(self.identity())

    @property
    def description(self) -> str:
        return f"{self.task.id} · {self.optimizer.label} · seed {self.seed}"

    def directory(self, cache_dir: str | Path) -> Path:
        return store.run_dir(cache_dir, self.task.id, self.optimizer.label, self.seed, self.key)


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for CPU runs (restored after): tiny kernels lose to thread sync."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _score(module: OptimizeeModule, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean test loss and accuracy (NaN for the autoencoder) over ``x``, in chunks of ``batch_size``."""
    module.eval()
    total, correct, count = 0.0, 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        out = module(xb)
        n = xb.shape[0]
        total += float(objective_loss(module.objective, out, xb, yb)) * n
        if module.objective != "autoencoder":
            correct += float((out.argmax(-1) == yb).float().mean()) * n
        count += n
    module.train()
    acc = correct / count if module.objective != "autoencoder" else math.nan
    return total / count, acc


def train(spec: RunSpec, device: str | torch.device = "cpu", on_step: StepCallback | None = None) -> RunRecord:
    """Train one run from scratch and return its record (nothing is cached here).

    ``on_step(step, steps, loss)`` is called every :data:`CHECK_EVERY` steps with the latest loss.
    """
    device = torch.device(device)
    task, family = spec.task, spec.task.family
    source = family.source()
    if device.type != "cpu":
        source.to(device)  # once per process: batches are then gathered on the device
    start = time.perf_counter()
    with _single_thread(device), warnings.catch_warnings():
        # The report says which learned optimizers run random meta-weights; one warning per run
        # would bury everything else. Non-finite losses are recorded as divergence.
        warnings.filterwarnings("ignore", message=".*RANDOM meta-initialisation.*")
        warnings.filterwarnings("ignore", message=".*keeps the scheduler's loss statistics.*")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(spec.seed)
            model = build_model(task, spec.optimizer.param, source, **spec.setting.model_kwargs)
        module = OptimizeeModule(model, family.objective, num_classes=num_classes(task, source)).to(device)
        optimizer = make_optimizer(spec.optimizer, spec.setting, module, task.steps)
        schedule = make_schedule(spec.optimizer, optimizer, task.steps)
        reference = reference_loss(task, source)
        cap, limit = CAP_FACTOR * reference, DIVERGE_FACTOR * reference
        x_test, y_test = held_out_batch(task, source, device)
        every = max(1, task.steps // EVALS)
        eval_at = {0, task.steps, *range(every, task.steps + 1, every)}
        eval_steps, test_loss, test_acc = [0], [], []
        loss0, acc0 = _score(module, x_test, y_test, family.batch_size)
        test_loss.append(min(loss0, cap))
        test_acc.append(acc0)

        generator = torch.Generator().manual_seed(spec.seed)
        losses = torch.full((task.steps,), math.nan, device=device)
        diverged_at: int | None = None
        checked = 0
        xs = ys = None
        for i in range(task.steps):
            if i % BLOCK == 0:
                xs, ys = (t.to(device) for t in source.sample(family.batch_size, BLOCK, generator))
            x, y = xs[i % BLOCK], ys[i % BLOCK]
            last: list[torch.Tensor] = []

            def closure() -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = objective_loss(family.objective, module(x), x, y)
                loss.backward()
                last.append(loss.detach())
                return loss

            optimizer.step(closure)
            if schedule is not None:
                schedule.step()
            losses[i] = last[-1]
            step = i + 1
            if step % CHECK_EVERY == 0 or step == task.steps:
                block = losses[checked:step].cpu()
                bad = ~torch.isfinite(block) | (block > limit)
                if bool(bad.any()):
                    diverged_at = checked + int(bad.nonzero()[0]) + 1
                    break
                checked = step
                if on_step is not None:
                    on_step(step, task.steps, float(block[-1]))
            if step in eval_at:
                loss_t, acc_t = _score(module, x_test, y_test, family.batch_size)
                eval_steps.append(step)
                test_loss.append(min(loss_t, cap) if math.isfinite(loss_t) else cap)
                test_acc.append(acc_t)

    curve = losses.cpu().double().numpy()
    if diverged_at is not None:
        curve[diverged_at - 1 :] = cap
        # Evaluations from the divergence on (some may have run before the check caught it) count
        # at the cap, like the training loss.
        keep = [i for i, s in enumerate(eval_steps) if s < diverged_at]
        remaining = sorted(s for s in eval_at if s >= diverged_at)
        eval_steps = [eval_steps[i] for i in keep] + remaining
        test_loss = [test_loss[i] for i in keep] + [cap] * len(remaining)
        test_acc = [test_acc[i] for i in keep] + [math.nan] * len(remaining)
    return RunRecord(
        train_loss=np.minimum(curve, cap),
        eval_steps=eval_steps,
        test_loss=test_loss,
        test_acc=test_acc,
        diverged_at=diverged_at,
        cap=cap,
        wall_s=time.perf_counter() - start,
        device=str(device),
        machine=provenance.arithmetic(str(device)),
    )


def run_cached(spec: RunSpec, cache_dir: str | Path, device: str = "cpu", on_step: StepCallback | None = None) -> RunRecord:
    """The cached record of ``spec``, or train it and cache the result."""
    directory = spec.directory(cache_dir)
    record = store.load(directory)
    if record is not None:
        return record
    record = train(spec, device, on_step)
    store.save(directory, spec.identity(), record)
    return record


def _worker_init() -> None:
    torch.set_num_threads(1)


def progress_bar(enabled: bool = True) -> Progress | ProgressLines:
    """The rich progress bar of every evaluation command: runs done, and the current run's loss.

    Plain lines (:class:`~lightning_lopt.progress_lines.ProgressLines`) when stdout is not a terminal.
    """
    if enabled and not sys.stdout.isatty():
        return ProgressLines()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
    )


def execute(
    specs: Sequence[RunSpec],
    cache_dir: str | Path,
    *,
    device: str = "cpu",
    workers: int = 1,
    progress: bool = True,
) -> dict[str, RunRecord]:
    """Run every spec not already in the cache; returns ``{spec.key: record}`` for all of them.

    Identical specs run once. ``workers > 1`` trains that many runs at a time in separate processes
    (each single-threaded on CPU). Cached runs are loaded without training.
    """
    unique = {s.key: s for s in specs}
    records: dict[str, RunRecord] = {}
    todo: list[RunSpec] = []
    for key, spec in unique.items():
        record = store.load(spec.directory(cache_dir))
        if record is None:
            todo.append(spec)
        else:
            records[key] = record
    with progress_bar(progress) as bar:
        overall = bar.add_task("runs", total=len(unique), completed=len(records), status=f"{len(records)} cached")
        if workers <= 1:
            for spec in todo:
                current = bar.add_task(spec.description, total=spec.task.steps, status="")

                def on_step(step: int, steps: int, loss: float, current: Any = current) -> None:
                    bar.update(current, completed=step, status=f"loss {loss:.4g}")

                records[spec.key] = run_cached(spec, cache_dir, device, on_step)
                bar.remove_task(current)
                _report_last(bar, overall, spec, records[spec.key])
                bar.advance(overall)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
                futures = {pool.submit(run_cached, s, str(cache_dir), device): s for s in todo}
                for future in as_completed(futures):
                    spec = futures[future]
                    records[spec.key] = future.result()
                    _report_last(bar, overall, spec, records[spec.key])
                    bar.advance(overall)
    return records


def _report_last(bar: Progress, overall: Any, spec: RunSpec, record: RunRecord) -> None:
    final = float(np.mean(record.train_loss[-10:]))
    tail = f"diverged at step {record.diverged_at}" if record.diverged else f"final loss {final:.4g}"
    bar.update(overall, status=f"last: {spec.description}: {tail}")
