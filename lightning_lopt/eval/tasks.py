"""Evaluation tasks: a task family (model kind, data, batch size, base width) at one width, depth and
number of steps.

Families are defined in ``configs/eval/families.yaml``, one set per suite size (``cpu``, ``full``).
A family is what the baselines are tuned on, once, at its base width and depth for its
``tune_steps``; a :class:`Task` is one point of a suite. Model kinds:

==========  =====================================  =============  ================
``model``   network                                objective      input multiplier
==========  =====================================  =============  ================
``mlp``     :class:`~lightning_lopt.models.MuMLP`  classification ``input_layer``
``ae``      ``MuMLP`` back to the input size       autoencoder    ``input_layer``
``vit``     :class:`~lightning_lopt.models.MuViT`  classification ``patch_embed``
``lm``      ``MuTransformerLM``                    lm             ``tok_embed``
``conv``    ``ConvNet``                            classification ``convs.0``
==========  =====================================  =============  ================

The input multiplier column is the module whose output μAdam's tuned ``input_mult`` scales (the
pre-activation multiplier of the input weights, mup's Table 8); the output multiplier is each
model's ``output_mult``.

Example::

    from lightning_lopt.eval.tasks import Family, Task
    family = Family.from_dict("mlp_digits", {"model": "mlp", "data": "digits", "batch_size": 64, "base_width": 32})
    task = Task(family, width=64, depth=3, steps=100)
    task.id                                        # "mlp_digits-w64-d3-t100"
    model = build_model(task, param="mup", source=family.source())
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lopt import models
from lightning_lopt.checks import check_positive_int
from lightning_lopt.eval.data import load_source

#: Model kinds and their training objective.
OBJECTIVES = {"mlp": "classification", "ae": "autoencoder", "vit": "classification", "lm": "lm", "conv": "classification"}
#: The module whose output μAdam's input multiplier scales, per model kind.
INPUT_MODULES = {"mlp": "input_layer", "ae": "input_layer", "vit": "patch_embed", "lm": "tok_embed", "conv": "convs.0"}
#: Recorded losses are capped at this multiple of the task's reference loss (VeLO's normalisers,
#: μLO's meta-objective: 1.5 ln C).
CAP_FACTOR = 1.5
#: A run diverges at a non-finite training loss or one above this multiple of the reference loss.
DIVERGE_FACTOR = 10.0


@dataclass(frozen=True)
class Family:
    """A task family: everything about a task but its width, depth and length.

    Attributes:
        name: the family's name, e.g. ``mlp_fashion_mnist``.
        model: ``mlp``, ``ae``, ``vit``, ``lm`` or ``conv``.
        data: a data source name (:data:`lightning_lopt.eval.data.SOURCES`).
        data_kwargs: keyword arguments of the data module (``image_size``, ``seq_len``, ...).
        batch_size: training batch size.
        base_width: the width the baselines are tuned at; "in distribution" in rank tables.
        depth: the default depth (layers; blocks for ViT and LM; convolutions for ``conv``).
        tune_steps: training steps of the tuning runs.
        patch_size: ViT patch size.
        head_dim: ViT and LM attention head size; ``heads = width // head_dim``.
        mlp_ratio: ViT MLP widening.
        eval_examples: test examples scored at each evaluation (the first ones of the test split).
        grid: the tuning grid of ``configs/eval/tuning.yaml`` the baselines are tuned with.
    """

    name: str
    model: str
    data: str
    batch_size: int
    base_width: int
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    depth: int = 3
    tune_steps: int = 1000
    patch_size: int = 4
    head_dim: int = 64
    mlp_ratio: float = 4.0
    eval_examples: int = 1024
    grid: str = "default"

    @classmethod
    def from_dict(cls, name: str, config: dict[str, Any]) -> Family:
        """Build from a ``families.yaml`` entry; unknown or missing keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"family {name!r}: unknown keys {unknown}; known: {sorted(known)}")
        required = ("model", "data", "batch_size", "base_width")
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"family {name!r}: missing {missing}")
        family = cls(name=name, **config)
        if family.model not in OBJECTIVES:
            raise ValueError(f"family {name!r}: unknown model {family.model!r}; known: {', '.join(OBJECTIVES)}")
        for key in ("batch_size", "base_width", "depth", "tune_steps", "eval_examples", "patch_size", "head_dim"):
            check_positive_int(f"family {name!r}: {key}", getattr(family, key))
        return family

    @property
    def objective(self) -> str:
        return OBJECTIVES[self.model]

    def source(self) -> Any:
        """The family's data source (loaded once per process)."""
        return load_source(self.data, self.data_kwargs)

    def config(self) -> dict[str, Any]:
        """What decides a run's records, as plain data (for cache keys): all but ``grid``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "grid"}

    def training_config(self) -> dict[str, Any]:
        """What decides a training curve: :meth:`config` without ``eval_examples``. Tuned settings
        are valid for a family as long as this is unchanged."""
        return {k: v for k, v in self.config().items() if k != "eval_examples"}


@dataclass(frozen=True)
class Task:
    """One evaluation task: a family at a width and depth, trained for ``steps`` steps."""

    family: Family
    width: int
    depth: int
    steps: int

    @property
    def id(self) -> str:
        return f"{self.family.name}-w{self.width}-d{self.depth}-t{self.steps}"

    def config(self) -> dict[str, Any]:
        return {"family": self.family.config(), "width": self.width, "depth": self.depth, "steps": self.steps}


def build_model(
    task: Task, param: str, source: Any, *, input_mult: float = 1.0, output_mult: float = 1.0
) -> nn.Module:
    """The task's network under ``param`` (``"mup"`` or ``"sp"``), sized by the data ``source``.

    ``input_mult`` scales the output of the input module (:data:`INPUT_MODULES`) with a forward
    hook; ``output_mult`` is the model's readout multiplier (μP only).
    """
    family, width, depth = task.family, task.width, task.depth
    kind = family.model
    if kind in ("vit", "lm") and width % family.head_dim:
        raise ValueError(f"task {task.id}: width {width} is not a multiple of head_dim {family.head_dim}")
    heads = width // family.head_dim
    model = models.build(
        kind, width, depth, param, data=source, heads=heads, patch_size=family.patch_size,
        mlp_ratio=family.mlp_ratio, output_mult=output_mult,
    )  # fmt: skip
    if input_mult != 1.0:
        module = model.get_submodule(INPUT_MODULES[kind])
        module.register_forward_hook(lambda m, args, out: out * input_mult)
    return model


def num_classes(task: Task, source: Any) -> int | None:
    """Classes of the accuracy metric: ``None`` for the LM and the autoencoder."""
    return source.num_classes if task.family.objective == "classification" else None


def reference_loss(task: Task, source: Any) -> float:
    """The loss of a trivial predictor, the unit of the cap and of divergence.

    ``ln C`` for classification, ``ln vocab`` for the LM (uniform predictions), and for the
    autoencoder the mean squared input (predicting zeros).
    """
    objective = task.family.objective
    if objective == "classification":
        return math.log(source.num_classes)
    if objective == "lm":
        return math.log(source.vocab_size)
    x, _ = source.split("train")
    # In chunks: a float64 copy of all of MNIST would take 340 MB.
    return sum(float(chunk.double().square().sum()) for chunk in x.split(4096)) / x.numel()


def held_out_batch(task: Task, source: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``eval_examples`` items of the test split, on ``device``."""
    x, y = source.split("test")
    n = task.family.eval_examples
    return x[:n].to(device), y[:n].to(device)
