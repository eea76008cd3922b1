"""Optimizers as the evaluation names them, and how each run builds its optimizer.

An entry of ``--optimizers`` is one of

* a registry name (``lightning_lopt.optim.available()``): ``mulo``, ``lo``, ``adamw``, ``muadam``, ...;
* ``name:weights`` for a learned optimizer: a directory written by ``save_pretrained``, a packaged
  name or a hub id, passed as ``meta_weights`` (``mulo:runs/my-mulo``, ``mulo-cosine:runs/my-mulo``);
* an optimizer class by import path, ``package.module:Class`` or ``package.module.Class``;

a registry name may end in ``-cosine`` (``adamw-cosine``, ``muadam-cosine``, ``mulo-cosine``): the same
optimizer under a linear warmup (the first 5% of the run) and a cosine decay to zero over the run's
length, the schedule a practitioner would use. A hand-designed one is tuned separately from the
constant-rate one; a learned one is not tuned (its ``lr`` multiplies its step, peak 1).
Any entry is optionally followed by ``@mup`` or ``@sp`` to pin the parametrization of the models it trains. By
default the μ optimizers (``muadam``, ``mulo``, ``muvelo``, and classes that take ``scales``) train
μP models and the others standard-parametrized ones, as in μLO's evaluation.

Every run builds its optimizer with :func:`lightning_lopt.optim.build` over the module's named
parameters with its μP update scales, exactly as ``OptimizeeModule.configure_optimizers`` does, so
what is measured is the ``torch.optim`` class users get. A :class:`Setting` adds what tuning chose:
optimizer keyword arguments, plus for μAdam the model's input and output multipliers and a learning
rate multiplier on the hidden matrices (the tensors whose μP update scale is below 1); any optimizer
may also get a weight decay and a learning-rate multiplier of their own on the 1-D tensors
(``vector_weight_decay``, ``vector_lr_mult``).

Example::

    spec = parse_optimizer("mulo:runs/my-mulo")
    spec.factory, spec.meta_weights, spec.param       # ("mulo", "runs/my-mulo", "mup")
    opt = make_optimizer(spec, Setting({"lr": 1.0}), module, steps=1000)
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_lopt import optim
from lightning_lopt.optim import pretrained
from lightning_lopt.optim.learned import RANDOM_META_SEED, LearnedOptimizer
from lightning_lopt.optim.param_groups import ROLE_OPTIONS, param_groups_by_role
from lightning_lopt.optim.registry import accepts
from lightning_lopt.optim.schedules import WarmupCosine

#: Setting keys that configure the model rather than the optimizer.
MODEL_KEYS = ("input_mult", "output_mult")
#: Setting key of the learning-rate multiplier on hidden matrices.
HIDDEN_LR_MULT = "hidden_lr_mult"
#: Setting key of the weight decay of the 1-D tensors (LayerNorm gains and biases, biases), which
#: then get their own param group; the optimizer's ``weight_decay`` stays on every other tensor.
VECTOR_WEIGHT_DECAY = "vector_weight_decay"
#: Setting key of the learning-rate multiplier on the 1-D tensors (their own param group too).
VECTOR_LR_MULT = "vector_lr_mult"
#: Setting keys that shape the param groups rather than the optimizer's arguments: ``param_groups_by_role``'s.
GROUP_KEYS = ROLE_OPTIONS
PARAMS = ("mup", "sp")
#: Suffix of a hand-designed optimizer's warmup + cosine variant (``optim.schedules.WarmupCosine``).
COSINE_SUFFIX = "-cosine"


@dataclass(frozen=True)
class OptimizerSpec:
    """One entry of ``--optimizers``, parsed.

    Attributes:
        label: the entry as written; names the optimizer in tables, plots and the cache.
        factory: a registry name or a ``module:attr`` import path.
        param: the parametrization of the models it trains, ``"mup"`` or ``"sp"``.
        meta_weights: learned-optimizer weights (``name:weights``), or ``None``.
        schedule: ``"cosine"`` for the warmup + cosine variant (``adamw-cosine``), else ``None``.
    """

    label: str
    factory: str
    param: str
    meta_weights: str | None = None
    schedule: str | None = None

    @property
    def tuned_name(self) -> str:
        """The name its tuned settings are stored under: ``adamw``, ``adamw-cosine``, ..."""
        return self.factory + (COSINE_SUFFIX if self.schedule == "cosine" else "")

    def resolve(self) -> Callable[..., torch.optim.Optimizer]:
        """The optimizer class or factory."""
        return optim.resolve(self.factory)

    @property
    def is_learned(self) -> bool:
        factory = self.resolve()
        return isinstance(factory, type) and issubclass(factory, LearnedOptimizer)


@dataclass(frozen=True)
class Setting:
    """What one optimizer runs with on one task family.

    Attributes:
        values: optimizer keyword arguments, plus ``input_mult`` / ``output_mult`` (model),
            ``hidden_lr_mult``, ``vector_weight_decay`` and ``vector_lr_mult`` (param groups) where
            tuning or the user chose them.
        origin: where they come from, for the report: ``"tuned: <file>"``, ``"given"`` or ``"defaults"``.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    origin: str = "defaults"

    @property
    def optimizer_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k not in (*MODEL_KEYS, *GROUP_KEYS)}

    @property
    def model_kwargs(self) -> dict[str, float]:
        return {k: float(self.values[k]) for k in MODEL_KEYS if k in self.values}

    @property
    def hidden_lr_mult(self) -> float:
        return float(self.values.get(HIDDEN_LR_MULT, 1.0))

    @property
    def vector_weight_decay(self) -> float | None:
        value = self.values.get(VECTOR_WEIGHT_DECAY)
        return None if value is None else float(value)

    @property
    def vector_lr_mult(self) -> float:
        return float(self.values.get(VECTOR_LR_MULT, 1.0))


def parse_optimizer(text: str) -> OptimizerSpec:
    """Parse one ``--optimizers`` entry; ``ValueError`` naming the accepted forms otherwise."""
    label = text.strip()
    body, _, pinned = label.partition("@")
    if pinned and pinned not in PARAMS:
        raise ValueError(f"{label!r}: '@{pinned}' is not a parametrization; use @mup or @sp")
    name, sep, rest = body.partition(":")
    known = optim.available()
    forms = (
        f"a registry name ({', '.join(known)}), NAME:WEIGHTS for a learned optimizer's weights, or an "
        "import path package.module:Class; optionally @mup or @sp"
    )
    meta_weights = None
    schedule = None
    if name.lower().endswith(COSINE_SUFFIX) and name.lower()[: -len(COSINE_SUFFIX)] in known:
        name, schedule = name[: -len(COSINE_SUFFIX)], "cosine"
    if name.lower() in known:
        factory = name.lower()
        if sep:
            cls = optim.resolve(factory)
            if not accepts(cls, "meta_weights"):
                raise ValueError(f"{label!r}: {factory} takes no learned-optimizer weights; expected {forms}")
            if not rest:
                raise ValueError(f"{label!r}: empty weights after ':'; expected {forms}")
            meta_weights = rest
    elif "." in name or sep:
        # package.module:Class, or package.module.Class
        factory = body if sep else ":".join(body.rsplit(".", 1))
        optim.resolve(factory)
    else:
        raise ValueError(f"unknown optimizer {label!r}; expected {forms}")
    if pinned:
        param = pinned
    elif ":" in factory:
        param = "mup" if accepts(optim.resolve(factory), "scales") else "sp"
    else:
        param = "mup" if getattr(optim.resolve(factory), "mu", False) else "sp"
    return OptimizerSpec(label=label, factory=factory, param=param, meta_weights=meta_weights, schedule=schedule)


def issubclass_safe(obj: Any, cls: type) -> bool:
    return isinstance(obj, type) and issubclass(obj, cls)


def make_schedule(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The run's learning-rate schedule (stepped once after every optimizer step), or ``None``."""
    if spec.schedule is None:
        return None
    return WarmupCosine(optimizer, steps)


def weights_identity(spec: OptimizerSpec) -> str | None:
    """What identifies the learned-optimizer weights a spec runs, for cache keys and reports.

    A local or packaged weight file is identified by the SHA-256 of its safetensors file, so
    re-trained weights at the same path are never mistaken for the old ones; a hub id by its name;
    no weights by the random meta-initialisation. ``None`` for hand-designed optimizers.
    """
    if not spec.is_learned:
        return None
    cls = spec.resolve()
    name = cls.default_meta_weights() if spec.meta_weights is None else spec.meta_weights
    if name is None:
        return f"random meta-initialisation (seed {RANDOM_META_SEED})"
    try:
        path = pretrained.locate(name)
    except FileNotFoundError:
        return name
    if isinstance(path, str):  # a hub repo id
        return name
    if path.is_dir():
        path = path / pretrained.WEIGHTS_NAME
    if path.is_file():
        return f"{name} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})"
    return name


def default_identity(spec: OptimizerSpec, setting: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults of the arguments an optimizer class names in ``identity_arguments`` that
    ``setting`` leaves unset, for cache keys: when such a default changes (``MuCelo2``'s
    ``hidden_norm`` did), runs cached under the old one are not reused. Empty for other optimizers.

    Example::

        default_identity(parse_optimizer("mucelo2"), {})   # {"hidden_norm": "spectral"}
    """
    factory = spec.resolve()
    names = getattr(factory, "identity_arguments", ())
    if not names:
        return {}
    parameters = inspect.signature(factory).parameters
    return {name: parameters[name].default for name in names if name not in setting}


def uses_random_weights(spec: OptimizerSpec) -> bool:
    """Whether a learned optimizer would run a random meta-initialisation (no weights found)."""
    identity = weights_identity(spec)
    return identity is not None and identity.startswith("random")


def make_optimizer(spec: OptimizerSpec, setting: Setting, module: nn.Module, steps: int) -> torch.optim.Optimizer:
    """Build the optimizer of one run over ``module`` (an ``OptimizeeModule``).

    Optimizers that take a horizon (Celo, VeLO) get ``num_steps=steps``, as
    ``lightning_lopt.Trainer`` gives them the fit's length.
    """
    factory = spec.resolve()
    kwargs = setting.optimizer_kwargs
    if spec.meta_weights is not None:
        kwargs["meta_weights"] = spec.meta_weights
    if "num_steps" not in kwargs and accepts(factory, "num_steps"):
        kwargs["num_steps"] = steps
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    scales = module.update_scales()
    groups = param_groups_by_role(
        module,
        kwargs.get("lr"),
        hidden_lr_mult=setting.hidden_lr_mult,
        vector_weight_decay=setting.vector_weight_decay,
        vector_lr_mult=setting.vector_lr_mult,
        scales=scales,
    )
    # Registry names go through the registry (its per-name defaults); import paths as the class.
    return optim.build(spec.factory if ":" not in spec.factory else factory, groups, scales=scales, **kwargs)
