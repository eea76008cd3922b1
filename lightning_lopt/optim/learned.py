"""The shared ``torch.optim.Optimizer`` base of the learned optimizers (:class:`LearnedOptimizer`).

The classes users pick (``LO``, ``MuLO``, ``Celo``, ``VeLO``, ``MuVeLO``) are in
:mod:`lightning_lopt.optim.optimizers`, Celo2's in :mod:`lightning_lopt.optim.celo2`. Each is a thin
wrapper around the pure functional core (:mod:`lightning_lopt.optim.functional`): it gathers the
parameters that have gradients, calls the architecture's step once on all of them and writes the
results back. Because they are real optimizer classes, every PyTorch and Lightning surface works:
plain loops, ``configure_optimizers``, LightningCLI's ``--optimizer lightning_lopt.MuLO``, LR
schedulers (``lr`` multiplies the step), checkpoints and DDP.

**Meta-weights.** ``meta_weights`` is an architecture module (:mod:`lightning_lopt.optim.architectures`),
a directory / packaged name / hub id for :func:`~lightning_lopt.optim.pretrained.from_pretrained`, or
``None``: the first of the class's :attr:`~LearnedOptimizer.pretrained_names` that is packaged, else a
random meta-initialisation (with a ``UserWarning``; seeded with 0 so that DDP replicas agree). The
optimizer keeps a frozen copy, moved on the first step to the parameters' device in float32. It is
not part of ``param_groups`` nor of ``state_dict()``: rebuild the optimizer with the same weights
before ``load_state_dict``.

**The loss.** Celo and VeLO feed loss statistics to their learned scheduler. ``step`` takes the loss
from, in this order: ``step(loss=...)``; a hint set with :meth:`~LearnedOptimizer.set_loss_hint` (the
:class:`lightning_lopt.trainer.LossToOptimizer` callback does this in every Lightning fit, with the
*mean* loss over accumulated micro-batches); the closure's return value. Under DDP the loss is
averaged over the ranks before use, so the replicas take identical steps. A non-finite loss leaves
the scheduler's loss statistics and LSTM state unchanged for that step (warned once).

**The fused step.** On CPU in float32, ``LO``, ``MuLO`` and ``Celo`` run the fused C kernel of
:mod:`lightning_lopt.optim.fused` (compiled at first use, about 20x faster than the pure step and
with bounded transient memory), which updates parameters and state in place and matches the pure
step to float32 rounding. ``fused=None`` (default) uses it where available and otherwise the pure
step (one warning if the kernel cannot be built); ``fused=False`` always runs the pure step;
``fused=True`` fails instead of falling back. On CUDA they run the Triton step of
:mod:`lightning_lopt.optim.gpu` (in place, no host sync; ``gpu_numerics`` ``"fast"`` or
``"exact"``), and with ``fused=False`` the pure step evaluated in chunks (bounded scratch memory).
The choice among these is :mod:`lightning_lopt.optim.tensor_step`'s, behind one call.

**Sharded parameters.** ``LO``, ``MuLO`` and ``Celo`` step FSDP2 (``DTensor``) parameters with the
per-tensor statistics reduced across ranks, so the step equals one process's; their state is then
sharded ``DTensor``s. On CUDA the local blocks run the Triton step (in three phases, the
all-reduces between them), on CPU the fused C kernel in the same three phases. FSDP1 parameters are refused. See :mod:`lightning_lopt.optim.sharding` and
``docs/sharding.md``.

**State.** Per-tensor accumulators live in ``self.state[p]``; the global state (iteration counter,
loss buffer, Celo's LSTM state) lives under ``self.state["learned_optimizer"]``. Both hold only
tensors, so ``state_dict()`` loads with ``torch.load(..., weights_only=True)``, and a run resumed from
it continues bit-exactly. State is kept in float32 for bf16/fp16 parameters (the update is computed
in float32 and cast back); float64 parameters are computed in float64 when all of them are.
``state_dtype=torch.bfloat16`` stores the momenta and the second moment in bf16 (8 B/param instead
of 16) with stochastic rounding (:mod:`lightning_lopt.optim.bf16_state`).

"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_lopt.optim import pretrained, sharding, tensor_step
from lightning_lopt.optim.architectures import LearnedOptimizerModule
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.fused import driver as fused_driver
from lightning_lopt.optim.scaling import scaled_param_groups
from lightning_lopt.optim.step_contract import GLOBAL_STATE_KEY
from lightning_lopt.optim.step_loss import resolve_loss
from lightning_lopt.optim.stuck_tensors import StuckTensorCheck

#: The seed of the random meta-initialisation used when no weights are packaged.
RANDOM_META_SEED = 0

MetaWeights = LearnedOptimizerModule | str | PathLike | None
LossLike = Tensor | float
#: The storage dtypes of the per-element accumulators ``m`` and ``rms``.
STATE_DTYPES = (torch.float32, torch.bfloat16)


class LearnedOptimizer(torch.optim.Optimizer):
    """Shared implementation of the learned optimizers; use one of the subclasses.

    Subclasses set the class attributes below and define ``__init__`` with their own signature
    (LightningCLI and :func:`lightning_lopt.optim.build` read it), forwarding to this one.

    Args:
        params: parameters, ``named_parameters()`` pairs or param-group dicts. Groups may set their
            own ``lr``, ``weight_decay`` and (μ variants) ``update_scale``.
        lr: multiplies every tensor's step (1.0 = the step the optimizer was meta-trained with).
            Per group; LR schedulers work as usual.
        meta_weights: see the module docstring.
        weight_decay: decoupled weight decay ``p ← p − lr · weight_decay · p`` (the pre-update
            ``p``), not multiplied by the μP update scale.
        num_steps: the training horizon T, for the architectures that use one.
        scales: μ variants: ``{parameter name: update scale}`` for named parameters.
        allow_sp: μ variants: give parameters without μP information scale 1 instead of failing.
        fused: use the fused CPU kernel: ``None`` where available (else the pure step), ``False``
            never, ``True`` always (an error where it cannot run). See the module docstring.
        state_dtype: storage of ``m`` and ``rms``: ``torch.float32`` or ``torch.bfloat16``.
    """

    #: The architecture module this optimizer runs.
    module_class: ClassVar[type[LearnedOptimizerModule]]
    #: Builds the random meta-initialisation (called with ``generator=``).
    module_factory: ClassVar[Callable[..., LearnedOptimizerModule]]
    #: Packaged weight names tried, in order, when ``meta_weights`` is None.
    pretrained_names: ClassVar[tuple[str, ...]] = ()
    #: Whether per-tensor μP update scales are required (otherwise every scale is 1).
    mu: ClassVar[bool] = False
    #: Whether the step needs the loss and a horizon (Celo, VeLO).
    needs_loss: ClassVar[bool] = False
    #: Its name in :mod:`~lightning_lopt.optim.registry`, ``MetaTrainer(lopt=...)`` and ``--optimizers``.
    registry_name: ClassVar[str]
    #: Whether ``MetaTrainer`` meta-trains it by name, from :meth:`meta_module`.
    meta_trainable: ClassVar[bool] = True
    #: Whether meta-training runs in stages (Celo: 1, then 2; see :meth:`frozen_in_stage`).
    staged: ClassVar[bool] = False
    #: Constructor settings measured to hold on runs far past the default weights' meta-training
    #: episodes (with a warmup + cosine schedule), named by ``lightning_lopt.trainer.long_run_advice``.
    long_run_settings: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def meta_module(cls, stage: int) -> LearnedOptimizerModule:
        """The fresh θ module ``MetaTrainer`` meta-trains for this optimizer (``stage``: staged ones only)."""
        return cls.module_factory()

    @classmethod
    def frozen_in_stage(cls, stage: int | None) -> Callable[[str], bool]:
        """Which θ entries (by name) stay fixed in meta-training ``stage``: none unless :attr:`staged`."""
        return lambda name: False
    #: Numerics of the GPU step (:mod:`lightning_lopt.optim.gpu`): ``"fast"`` (tensor cores) or ``"exact"``.
    gpu_numerics: str = "fast"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        *,
        meta_weights: MetaWeights = None,
        weight_decay: float = 0.0,
        num_steps: int | None = None,
        scales: Mapping[str, float] | None = None,
        allow_sp: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        name = type(self).__name__
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"{name}: lr must be a non-negative number, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"{name}: weight_decay must be a non-negative number, got {weight_decay!r}")
        if self.needs_loss:
            if num_steps is None:
                raise ValueError(
                    f"{name} needs num_steps, the length of training in optimizer steps: its learned "
                    "scheduler reads the fraction of training done and loss averages whose half-lives "
                    "scale with it. lightning_lopt.Trainer(optimizer=...) fills it from "
                    "trainer.estimated_stepping_batches."
                )
            if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
                raise ValueError(f"{name}: num_steps must be a positive integer, got {num_steps!r}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"{name}: state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype!r}")
        self.num_steps = num_steps
        self.fused = fused
        self.state_dtype = state_dtype
        self._scales = dict(scales) if scales is not None else None
        self._allow_sp = allow_sp
        groups = self._scaled_groups(params)
        super().__init__(groups, {"lr": float(lr), "weight_decay": float(weight_decay)})
        all_params = [p for g in self.param_groups for p in g["params"]]
        sharding.check_not_fsdp1(all_params, name)
        # float64 models keep float64 arithmetic; everything else computes in float32.
        float64 = all(p.dtype == torch.float64 for p in all_params)
        self.compute_dtype = torch.float64 if float64 else torch.float32
        #: The meta-weights in use: a frozen private copy of the architecture module.
        self.meta_weights = self._load_meta_weights(meta_weights).requires_grad_(False)
        if fused and not fused_driver.architecture_supported(self.meta_weights):
            raise ValueError(f"{name}: fused=True, but the fused kernel does not implement this configuration")
        if any(sharding.is_dtensor(p) for p in all_params):  # FSDP2: the state exists before any step
            sharding.init_state(self, all_params)
        #: The loss the last step used (after the DDP average where the architecture uses it).
        self.last_loss: Tensor | None = None
        self._loss_hint: Tensor | None = None
        self._warned_nonfinite = False
        self._stuck_check = StuckTensorCheck(type(self).__name__)

    # -- construction -------------------------------------------------------------------------

    def _scaled_groups(self, params: Iterable[Any]) -> list[dict[str, Any]]:
        """Param groups that each carry one ``update_scale`` (names dropped, see ``scaled_param_groups``)."""
        owner = type(self).__name__
        if self.mu:
            return scaled_param_groups(params, self._scales, allow_sp=self._allow_sp, owner=owner)
        items = list(params)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        # SP: scale 1 everywhere, even where the model carries μP information.
        return scaled_param_groups([{**g, "update_scale": 1.0} for g in groups], owner=owner)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (e.g. layers unfrozen while fine-tuning); its update scales are resolved here."""
        for group in self._scaled_groups([param_group]):
            super().add_param_group(group)

    @classmethod
    def default_meta_weights(cls) -> str | None:
        """The packaged weights used when ``meta_weights`` is None: the first of
        :attr:`pretrained_names` that is packaged, or ``None`` (a random meta-initialisation)."""
        available = pretrained.available()
        return next((n for n in cls.pretrained_names if n in available), None)

    def _load_meta_weights(self, meta_weights: MetaWeights) -> LearnedOptimizerModule:
        name = type(self).__name__
        if meta_weights is None:
            meta_weights = self.default_meta_weights()
            if meta_weights is None:
                warnings.warn(
                    f"{name}: no pretrained meta-weights are packaged (looked for "
                    f"{list(self.pretrained_names)}), so it uses a RANDOM meta-initialisation (seed "
                    f"{RANDOM_META_SEED}), which does not train well. Pass meta_weights=<directory, "
                    "packaged name or hub id> or an architecture module.",
                    UserWarning,
                    stacklevel=4,
                )
                generator = torch.Generator().manual_seed(RANDOM_META_SEED)
                return self.module_factory(generator=generator)
        if isinstance(meta_weights, (str, PathLike)):
            module = pretrained.from_pretrained(meta_weights)
        else:
            # A private copy: later changes to the caller's module (e.g. meta-training) do not leak in.
            module = copy.deepcopy(meta_weights)
        if not isinstance(module, self.module_class):
            raise TypeError(
                f"{name} runs {self.module_class.__name__} meta-weights, got {type(module).__name__}"
            )
        return module

    # -- the loss -----------------------------------------------------------------------------

    def set_loss_hint(self, loss: LossLike | None) -> None:
        """Offer the loss for the next :meth:`step` (used unless ``step(loss=...)`` is given).

        :class:`lightning_lopt.trainer.LossToOptimizer` calls this with the mean micro-batch loss,
        which covers gradient accumulation, ``16-mixed`` (no closure) and manual optimization.
        The hint is consumed by the next step.
        """
        # Called through Lightning's LightningOptimizer wrapper, ``self`` is the wrapper, whose
        # attribute writes would not reach the optimizer that steps.
        target = getattr(self, "_optimizer", self)
        target._loss_hint = None if loss is None else torch.as_tensor(loss).detach()

    def _resolve_loss(self, candidate: Any, device: torch.device) -> Tensor | None:
        """The loss for the step (see :func:`lightning_lopt.optim.step_loss.resolve_loss`)."""
        loss, self._warned_nonfinite = resolve_loss(
            candidate,
            owner=type(self).__name__,
            needs_loss=self.needs_loss,
            device=device,
            dtype=self.compute_dtype,
            warned_nonfinite=self._warned_nonfinite,
        )
        return loss

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: LossLike | None = None) -> Any:
        """One learned-optimizer update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (Lightning passes one); called
                with gradients enabled before anything else.
            loss: the loss at the current parameters; takes precedence over a hint and the closure.

        Returns:
            The closure's value when a closure was given (as torch optimizers do), else the loss
            this step used (``None`` if none).
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        hint, self._loss_hint = self._loss_hint, None
        candidate = next((x for x in (loss, hint, closure_loss) if x is not None), None)

        params, groups = self._params_with_grads()
        if not params:
            return closure_loss if closure is not None else candidate
        device = params[0].device
        used_loss = self._resolve_loss(candidate, device)
        self.last_loss = used_loss

        module = self._meta_weights_on(device)
        # lr multiplies the step: every core multiplies its final per-tensor step by the scale last,
        # so folding lr into the scale is exact (and lr = 1 reproduces the pure step bit for bit).
        scales = [g["update_scale"] * g["lr"] for g in groups]
        # small_fc_lopt ignores the horizon; only MuCelo2 asks for spectral normalisation
        ctx = StepContext(scales, used_loss, self.num_steps or 0, self._spectral_targets(params, groups))
        if any(sharding.is_dtensor(p) for p in params):  # FSDP2: local blocks, statistics reduced over ranks
            sharding.sharded_step(self, module, params, groups, ctx)
            return closure_loss if closure is not None else used_loss
        self._init_missing_state(module, params)
        grads = [p.grad for p in params]
        self._stuck_check(module, params, grads)
        state = {**self.state[GLOBAL_STATE_KEY], "tensors": [self.state[p] for p in params]}
        weight_decays = [g["lr"] * g["weight_decay"] for g in groups]
        new_state = tensor_step.step_in_place(module, params, grads, state, ctx, weight_decays, self._step_options())
        self.state[GLOBAL_STATE_KEY] = {k: v for k, v in new_state.items() if k != "tensors"}
        for p, accumulators in zip(params, new_state["tensors"]):
            self.state[p] = accumulators
        return closure_loss if closure is not None else used_loss

    def _spectral_targets(self, params: list[Tensor], groups: list[dict[str, Any]]) -> list[float | None] | None:
        """``StepContext.spectral`` for this step's tensors: None (no spectral normalisation) here."""
        return None

    def _step_options(self) -> tensor_step.StepOptions:
        """What this optimizer asks of :func:`lightning_lopt.optim.tensor_step.step_in_place`."""
        return tensor_step.StepOptions(
            type(self).__name__, self.fused, self.compute_dtype, self.state_dtype, self.gpu_numerics
        )

    def _params_with_grads(self) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """The parameters to update and their groups; parameters without a gradient are skipped."""
        params: list[Tensor] = []
        groups: list[dict[str, Any]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                        f"{list(p.shape)}); use a dense embedding (sparse=False)"
                    )
                params.append(p)
                groups.append(group)
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise RuntimeError(
                f"{type(self).__name__}: all parameters must be on one device, found {sorted(map(str, devices))}"
            )
        return params, groups

    def _meta_weights_on(self, device: torch.device) -> LearnedOptimizerModule:
        """The meta-weights on ``device`` in the compute dtype (moved once, on first use)."""
        first = next(self.meta_weights.parameters())
        if first.device != device or first.dtype != self.compute_dtype:
            self.meta_weights.to(device=device, dtype=self.compute_dtype)
        return self.meta_weights

    def _init_missing_state(self, module: LearnedOptimizerModule, params: list[Tensor]) -> None:
        """Fresh state for parameters stepped for the first time, and the global state on the first step."""
        fresh = [i for i, p in enumerate(params) if not self.state.get(p)]
        if not fresh and GLOBAL_STATE_KEY in self.state:
            return
        init = module.init_state([params[i].detach().to(self.compute_dtype) for i in fresh])
        if GLOBAL_STATE_KEY not in self.state:
            self.state[GLOBAL_STATE_KEY] = {k: v for k, v in init.items() if k != "tensors"}
        for i, accumulators in zip(fresh, init["tensors"]):
            self.state[params[i]] = {
                k: v.to(self.state_dtype) if k in ("m", "rms") else v for k, v in accumulators.items()
            }

    # -- checkpoints --------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; per-tensor state keeps its saved dtype (float32 for bf16 params).

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to each parameter's dtype,
        which would round float32 state to bf16, so the per-tensor entries are restored as saved.
        They are copies: the fused step updates state in place, and must not write into tensors
        that the ``state_dict`` (or another optimizer) still holds.
        """
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for index, p in zip(ids, params):
            if index in saved:
                self.state[p] = {k: v.to(p.device, copy=True) for k, v in saved[index].items()}



__all__ = ["GLOBAL_STATE_KEY", "LearnedOptimizer", "MetaWeights", "RANDOM_META_SEED"]
