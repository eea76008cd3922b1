"""Celo2 as ``torch.optim.Optimizer`` classes: ``Celo2``, ``Celo2Base`` and the μP ``MuCelo2``.

Celo2 (Moudgil, Knyazev, Belilovsky, ICLR 2026;
docs/reference/celo2.md#the-update-rule) updates every matrix with a learned
per-element 30→8→8→3 MLP whose output is orthogonalised by Newton–Schulz and normalised to RMS 1,
and every vector (biases, norms) and embedding with Adam (β = 0.9, 0.95). The learning rate is the
RMS of every matrix's update, so a schedule is the user's (any LR scheduler works), and weight decay
is decoupled: ``p ← p − lr · (u + weight_decay · p)``. Celo2Base skips the orthogonalisation and runs
the learned rule on every tensor. The rule itself is :mod:`lightning_lopt.optim.functional.celo2`.

=============  ==============================  =============================  ================
class          matrices (rank ≥ 2)             vectors, scalars, embeddings   μP update scales
=============  ==============================  =============================  ================
``Celo2``      MLP → Newton–Schulz → RMS 1     Adam (``adam_lr_mult`` × lr)    no (all 1)
``Celo2Base``  MLP → RMS 1                     the learned rule (MLP → RMS 1)  no (all 1)
``MuCelo2``    as Celo2, × μP scale            as Celo2                        yes
=============  ==============================  =============================  ================

MuCelo2's μP scales are relative to ``base_width`` (default 128): ``base_width`` on a μLO readout,
and on hidden matrices a step of spectral norm ``lr · sqrt(base_width)`` (square matrices;
``hidden_norm="spectral"``, the default) or ``base_width / fan_in`` × the RMS-1 update
(``hidden_norm="rms"``), so that at width 128 it moves every layer about as Celo2 does at the same
``lr``; ``base_width=None`` gives μLO's absolute scales (see ``MuCelo2``).

**Routing to Adam** (Celo2, MuCelo2): tensors of rank ≤ 1, and parameters whose name contains
``"embed"`` when the parameters come as ``named_parameters()`` (what ``lightning_lopt.Trainer``
passes; the reference's test-time rule,
docs/reference/celo2.md#the-adam-branch). A param group may force it either way with
``{"params": ..., "adam": True}`` (e.g. an untied LM head) or ``"adam": False``.

**The Adam branch** runs at test time as optax.adamw (bias-corrected, eps 1e-8 outside the sqrt) with
learning rate ``adam_lr_mult · lr``: ``adam_lr_mult=1`` follows the authors' model card, the
authors' README leaves it to the user and their meta-training used 20 (docs/reference/celo2.md#the-adam-branch).
``adam_mode="meta_training"`` switches to the meta-training form (no bias correction, eps inside
the sqrt). Weight decay on this branch is ``lr · weight_decay · p`` (optax.adamw would use
``adam_lr_mult · lr · weight_decay · p``; the two agree at the default ``adam_lr_mult=1``).

**Recommended settings.** ``lr`` is the per-element RMS of every matrix update, about 5x the
per-element step of AdamW at the same nominal lr: start near 1e-3 (the meta-training value) and
tune by factors of √10; ``weight_decay`` as for AdamW; use a warmup + cosine schedule for long runs.

**Which step runs.** On CPU with float32 parameters the classes run the fused step by default
(``fused=None``): the C kernel of :mod:`lightning_lopt.optim.fused` computes the elementwise part
(accumulators, the features, their normalisation over the matrix axes, the MLP) and torch does
Newton–Schulz (batched matmuls), the RMS normalisation, the Adam branch and the update
(:mod:`lightning_lopt.optim.fused.celo2_step`); it matches the pure step to float32 rounding.
``fused=False`` runs the pure step (:mod:`lightning_lopt.optim.functional.celo2`), as do float64
parameters and CUDA; ``fused=True`` raises where the fused step cannot run.

**Meta-weights.** ``Celo2`` loads the packaged ``celo2-8x8-16x16-mlp-mix10k`` by default: the authors'
recipe run here on CPU for 690 meta-steps (width-32 MLPs on 8x8 images, episodes up to 2,000 steps),
then fine-tuned for 3,310 on those tasks plus a 16x16 MNIST MLP with episodes of 100–2,000 and
2,000–10,000 steps (``configs/meta/celo2_cpu_mix16.yaml``; its card says what it measured), far less
than the authors' 100,000. Unlike the first run's θ (``celo2-8x8-mlp-w32``, by name), it does not
diverge on a 10,000-step MLP run at lr 1e-3 and keeps improving to 25,000 steps on the Brown LM
(``docs/results.md``, section 18). The authors' ``theta.state`` could not be fetched
offline (convert it with :meth:`~lightning_lopt.optim.celo2_lopt.Celo2LOpt.from_haiku` and
``save_pretrained`` and pass the directory as ``meta_weights``). ``MuCelo2`` loads
``mucelo2-8x8-mlp-w32-128-base128``: that θ fine-tuned for 490 CPU steps with MuCelo2's default scales
(base width 128), lower than ``celo2-8x8-mlp-w32`` under the same defaults at widths 128–2048 on 5 of 5
seeds (``docs/celo2.md``, "Meta-trained with the base width"). ``mucelo2-8x8-mlp-w32-128`` (absolute
scales, 410 steps) is kept by name only: it was worse than its starting θ. For long runs of MuCelo2 load
``meta_weights="mucelo2-8x8-16x16-mlp-mix10k"`` (the Celo2 default above fine-tuned for 510 steps under
MuCelo2's rule): on a 10,000-step MLP run it ends far lower than the default θ, but on 300-step runs it
stops improving with width past 256 (``docs/results.md``, section 19). ``Celo2Base`` has no packaged weights:
without ``meta_weights`` it warns and uses a random meta-initialisation.

Example::

    import lightning_lopt as llo
    opt = llo.Celo2(model.named_parameters(), lr=1e-3, weight_decay=0.1, meta_weights="runs/celo2")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from lightning_lopt.checks import check_positive_number
from lightning_lopt.models.scales import readout_base
from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.functional import celo2
from lightning_lopt.optim.learned import GLOBAL_STATE_KEY, LearnedOptimizer, MetaWeights
from lightning_lopt.optim.scaling import scaled_param_groups

#: Parameters whose name contains this go to the Adam branch (the reference's test-time routing).
EMBEDDING_MARKER = "embed"


def route_embeddings(params: Iterable[Any]) -> list[Any]:
    """Param groups where named parameters containing ``"embed"`` form groups with ``adam=True``.

    Flat tensors and groups that already set ``"adam"`` pass through unchanged; names are kept (as
    ``(name, p)`` pairs) for the μP scale lookup and error messages.
    """
    items = list(params)
    if not items:
        return items
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    out: list[dict[str, Any]] = []
    for group in groups:
        raw = group["params"]
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        if "adam" in group or not any(isinstance(x, tuple) for x in raw):
            out.append({**group, "params": raw})
            continue
        embed = [x for x in raw if isinstance(x, tuple) and EMBEDDING_MARKER in x[0]]
        rest = [x for x in raw if not (isinstance(x, tuple) and EMBEDDING_MARKER in x[0])]
        out.extend(g for g in ({**group, "params": rest}, {**group, "params": embed, "adam": True}) if g["params"])
    return out


class _Celo2Optimizer(LearnedOptimizer):
    """Shared plumbing: the Adam routing and the Adam-branch settings of the private θ copy."""

    module_class = Celo2LOpt
    #: Newton–Schulz on matrix updates (Celo2) or not (Celo2Base).
    orthogonalize = True
    #: Whether rank ≤ 1 tensors and embeddings go to Adam (False: the learned rule on everything).
    adam_routing = True

    @classmethod
    def meta_module(cls, stage: int) -> Celo2LOpt:
        """The inner rule as the authors meta-trained Celo2 (``Celo2LOpt.meta_training()``)."""
        return Celo2LOpt.meta_training()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        *,
        meta_weights: MetaWeights,
        weight_decay: float,
        adam_lr_mult: float = 1.0,
        adam_mode: str = "adamw",
        scales: Mapping[str, float] | None = None,
        allow_sp: bool = False,
        fused: bool | None = None,
    ) -> None:
        if adam_mode not in celo2.ADAM_MODES:
            raise ValueError(f"{type(self).__name__}: adam_mode must be one of {celo2.ADAM_MODES}, got {adam_mode!r}")
        if not (isinstance(adam_lr_mult, (int, float)) and adam_lr_mult >= 0):
            raise ValueError(f"{type(self).__name__}: adam_lr_mult must be a non-negative number, got {adam_lr_mult!r}")
        groups = route_embeddings(params) if self.adam_routing else params
        super().__init__(
            groups, lr, meta_weights=meta_weights, weight_decay=weight_decay, scales=scales, allow_sp=allow_sp, fused=fused
        )
        # The step configuration is the optimizer's, whatever the card of the loaded θ says.
        self.meta_weights.orthogonalize = self.orthogonalize
        self.meta_weights.adam_1d = self.adam_routing
        self.meta_weights.adam_mode, self.meta_weights.adam_lr_mult = adam_mode, float(adam_lr_mult)
        self.meta_weights.step_mult = 1.0  # lr is the step's scale

    def _init_missing_state(self, module: Any, params: list[Tensor]) -> None:
        """Fresh state, routing each new tensor to Adam by its group's ``adam`` flag or its rank."""
        fresh = [p for p in params if not self.state.get(p)]
        if not fresh and GLOBAL_STATE_KEY in self.state:
            return
        flags = {id(p): g.get("adam") for g in self.param_groups for p in g["params"]}
        adam = [bool(flags[id(p)]) if flags[id(p)] is not None else self.adam_routing and p.dim() <= 1 for p in fresh]
        init = module.init_state([p.detach().to(self.compute_dtype) for p in fresh], adam=adam)
        if GLOBAL_STATE_KEY not in self.state:
            self.state[GLOBAL_STATE_KEY] = {k: v for k, v in init.items() if k != "tensors"}
        for p, accumulators in zip(fresh, init["tensors"]):
            self.state[p] = accumulators


class Celo2(_Celo2Optimizer):
    """Celo2: learned MLP + Newton–Schulz + RMS normalisation on matrices, Adam on vectors and embeddings.

    Args:
        params: parameters, ``named_parameters()`` pairs (embeddings are then found by name) or
            param groups (``lr``, ``weight_decay``, ``adam`` per group).
        lr: the per-element RMS of every matrix update (1e-3 in meta-training).
        meta_weights: an architecture module, a directory, packaged name or hub id (see ``LO``).
        weight_decay: decoupled: ``p ← p − lr · weight_decay · p`` (pre-update ``p``).
        adam_lr_mult: the Adam branch's learning rate is ``adam_lr_mult · lr``.
        adam_mode: ``"adamw"`` (test time) or ``"meta_training"`` (see the module docstring).
        fused: the fused CPU step (see the module docstring): ``None`` where it runs, ``False``
            the pure step, ``True`` the fused step or an error.

    Example::

        opt = Celo2(model.named_parameters(), lr=1e-3, meta_weights="runs/celo2")
    """

    module_factory = Celo2LOpt
    pretrained_names = ("celo2-8x8-16x16-mlp-mix10k", "celo2-8x8-mlp-w32")
    registry_name = "celo2"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        meta_weights: MetaWeights = None,
        weight_decay: float = 0.0,
        adam_lr_mult: float = 1.0,
        adam_mode: str = "adamw",
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            meta_weights=meta_weights,
            weight_decay=weight_decay,
            adam_lr_mult=adam_lr_mult,
            adam_mode=adam_mode,
            fused=fused,
        )


class Celo2Base(_Celo2Optimizer):
    """Celo2Base: the learned MLP + RMS normalisation on every tensor, no orthogonalisation, no Adam.

    Example::

        opt = Celo2Base(model.parameters(), lr=1e-3, meta_weights="runs/celo2-base")
    """

    module_factory = staticmethod(Celo2LOpt.base)
    registry_name = "celo2-base"

    @classmethod
    def meta_module(cls, stage: int) -> Celo2LOpt:
        return Celo2LOpt.base(step_mult=1e-3)
    orthogonalize = False
    adam_routing = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        meta_weights: MetaWeights = None,
        weight_decay: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, lr, meta_weights=meta_weights, weight_decay=weight_decay, fused=fused)


class MuCelo2(_Celo2Optimizer):
    """μCelo2: Celo2 with per-tensor μP update scales (``docs/celo2.md``, "MuCelo2").

    Celo2's update has RMS 1 per matrix whatever the gradient's size, like Adam's, so the μP scales
    are Adam's (and μLO's): ``1/fan_in`` for hidden matrices, 1 for input and readout weights (the
    μP model's readout multiplier supplies the readout's 1/width) and for the Adam-branch vectors.
    Scales are resolved as for :class:`~lightning_lopt.optim.optimizers.MuLO`: the group's
    ``update_scale``, ``scales``, ``p.lopt_update_scale`` or mup's ``p.infshape``.

    **Base-width-relative scales** (``base_width``, as mup's ``MuAdam`` reads a learning rate at the
    base width): hidden matrices move by ``base_width / fan_in`` and the readout by ``base_width``
    over its base fan-in, so at ``fan_in == base_width`` every layer moves as Celo2's does on a
    standard-parametrization model of that width, and ``lr`` means what it means for ``Celo2``.
    Readouts are the tensors marked by :func:`lightning_lopt.models.attach_readout_bases` (the
    library's models mark theirs; call it on a user mup model). ``base_width=None`` gives μLO's
    absolute scales, which the meta-training path uses (``MetaTrainer(lopt="mucelo2")``).

    **Hidden matrices** (``hidden_norm``). ``"rms"`` scales a hidden matrix's RMS-1 update by
    ``base_width / fan_in`` (Adam's μP rule). That is right when the update is low-rank, but Newton–
    Schulz lifts every singular value of Celo2's update to the same size, and then a matrix's effect
    on its layer's output per coordinate falls as ``1 / sqrt(fan_in)`` (the hidden layers' coordinate
    check falls with width). ``"spectral"`` instead fixes each hidden matrix step's spectral norm
    (measured as ``‖u uᵀ‖_F / ‖u‖_F``): ``lr · sqrt(scale · max(fan_out, fan_in))``, where scale is
    the tensor's μP scale; for a square matrix ``lr · sqrt(base_width)``, which is what a full-rank
    RMS-1 update of a width-``base_width`` matrix has. μP's spectral condition (Yang, Simon and
    Bernstein, 2023) asks for exactly that, whatever the update's rank (``docs/celo2.md``).

    Args:
        params: as :class:`Celo2`; the parameters of a μP model.
        lr: the step's scale (see ``base_width``).
        base_width: the width at which MuCelo2 moves every layer as Celo2 does, or None.
        hidden_norm: ``"spectral"`` or ``"rms"``, how hidden matrices' steps are sized (above).
        scales: per-name absolute μP scales (``model.update_scales()``) for named parameters.
        allow_sp: treat tensors without μP information as scale 1 instead of raising.
        Others: as :class:`Celo2`.

    Example::

        opt = MuCelo2(model.named_parameters())                       # a lightning_lopt.models μP model
        opt = MuCelo2(model.parameters(), base_width=None, lr=1e-2)   # μLO's absolute scales
        opt = MuCelo2(model.parameters(), hidden_norm="rms")          # Adam's μP rule on hidden matrices
    """

    module_factory = Celo2LOpt
    pretrained_names = ("mucelo2-8x8-mlp-w32-128-base128", "celo2-8x8-mlp-w32")
    mu = True
    registry_name = "mucelo2"
    # docs/results.md section 19: 0.079 against the default weights' 0.210 at 10,000 steps on a Fashion-MNIST MLP.
    long_run_settings = {"meta_weights": "mucelo2-8x8-16x16-mlp-mix10k"}
    #: Arguments whose defaults enter evaluation cache keys (``hidden_norm``'s changed on 2026-12-05).
    identity_arguments = ("hidden_norm",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        base_width: float | None = 128,
        hidden_norm: str = "spectral",
        meta_weights: MetaWeights = None,
        weight_decay: float = 0.0,
        adam_lr_mult: float = 1.0,
        adam_mode: str = "adamw",
        scales: Mapping[str, float] | None = None,
        allow_sp: bool = False,
        fused: bool | None = None,
    ) -> None:
        owner = type(self).__name__
        if hidden_norm not in celo2.HIDDEN_NORMS:
            raise ValueError(f"{owner}: hidden_norm must be one of {celo2.HIDDEN_NORMS}, got {hidden_norm!r}")
        if base_width is not None:
            base_width = check_positive_number(f"{owner}: base_width", base_width)
        self.base_width, self.hidden_norm = base_width, hidden_norm
        super().__init__(
            params,
            lr,
            meta_weights=meta_weights,
            weight_decay=weight_decay,
            adam_lr_mult=adam_lr_mult,
            adam_mode=adam_mode,
            scales=scales,
            allow_sp=allow_sp,
            fused=fused,
        )
        readouts = [p for g in self.param_groups for p in g["params"] if readout_base(p) is not None]
        if base_width is not None and not readouts:
            warnings.warn(
                f"{owner}(base_width={base_width}): no μP readout among the parameters, so none gets the "
                "readout's relative scale; mark a user mup model's readout with "
                "lightning_lopt.models.attach_readout_bases(model)",
                stacklevel=2,
            )

    def _scaled_groups(self, params: Iterable[Any]) -> list[dict[str, Any]]:
        """Groups with one (base-width-relative) ``update_scale`` each, hidden matrices marked; used
        by the constructor and by ``add_param_group`` alike."""
        return scaled_param_groups(
            params, self._scales, allow_sp=self._allow_sp, owner=type(self).__name__,
            base_width=self.base_width, mark_hidden=True,
        )

    def _spectral_targets(self, params: list[Tensor], groups: list[dict[str, Any]]) -> list[float | None] | None:
        """Per hidden matrix ``sqrt(max(fan_out, fan_in) / scale)``: times the step's ``lr · scale``
        that is the spectral norm ``lr · sqrt(scale · max(fan_out, fan_in))``; None elsewhere."""
        if self.hidden_norm != "spectral":
            return None
        return [
            celo2.spectral_target(p.shape, g["update_scale"]) if g.get("hidden_matrix") else None
            for p, g in zip(params, groups)
        ]


__all__ = ["Celo2", "Celo2Base", "MuCelo2", "route_embeddings"]
