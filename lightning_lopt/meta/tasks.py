"""Meta-training tasks: a LightningModule factory plus a LightningDataModule
(docs/reference/design.md#contract-3-a-task-is-lightning-native).

A :class:`Task` is what a user writes; :meth:`Task.build` turns it into one :class:`TaskInstance` per
width, which is what the unroll needs: the parameter names and shapes, the μP update scales, a pure
loss ``loss(params, batch)`` that ``torch.func`` can vmap over particles, fresh initialisations
under a seed, batches drawn with an explicit generator, and the cap of the normalised meta-loss.

**Any LightningModule works unchanged** when its ``training_step(batch, batch_idx)`` returns the
loss (or a dict with ``"loss"``): the module's parameters are swapped for the particles' with
``torch.func.functional_call`` and ``self.log`` / ``self.log_dict`` are silenced during the unroll.
A module that defines a pure ``loss(params, batch)`` (like :class:`~lightning_lopt.OptimizeeModule`)
is called through it instead, which also skips its metrics.

**Any LightningDataModule works**: data modules with an on-device ``sample(batch_size, n,
generator)`` (every data module of this library) are sampled with the task's generators; any other
is read through ``train_dataloader()``, cycled over epochs.

Example::

    task = Task(MyLitModule, MyDataModule(batch_size=64), module_kwargs={"hidden": 256})
    task = ImageMLPTask("fashion_mnist", image_size=8, widths=[32, 64, 128])   # built-in
    for inst in task.build(lopt_is_mu=True, device="cpu"):
        params = inst.init(seed=0)
        batch = inst.sample(steps=50, generators=[g0, g1])       # leaves [50, 2, B, ...]
        loss = inst.loss(dict(zip(inst.names, params)), inst.batch_at(batch, 0, 0))
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from lightning_lopt.checks import check_positive_int
from lightning_lopt.models.scales import (
    attach_readout_bases,
    is_hidden_matrix,
    readout_base,
    relative_update_scale,
    update_scales_of,
)
from lightning_lopt.optim.functional import celo2
from lightning_lopt.optim.registry import import_path

ModuleFactory = str | type | Callable[..., nn.Module]


class Task:
    """A meta-training task: an optimizee LightningModule factory and a LightningDataModule.

    Args:
        module: a LightningModule class (built as ``module(**module_kwargs)``, with
            ``module_kwargs[width_arg] = w`` for each width), its import path (``"pkg.mod.Class"``,
            as YAML recipes give it), or a callable ``factory(seed, width)`` returning the module
            (``width`` is ``None`` when ``widths`` is not given).
        datamodule: the data. Its ``sample(...)`` is used when it has one, else its ``train_dataloader()``.
        module_kwargs: keyword arguments of the class.
        widths: widths to meta-train on; each is its own PES estimator, all run at every meta-step
            with equal weight (docs/reference/pes.md#several-tasks-and-widths). ``None``: one instance, built as given.
        width_arg: the keyword that receives the width.
        batch_size: per-particle batch size for sampled data modules (default: the data module's
            ``batch_size``). DataLoader-read data modules use their loader's batches.
        loss_cap: the cap of the normalised meta-loss clip(loss, 0, cap), NaN → cap (docs/reference/pes.md#meta-loss).
            Default 1.5·ln C, with C the class count (the vocabulary for language models) read from
            the module (``num_classes``, ``readout.out_features``) or the data module (``num_classes``,
            ``vocab_size``); when neither declares one, 1.5 × the module's loss at initialisation on
            one batch (the same value for a classifier that starts at uniform predictions).
        name: used in logs and cards (default: the module's class name).

    Example::

        Task(MyLitModule, MyDataModule(batch_size=64), module_kwargs={"width": 256}, widths=[128, 256])
        Task(lambda seed, width: MyLitModule(width), MyDataModule(), widths=[64], loss_cap=3.5)
    """

    def __init__(
        self,
        module: ModuleFactory,
        datamodule: L.LightningDataModule,
        module_kwargs: dict[str, Any] | None = None,
        widths: Sequence[int] | None = None,
        width_arg: str = "width",
        batch_size: int | None = None,
        loss_cap: float | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(module, str):
            try:
                module = import_path(module)
            except ValueError as err:
                raise ValueError(f"Task: {err}") from err
        if not callable(module):
            raise TypeError(f"Task: module must be a LightningModule class or a factory(seed, width), got {module!r}")
        if not isinstance(datamodule, L.LightningDataModule):
            raise TypeError(f"Task: datamodule must be a LightningDataModule, got {type(datamodule).__name__}")
        if widths is not None:
            widths = [check_positive_int("widths", w) for w in widths]
            if not widths:
                raise ValueError("Task: widths must not be empty (pass None for a single instance)")
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if loss_cap is not None and not (isinstance(loss_cap, (int, float)) and loss_cap > 0):
            raise ValueError(f"Task: loss_cap must be a positive number, got {loss_cap!r}")
        self.module = module
        self.datamodule = datamodule
        self.module_kwargs = dict(module_kwargs or {})
        self.widths = widths
        self.width_arg = width_arg
        self.batch_size = batch_size
        self.loss_cap = loss_cap
        self.name = name or getattr(module, "__name__", type(module).__name__)

    # -- building ---------------------------------------------------------------------------------

    def make_module(self, seed: int, width: int | None) -> nn.Module:
        """A freshly initialised module: the factory under a seeded global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if isinstance(self.module, type):
                kwargs = dict(self.module_kwargs)
                if width is not None:
                    kwargs[self.width_arg] = width
                return self.module(**kwargs)
            return self.module(seed, width)

    def build(
        self,
        *,
        lopt_is_mu: bool,
        device: torch.device | str = "cpu",
        base_width: float | None = None,
        hidden_norm: str = "rms",
    ) -> list[TaskInstance]:
        """One :class:`TaskInstance` per width; checks everything that can fail before any compute.

        ``base_width`` makes the μP scales relative to it (``MuCelo2``'s ``base_width``);
        ``hidden_norm="spectral"`` gives hidden matrices ``MuCelo2``'s spectral steps. Both need
        ``lopt_is_mu``.
        """
        if base_width is not None and not lopt_is_mu:
            raise ValueError(f"task {self.name!r}: base_width={base_width} needs a μ learned optimizer (μP update scales)")
        if hidden_norm not in celo2.HIDDEN_NORMS:
            raise ValueError(
                f"task {self.name!r}: hidden_norm must be one of {celo2.HIDDEN_NORMS}, got {hidden_norm!r}"
            )
        if hidden_norm != "rms" and not lopt_is_mu:
            raise ValueError(
                f"task {self.name!r}: hidden_norm={hidden_norm!r} needs a μ learned optimizer (μP update scales)"
            )
        device = torch.device(device)
        data = DataSource(self.datamodule, self.batch_size, device)
        instances = []
        for width in self.widths or [None]:
            try:
                module = self.make_module(0, width)
            except (TypeError, ValueError) as err:
                raise ValueError(f"task {self.name!r} at width {width}: could not build the module: {err}") from err
            if not isinstance(module, nn.Module):
                raise TypeError(f"task {self.name!r}: the factory returned {type(module).__name__}, not a module")
            label = self.name if width is None else f"{self.name}-w{width}"
            instances.append(
                TaskInstance(self, label, width, module.to(device), data, lopt_is_mu, base_width, hidden_norm)
            )
        return instances


class DataSource:
    """Batches for the unroll: ``sample()`` when the data module has one, else its cycled DataLoader."""

    def __init__(self, datamodule: L.LightningDataModule, batch_size: int | None, device: torch.device) -> None:
        self.datamodule = datamodule
        self.device = device
        sampler = getattr(datamodule, "sample", None)
        self.sampled = callable(sampler)
        if self.sampled and hasattr(datamodule, "to"):
            datamodule.to(device)
        datamodule.prepare_data()
        datamodule.setup("fit")  # a missing data set fails here, with the data module's instructions
        if self.sampled:
            self.batch_size = batch_size or getattr(datamodule, "batch_size", None)
            if self.batch_size is None:
                raise ValueError(f"{type(datamodule).__name__} has no batch_size: give the Task a batch_size")
        self._iterator: Iterator[Any] | None = None
        self._structure: tuple[Any, list[torch.Size]] | None = None

    def _next_batch(self) -> Any:
        """The next loader batch whose structure matches the first (a short last batch is skipped)."""
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.datamodule.train_dataloader())
            for batch in self._iterator:
                leaves, spec = tree_flatten(batch)
                shapes = [leaf.shape for leaf in leaves if isinstance(leaf, Tensor)]
                if self._structure is None:
                    self._structure = (spec, shapes)
                if (spec, shapes) == self._structure:
                    return tree_map(lambda t: t.to(self.device) if isinstance(t, Tensor) else t, batch)
            self._iterator = None  # epoch done: cycle
        raise ValueError(f"{type(self.datamodule).__name__}.train_dataloader() yields no batch")

    def sample(self, steps: int, generators: Sequence[torch.Generator]) -> Any:
        """A batch pytree whose tensor leaves are ``[steps, len(generators), B, ...]``.

        Pair ``j`` draws with ``generators[j]`` (sampled data modules); DataLoader batches are taken
        in loader order.
        """
        if self.sampled:
            per_pair = [self.datamodule.sample(self.batch_size, steps, g) for g in generators]
            return tree_map(lambda *xs: torch.stack(xs, dim=1), *per_pair)
        rows = [[self._next_batch() for _ in generators] for _ in range(steps)]
        return tree_map(lambda *xs: torch.stack(xs).view(steps, len(generators), *xs[0].shape), *itertools.chain(*rows))


class _Method(nn.Module):
    """Calls ``module.<method>(*args)`` as ``forward``, so functional_call can swap the module's tensors."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: Any) -> Any:
        return getattr(self.module, self.method)(*args)


def _silence_logging(module: nn.Module) -> None:
    """``self.log`` / ``self.log_dict`` become no-ops on this (private) module instance."""

    def no_log(*args: Any, **kwargs: Any) -> None:
        return None

    for sub in module.modules():
        if isinstance(sub, L.LightningModule):
            sub.log = no_log  # type: ignore[method-assign]
            sub.log_dict = no_log  # type: ignore[method-assign]


def _freeze_mup_readouts(module: nn.Module) -> None:
    """Cache each ``mup.MuReadout``'s width multiplier as a float on this (private) module instance.

    mup's readout reads ``self.weight.infshape`` at every forward; ``functional_call`` hands it the
    particles' tensors, which carry no ``infshape``. The multiplier is a constant of the
    architecture, so reading it once is exact.
    """
    import mup

    for sub in module.modules():
        if isinstance(sub, mup.MuReadout) and hasattr(sub.weight, "infshape"):
            multiplier = float(sub.width_mult())
            sub.width_mult = lambda multiplier=multiplier: multiplier  # type: ignore[method-assign]


def _has_pure_loss(module: nn.Module) -> bool:
    loss = getattr(module, "loss", None)
    if not callable(loss) or isinstance(loss, nn.Module):
        return False
    try:
        return len(inspect.signature(loss).parameters) == 2
    except (TypeError, ValueError):
        return False


def _loss_of(output: Any, owner: str) -> Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            f"{owner}.training_step must return the loss (a scalar tensor) or a dict with 'loss'; got "
            f"{type(output).__name__}"
        )
    return loss.reshape(())


def default_loss_cap(module: nn.Module, datamodule: L.LightningDataModule) -> float | None:
    """1.5·ln C for the class count (or vocabulary) C the module or data module declares."""
    candidates = [
        getattr(module, "num_classes", None),
        getattr(getattr(module, "model", None), "num_classes", None),
        getattr(getattr(getattr(module, "model", None), "readout", None), "out_features", None),
        getattr(getattr(module, "readout", None), "out_features", None),
        getattr(datamodule, "num_classes", None),
        getattr(datamodule, "vocab_size", None),
    ]
    for count in candidates:
        if isinstance(count, int) and count > 1:
            return 1.5 * math.log(count)
    return None


#: The inferred cap is this multiple of the loss at initialisation: for a classifier that starts at
#: uniform predictions (loss ln C) it is the same 1.5·ln C as the class-count rule.
INIT_LOSS_CAP_FACTOR = 1.5


def cap_from_initial_loss(loss: float) -> float | None:
    """``1.5 ×`` the loss at initialisation, or ``None`` when that loss is not positive and finite."""
    if not (math.isfinite(loss) and loss > 0):
        return None
    return INIT_LOSS_CAP_FACTOR * loss


@dataclass
class TaskInstance:
    """One width of a task, ready to unroll. Built by :meth:`Task.build`."""

    task: Task
    label: str
    width: int | None
    module: nn.Module
    data: DataSource
    lopt_is_mu: bool
    #: Scales relative to this base width (``relative_update_scale``), or μLO's absolute ones (None).
    base_width: float | None = None
    #: ``"spectral"``: hidden matrices take MuCelo2's spectral steps (``self.spectral``); ``"rms"``: not.
    hidden_norm: str = "rms"

    def __post_init__(self) -> None:
        module = self.module
        _silence_logging(module)
        _freeze_mup_readouts(module)
        owner = type(module).__name__
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"task {self.label!r}: {owner} has no trainable parameters")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.num_params = sum(p.numel() for _, p in named)
        self.buffers = dict(module.named_buffers())
        if self.lopt_is_mu:
            try:
                table = update_scales_of(module)
            except ValueError as err:
                raise ValueError(f"task {self.label!r} has no μP update scales for a μ learned optimizer: {err}") from err
            self.scales = [float(table[n]) for n in self.names]
            # Told apart by the absolute scale, before it is made relative.
            hidden = [is_hidden_matrix(p, s) for s, (_, p) in zip(self.scales, named)]
            if self.base_width is not None:
                # A user's mup model has no marks yet; the library's models are marked already.
                if not attach_readout_bases(module):
                    rank_zero_warn(
                        f"task {self.label!r}: base_width={self.base_width} but {owner} has no μP readout "
                        "(mup.MuReadout), so none gets the readout's relative scale"
                    )
                self.scales = [
                    relative_update_scale(s, readout_base(p), self.base_width) for s, (_, p) in zip(self.scales, named)
                ]
            #: ``StepContext.spectral``: per tensor the spectral target, or None (see ``hidden_norm``).
            self.spectral = None
            if self.hidden_norm == "spectral":
                self.spectral = [
                    celo2.spectral_target(shape, s) if h else None
                    for shape, s, h in zip(self.shapes, self.scales, hidden)
                ]
        else:
            self.scales = [1.0] * len(self.names)
            self.spectral = None
        self._pure = _has_pure_loss(module)
        self._call = _Method(module, "training_step")
        # Run the loss once, eagerly, on a real batch: a module whose training_step returns no loss
        # fails here, before any meta-training compute.
        probe = self.data.sample(1, [torch.Generator(device=self.data.device).manual_seed(0)])
        # What unroll.batch_key compares, kept so that it need not draw (from a DataLoader: consume) a batch.
        leaves, spec = tree_flatten(probe)
        described = tuple((x.shape, x.dtype) if isinstance(x, Tensor) else repr(x) for x in leaves)
        self.batch_structure = (repr(spec), described)
        params = {n: p.detach() for n, p in named}
        loss = self.loss(params, self.batch_at(probe, 0, 0))
        if not torch.is_floating_point(loss):
            raise ValueError(f"task {self.label!r}: the loss of {owner} is not a floating-point scalar")
        cap = self.task.loss_cap or default_loss_cap(module, self.task.datamodule)
        if cap is None:
            cap = cap_from_initial_loss(float(loss))
            if cap is None:
                raise ValueError(
                    f"task {self.label!r}: cannot tell the class count of {owner}, and its loss at "
                    f"initialisation ({float(loss):.4g}) is not a positive finite number to cap the meta-loss "
                    "from; pass Task(loss_cap=...)"
                )
            rank_zero_info(
                f"task {self.label!r}: meta-loss cap {cap:.4g} = {INIT_LOSS_CAP_FACTOR} × its loss at "
                "initialisation (no class count found); pass Task(loss_cap=...) to override"
            )
        self.loss_cap = float(cap)

    # -- the pure loss ----------------------------------------------------------------------------

    def loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """The training loss at ``params`` (``names`` → tensors) on ``batch``; pure and vmap-able."""
        if self._pure:
            if hasattr(self.module, "model") and all(n.startswith("model.") for n in params):
                # OptimizeeModule.loss takes the wrapped model's own parameter names.
                params = {n[len("model."):]: p for n, p in params.items()}
            return self.module.loss(params, batch).reshape(())
        tensors = {**{f"module.{n}": b for n, b in self.buffers.items()}, **{f"module.{n}": p for n, p in params.items()}}
        output = torch.func.functional_call(self._call, tensors, (batch, 0))
        return _loss_of(output, type(self.module).__name__)

    # -- initialisations and data -----------------------------------------------------------------

    def init(self, seed: int) -> list[Tensor]:
        """Freshly initialised parameters (in ``names`` order) from the task's factory under ``seed``."""
        module = self.task.make_module(seed, self.width)
        table = dict(module.named_parameters())
        return [table[n].detach().to(self.data.device, torch.float32) for n in self.names]

    def sample(self, steps: int, generators: Sequence[torch.Generator]) -> Any:
        """Batches for ``steps`` inner steps of ``len(generators)`` pairs (leaves ``[steps, pairs, ...]``)."""
        return self.data.sample(steps, generators)

    @staticmethod
    def batch_at(batches: Any, step: int, pair: int) -> Any:
        """The batch of one pair at one step."""
        return tree_map(lambda t: t[step, pair] if isinstance(t, Tensor) else t, batches)
