"""Time one optimizer step, and measure optimizer state, for every optimizer on model-shaped parameters.

What is timed: ``optimizer.step()`` alone. Gradients are set once (random, fixed) before timing, so the
forward/backward pass is excluded. Each optimizer first takes ``--warmup`` untimed steps (which also
creates its state), then ``--repeats`` timed steps. On CUDA every timed step has a
``torch.cuda.synchronize()`` on either side (the protocol of the anchor numbers in
docs/reference/pylo.md#h100-step-times).

Noise control: by default on CPU the optimizers of one case are *interleaved*: each round times one
step of every optimizer, in an order rotated every round, so a burst of load from other processes
hits all of them alike; on CUDA they run one after another (less memory). CPU runs use one intra-op
thread by default (``--threads``): on a shared machine, multi-threaded kernels stall on descheduled
sibling threads. Reported: median, p10 and p90 of the per-step times, and the ratio of each median to
the median of the reference, the first AdamW in the optimizer list, measured in the same run
(``adamw-fused`` on CUDA, ``adamw-foreach`` on CPU). All optimizers of a case update the *same*
parameter tensors (each keeps its own state), so memory holds one copy of parameters and gradients;
``params_finite_after`` records that the shared parameters stayed finite.

State: the bytes of every tensor in ``optimizer.state`` (per-parameter and global entries, shared
storage counted once) divided by the number of parameters; AdamW keeps 8 B/param (+4 B per tensor
for its step counter).

Parameter sets ("cases"):

- ``mlp-w{256,1024,2048}``: :class:`lightning_lopt.models.MuMLP` on 784 inputs, depth 3, 10 classes,
  with its real μP update scales.
- ``gpt2-*``: the tensor list of a GPT-2-style decoder (token and position embeddings, per block
  LayerNorms, fused QKV, attention projection, 4x MLP, final LayerNorm; ``nn.Linear`` layout, readout
  tied to the token embedding). μP scales: 1/fan_in on hidden matrices, 1 on embeddings, biases and
  norms. ``gpt2-124m`` and ``gpt2-355m`` are shape-faithful to GPT-2 small and medium;
  ``gpt2-1.3b`` is the d_model 2048, 24-layer shape of the 1.3B anchor; ``gpt2-cpu`` is scaled down.
- ``conv-cpu``: four 3x3 conv kernels (``[out, in, 3, 3]``, 1.1M parameters) and their biases:
  Celo2 normalises and orthogonalises them per kernel position (nine ``in × out`` slices each).
- ``many-small``: 256 tensors of 64 elements; its time divided by 256 is the fixed cost per tensor
  (Python and kernel-launch overhead), which dominates models with many small tensors.
- ``mlp-particles16``: the meta-training inner step: 16 particles (each its own θ) of a MuMLP
  64-128x3-10 (8x8 inputs, 42,634 parameters each), stacked on a leading axis and stepped through
  :func:`lightning_lopt.optim.particle_step.particle_step` (the meta-trainer's seam), as one call
  for all 16; AdamW steps the same stacked tensors.

- ``vit-b16``: the tensor list of torchvision's ViT-B/16 (patch-embedding conv, class token,
  position embedding, 12 encoder blocks with fused in-projection, 1000-class head); μP scales
  1/fan_in on hidden matrices.

Learned optimizers: ``lo``, ``mulo`` and ``celo`` use the fused CPU kernel on CPU and the Triton GPU
step on CUDA (:mod:`lightning_lopt.optim.gpu`, fast numerics) where they run (the default,
``fused=None``); ``mulo-exact`` is the GPU step in exact numerics; ``lo-pure``, ``mulo-pure`` and
``celo-pure`` force the pure functional step (``fused=False``; on CUDA it is evaluated in chunks,
in place); ``celo2`` and ``celo2-base`` run Celo2's fused CPU step on CPU (the kernel's element-wise
part, Newton–Schulz in torch) and the pure step elsewhere, ``celo2-pure`` and ``celo2-base-pure``
the pure step (Celo2Base has no Newton–Schulz, so ``celo2 − celo2-base`` is its cost); ``mulo-bf16`` keeps bf16 state. On CUDA each result records ``peak_step_extra_bytes``
(the scratch memory of one step: ``torch.cuda.max_memory_allocated`` during the step minus the
memory allocated before it) and that as a fraction of the parameters' bytes. On a particle case the ``-pure`` variants
run the vmapped pure step (``vmapped_pure_step``) and the others the registered fused step.

Threads: ``--threads 1 2`` repeats the whole run at each intra-op thread count (the fused kernel
uses ``torch.get_num_threads()`` threads); ratios are to AdamW at the same thread count.

The learned optimizers run with random meta-weights when none are packaged (their warning is
filtered and recorded as ``random_meta_weights``); the step cost does not depend on the weights.

Usage::

    python -m benchmarks.bench_optimizer_step                 # CPU default suite (< 5 min)
    python -m benchmarks.bench_optimizer_step --quick         # tiny smoke configuration
    python -m benchmarks.bench_optimizer_step --device cuda   # GPT-2 124M/355M/1.3B, ViT-B/16, fused AdamW

Each run writes ``benchmarks/results/<name>-<device>-<date>.json`` (see ``--out`` and ``--name``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

import lightning_lopt
from lightning_lopt import provenance
from lightning_lopt.models import MuMLP
from lightning_lopt.optim import build, resolve
from lightning_lopt.optim.functional import StepContext
from lightning_lopt.optim.learned import LearnedOptimizer
from lightning_lopt.optim.particle_step import (
    particle_step,
    stack_state,
    vmapped_pure_step,
)

BENCHMARK = "optimizer_step"
SCHEMA_VERSION = 2
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: The horizon handed to the optimizers that need one (Celo, VeLO, μVeLO); it does not change the cost.
NUM_STEPS = 1000
#: The loss handed to every learned optimizer's step (Celo and VeLO need one).
LOSS = 2.3


class TensorSpec(NamedTuple):
    """One parameter tensor of a case: its name, shape and μP update scale."""

    name: str
    shape: tuple[int, ...]
    scale: float


@dataclass(frozen=True)
class Case:
    """A named parameter set shaped like a real model."""

    name: str
    description: str
    specs: Callable[[], list[TensorSpec]]
    #: > 0: every tensor is stacked over this many particles and learned optimizers step them
    #: through the meta-training seam (``particle_step``).
    particles: int = 0


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one benchmarked optimizer through :func:`lightning_lopt.optim.build`."""

    registry_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Skipped on cases with more than ``--velo-max-params`` parameters (VeLO's LSTM state and
    #: per-element work are the largest).
    capped: bool = False
    #: Attributes set on the optimizer after it is built (e.g. ``gpu_numerics``).
    attributes: dict[str, Any] = field(default_factory=dict)


def mlp_specs(width: int, depth: int = 3, in_features: int = 784, num_classes: int = 10) -> list[TensorSpec]:
    """The tensors and μP scales of ``MuMLP(in_features, width, depth, num_classes)``."""
    model = MuMLP(in_features, width, depth, num_classes)
    scales = model.update_scales()
    return [TensorSpec(n, tuple(p.shape), float(scales[n])) for n, p in model.named_parameters()]


def gpt2_specs(d_model: int, n_layer: int, vocab: int, n_ctx: int) -> list[TensorSpec]:
    """The tensors of a GPT-2-style decoder (``nn.Linear`` layout ``[out, in]``, tied readout).

    Hidden matrices get μP scale ``1 / fan_in``; embeddings, biases and LayerNorms get 1.
    """
    d = d_model
    specs = [TensorSpec("wte.weight", (vocab, d), 1.0), TensorSpec("wpe.weight", (n_ctx, d), 1.0)]
    for i in range(n_layer):
        h = f"h.{i}"
        specs += [
            TensorSpec(f"{h}.ln_1.weight", (d,), 1.0),
            TensorSpec(f"{h}.ln_1.bias", (d,), 1.0),
            TensorSpec(f"{h}.attn.c_attn.weight", (3 * d, d), 1.0 / d),
            TensorSpec(f"{h}.attn.c_attn.bias", (3 * d,), 1.0),
            TensorSpec(f"{h}.attn.c_proj.weight", (d, d), 1.0 / d),
            TensorSpec(f"{h}.attn.c_proj.bias", (d,), 1.0),
            TensorSpec(f"{h}.ln_2.weight", (d,), 1.0),
            TensorSpec(f"{h}.ln_2.bias", (d,), 1.0),
            TensorSpec(f"{h}.mlp.c_fc.weight", (4 * d, d), 1.0 / d),
            TensorSpec(f"{h}.mlp.c_fc.bias", (4 * d,), 1.0),
            TensorSpec(f"{h}.mlp.c_proj.weight", (d, 4 * d), 1.0 / (4 * d)),
            TensorSpec(f"{h}.mlp.c_proj.bias", (d,), 1.0),
        ]
    return specs + [TensorSpec("ln_f.weight", (d,), 1.0), TensorSpec("ln_f.bias", (d,), 1.0)]


def vit_specs(width: int = 768, depth: int = 12, mlp_dim: int = 3072, patch: int = 16, image: int = 224,
              num_classes: int = 1000) -> list[TensorSpec]:
    """The tensors of torchvision's ``vit_b_16`` (its parameter names and shapes).

    μP scales: 1/fan_in on the hidden matrices (attention in/out projections, MLP), 1 elsewhere.
    """
    d = width
    tokens = (image // patch) ** 2 + 1
    specs = [
        TensorSpec("class_token", (1, 1, d), 1.0),
        TensorSpec("conv_proj.weight", (d, 3, patch, patch), 1.0),
        TensorSpec("conv_proj.bias", (d,), 1.0),
        TensorSpec("encoder.pos_embedding", (1, tokens, d), 1.0),
    ]
    for i in range(depth):
        layer = f"encoder.layers.encoder_layer_{i}"
        specs += [
            TensorSpec(f"{layer}.ln_1.weight", (d,), 1.0),
            TensorSpec(f"{layer}.ln_1.bias", (d,), 1.0),
            TensorSpec(f"{layer}.self_attention.in_proj_weight", (3 * d, d), 1.0 / d),
            TensorSpec(f"{layer}.self_attention.in_proj_bias", (3 * d,), 1.0),
            TensorSpec(f"{layer}.self_attention.out_proj.weight", (d, d), 1.0 / d),
            TensorSpec(f"{layer}.self_attention.out_proj.bias", (d,), 1.0),
            TensorSpec(f"{layer}.ln_2.weight", (d,), 1.0),
            TensorSpec(f"{layer}.ln_2.bias", (d,), 1.0),
            TensorSpec(f"{layer}.mlp.0.weight", (mlp_dim, d), 1.0 / d),
            TensorSpec(f"{layer}.mlp.0.bias", (mlp_dim,), 1.0),
            TensorSpec(f"{layer}.mlp.3.weight", (d, mlp_dim), 1.0 / mlp_dim),
            TensorSpec(f"{layer}.mlp.3.bias", (d,), 1.0),
        ]
    return specs + [
        TensorSpec("encoder.ln.weight", (d,), 1.0),
        TensorSpec("encoder.ln.bias", (d,), 1.0),
        TensorSpec("heads.head.weight", (num_classes, d), 1.0),
        TensorSpec("heads.head.bias", (num_classes,), 1.0),
    ]


def conv_specs(channels: Sequence[int] = (64, 128, 128, 256, 256), kernel: int = 3) -> list[TensorSpec]:
    """Conv weights ``[out, in, k, k]`` (μP scale 1/fan_in) and their biases."""
    specs = []
    for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
        specs.append(TensorSpec(f"conv{i}.weight", (c_out, c_in, kernel, kernel), 1.0 / (c_in * kernel * kernel)))
        specs.append(TensorSpec(f"conv{i}.bias", (c_out,), 1.0))
    return specs


CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case("mlp-w32", "MuMLP 784-32x3-10 (smoke test)", lambda: mlp_specs(32)),
        Case("mlp-w256", "MuMLP 784-256x3-10", lambda: mlp_specs(256)),
        Case("mlp-w1024", "MuMLP 784-1024x3-10", lambda: mlp_specs(1024)),
        Case("mlp-w2048", "MuMLP 784-2048x3-10", lambda: mlp_specs(2048)),
        Case(
            "gpt2-tiny",
            "GPT-2-shaped, d_model 32, 1 layer, vocab 256, context 32 (smoke test)",
            lambda: gpt2_specs(32, 1, 256, 32),
        ),
        Case(
            "gpt2-cpu",
            "GPT-2-shaped, d_model 256, 2 layers, vocab 2048, context 256 (scaled down for CPU)",
            lambda: gpt2_specs(256, 2, 2048, 256),
        ),
        Case(
            "conv-cpu",
            "four 3x3 conv kernels, 64→128→128→256→256 channels, with biases (conv weights: rank 4)",
            conv_specs,
        ),
        Case(
            "many-small",
            "256 vectors of 64 elements: isolates the fixed cost per tensor",
            lambda: [TensorSpec(f"bias.{i}", (64,), 1.0) for i in range(256)],
        ),
        Case(
            "mlp-particles16",
            "meta-training inner step: 16 particles of MuMLP 64-128x3-10 (42,634 parameters each)",
            lambda: mlp_specs(128, depth=3, in_features=64),
            particles=16,
        ),
        Case("gpt2-124m", "GPT-2 small: d_model 768, 12 layers, vocab 50257, context 1024", lambda: gpt2_specs(768, 12, 50257, 1024)),
        Case("gpt2-355m", "GPT-2 medium: d_model 1024, 24 layers, vocab 50257, context 1024", lambda: gpt2_specs(1024, 24, 50257, 1024)),
        Case("gpt2-1.3b", "1.3B decoder: d_model 2048, 24 layers, vocab 50257, context 1024", lambda: gpt2_specs(2048, 24, 50257, 1024)),
        Case("vit-b16", "torchvision ViT-B/16: width 768, 12 layers, 224x224, 1000 classes", vit_specs),
        Case("vit-tiny", "ViT-shaped, width 32, 1 layer, 32x32 images, 10 classes (smoke test)",
             lambda: vit_specs(32, 1, 64, 16, 32, 10)),
    ]
}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw-foreach": OptimizerSpec("adamw", {"lr": 1e-3, "foreach": True}),
    "adamw-fused": OptimizerSpec("adamw", {"lr": 1e-3, "fused": True}),
    "muadam": OptimizerSpec("muadam", {"lr": 1e-3}),
    "lo": OptimizerSpec("lo"),
    "mulo": OptimizerSpec("mulo"),
    "celo": OptimizerSpec("celo", {"num_steps": NUM_STEPS}),
    "lo-pure": OptimizerSpec("lo", {"fused": False}),
    "mulo-pure": OptimizerSpec("mulo", {"fused": False}),
    "celo-pure": OptimizerSpec("celo", {"num_steps": NUM_STEPS, "fused": False}),
    "mulo-bf16": OptimizerSpec("mulo", {"state_dtype": torch.bfloat16}),
    "mulo-exact": OptimizerSpec("mulo", attributes={"gpu_numerics": "exact"}),
    "velo": OptimizerSpec("velo", {"num_steps": NUM_STEPS}, capped=True),
    "muvelo": OptimizerSpec("muvelo", {"num_steps": NUM_STEPS}),
    # Celo2Base is Celo2's element-wise part alone (no Newton–Schulz): Celo2 minus it is the
    # orthogonalisation's cost. Both run the fused CPU step by default; "-pure" forces the pure step.
    "celo2": OptimizerSpec("celo2"),
    "celo2-base": OptimizerSpec("celo2-base"),
    "celo2-pure": OptimizerSpec("celo2", {"fused": False}),
    "celo2-base-pure": OptimizerSpec("celo2-base", {"fused": False}),
    # MuCelo2's spectral steps on hidden matrices (the default) against its RMS rule: the difference
    # is the Gram matrix of spectral_normalize.
    "mucelo2": OptimizerSpec("mucelo2"),
    "mucelo2-rms": OptimizerSpec("mucelo2", {"hidden_norm": "rms"}),
}

#: (cases, optimizers, warmup, repeats) per preset.
PRESETS: dict[str, tuple[list[str], list[str], int, int]] = {
    "quick": (["mlp-w32", "gpt2-tiny", "vit-tiny"], ["adamw-foreach", "muadam", "lo", "mulo", "celo", "velo", "muvelo"], 1, 3),
    "cpu": (
        ["mlp-w256", "mlp-w1024", "gpt2-cpu", "many-small"],
        ["adamw-foreach", "muadam", "lo", "mulo", "celo", "velo", "muvelo"],
        1,
        5,
    ),
    "cuda": (
        ["gpt2-124m", "gpt2-355m", "gpt2-1.3b", "vit-b16", "many-small", "mlp-particles16"],
        ["adamw-fused", "muadam", "lo", "mulo", "celo", "mulo-exact", "mulo-bf16", "mulo-pure"],
        3,
        10,
    ),
}


# -- statistics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty sequence")
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state``; tensors sharing storage are counted once."""
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for t in _tensors(list(optimizer.state.values())):
        key = (str(t.device), t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


# -- environment ----------------------------------------------------------------------------------


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Platform, CPU, GPU and the load average at the time of the call."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": provenance.cpu_model(),
        "gpu": gpu,
        "torch_num_threads": torch.get_num_threads(),
        "loadavg_start": _loadavg(),
    }


def version_info() -> dict[str, Any]:
    """Python, torch, CUDA, lightning_lopt and the git commit (with a dirty flag)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning_lopt": lightning_lopt.__version__,
        "git_commit": provenance.git_commit(),
        "git_dirty": provenance.git_dirty(),
    }


# -- the measurement ------------------------------------------------------------------------------


def make_params(
    specs: Sequence[TensorSpec], device: torch.device, seed: int, particles: int = 0
) -> list[torch.nn.Parameter]:
    """Parameters with fixed random gradients; each carries its μP scale as ``lopt_update_scale``.

    With ``particles > 0`` every tensor has a leading particle axis of that size.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for spec in specs:
        shape = (particles, *spec.shape) if particles else spec.shape
        p = torch.nn.Parameter(0.02 * torch.randn(shape, device=device, generator=generator))
        p.grad = 1e-3 * torch.randn(shape, device=device, generator=generator)
        p.lopt_update_scale = spec.scale  # what lightning_lopt.models.scales.attach_update_scales sets
        params.append(p)
    return params


@dataclass
class Runner:
    """One optimizer under test: how to step it and the per-step times collected so far."""

    name: str
    optimizer: torch.optim.Optimizer
    random_meta_weights: bool
    samples_ms: list[float] = field(default_factory=list)
    peak_extra_bytes: int | None = None

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step; learned optimizers get the loss (Celo and VeLO need it)."""
        if isinstance(self.optimizer, LearnedOptimizer):
            self.optimizer.step(loss=loss)
        else:
            self.optimizer.step()


class ParticleStepper:
    """A learned optimizer stepping stacked particles through the meta-training seam.

    θ is the optimizer's meta-initialisation, perturbed per particle (as PES does); the loss is the
    benchmark's constant for every particle. Quacks like an optimizer for :class:`Runner` and
    :func:`state_nbytes` (``step()`` and ``state``).
    """

    def __init__(self, registry_name: str, kwargs: dict[str, Any], params: list[torch.nn.Parameter], particles: int) -> None:
        cls = resolve(registry_name)
        if not (isinstance(cls, type) and issubclass(cls, LearnedOptimizer)):
            raise TypeError(f"{registry_name!r} is not a learned optimizer: particle cases step learned optimizers only")
        generator = torch.Generator().manual_seed(0)
        self.module = cls.module_factory(generator=generator).to(params[0].device)
        self.theta = {
            k: v.detach().unsqueeze(0) + 1e-3 * torch.randn((particles, *v.shape), generator=generator).to(v.device)
            for k, v in self.module.state_dict().items()
        }
        self.params = [p.detach().clone() for p in params]
        self.grads = [p.grad for p in params]
        self.scales = [float(getattr(p, "lopt_update_scale", 1.0)) if cls.mu else 1.0 for p in params]
        self.loss = torch.full((particles,), LOSS, device=params[0].device)
        self.num_steps = kwargs.get("num_steps", NUM_STEPS)
        self.fn = vmapped_pure_step if kwargs.get("fused") is False else particle_step
        particle_states = [
            self.module.functional.init_state(
                {k: v[i] for k, v in self.theta.items()}, [p[i] for p in self.params], layout=self.module.layout
            )
            for i in range(particles)
        ]
        state = stack_state(particle_states)
        if "state_dtype" in kwargs:  # m and rms in bf16, as the optimizer classes keep them
            for acc in state["tensors"]:
                acc["m"], acc["rms"] = acc["m"].to(kwargs["state_dtype"]), acc["rms"].to(kwargs["state_dtype"])
        self.state = {"particles": state}

    def step(self) -> None:
        ctx = StepContext(self.scales, self.loss, self.num_steps)
        with torch.no_grad():
            self.params, self.state["particles"] = self.fn(
                self.module, self.theta, self.params, self.grads, self.state["particles"], ctx
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_runner(name: str, params: list[torch.nn.Parameter], particles: int = 0) -> Runner:
    """Build a benchmarked optimizer, recording whether it fell back to random meta-weights.

    On a particle case (``particles > 0``) each learned optimizer becomes a :class:`ParticleStepper`.
    """
    spec = OPTIMIZERS[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learned = isinstance(cls := resolve(spec.registry_name), type) and issubclass(cls, LearnedOptimizer)
        if particles and learned:
            optimizer = ParticleStepper(spec.registry_name, spec.kwargs, params, particles)
        else:
            optimizer = build(spec.registry_name, params, **spec.kwargs)
            for key, value in spec.attributes.items():
                setattr(optimizer, key, value)
    random_meta = isinstance(optimizer, ParticleStepper) or any(
        "RANDOM meta-initialisation" in str(w.message) for w in caught
    )
    return Runner(name, optimizer, random_meta)


def time_step(runner: Runner, loss: torch.Tensor, device: torch.device) -> float:
    """Milliseconds of one step, with a device sync on either side."""
    _sync(device)
    start = time.perf_counter()
    runner.step(loss)
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def measure_peak(runner: Runner, loss: torch.Tensor, device: torch.device) -> None:
    """CUDA only: the peak memory one step allocates beyond what was allocated before it."""
    if device.type != "cuda":
        return
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    runner.step(loss)
    _sync(device)
    runner.peak_extra_bytes = torch.cuda.max_memory_allocated(device) - before


#: Failures recorded per optimizer instead of ending the run (CUDA out-of-memory is a RuntimeError).
RECOVERABLE = (RuntimeError, ValueError, MemoryError)


def _error_result(name: str, err: BaseException) -> dict[str, Any]:
    return {"optimizer": name, "status": "error", "error": f"{type(err).__name__}: {err}"[:500]}


def _ok_result(runner: Runner, num_params: int, param_bytes: int) -> dict[str, Any]:
    nbytes = state_nbytes(runner.optimizer)
    spec = OPTIMIZERS[runner.name]
    return {
        "optimizer": runner.name,
        "status": "ok",
        "registry_name": spec.registry_name,
        "kwargs": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in spec.kwargs.items()},
        "random_meta_weights": runner.random_meta_weights,
        "median_ms": statistics.median(runner.samples_ms),
        "p10_ms": percentile(runner.samples_ms, 10),
        "p90_ms": percentile(runner.samples_ms, 90),
        "min_ms": min(runner.samples_ms),
        "samples_ms": runner.samples_ms,
        "state_bytes": nbytes,
        "state_bytes_per_param": nbytes / num_params,
        "peak_step_extra_bytes": runner.peak_extra_bytes,
        "peak_step_extra_fraction_of_param_bytes": (
            None if runner.peak_extra_bytes is None else runner.peak_extra_bytes / param_bytes
        ),
    }


def run_batch(
    names: Sequence[str],
    params: list[torch.nn.Parameter],
    loss: torch.Tensor,
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    log: Callable[[str], None],
    particles: int = 0,
) -> dict[str, dict[str, Any]]:
    """Build, warm up and time the optimizers ``names`` together, in rounds of one step each.

    Round ``r`` steps the optimizers in an order rotated by ``r``. An optimizer that fails (e.g. runs
    out of memory) is recorded as an error and dropped; the others go on.
    """
    results: dict[str, dict[str, Any]] = {}
    runners: list[Runner] = []

    def fail(name: str, err: BaseException) -> None:
        results[name] = _error_result(name, err)
        log(f"   {name}: {results[name]['error']}")

    for name in names:
        try:
            runner = build_runner(name, params, particles)
            for _ in range(warmup):
                runner.step(loss)
            _sync(device)
            runners.append(runner)
        except RECOVERABLE as err:
            fail(name, err)
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(runners) if runners else 0
            for runner in runners[shift:] + runners[:shift]:
                if runner.name in results:
                    continue
                try:
                    runner.samples_ms.append(time_step(runner, loss, device))
                except RECOVERABLE as err:
                    fail(runner.name, err)
        for runner in runners:
            if runner.name not in results:
                try:
                    measure_peak(runner, loss, device)
                except RECOVERABLE as err:
                    fail(runner.name, err)
    finally:
        gc.enable()
    for runner in runners:
        if runner.name not in results:
            results[runner.name] = _ok_result(
                runner, sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
            )
    return results


def run_case(
    case: Case,
    optimizer_names: Sequence[str],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    interleave: bool,
    velo_max_params: int,
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Benchmark every optimizer on one parameter set; returns the case's JSON record."""
    specs = case.specs()
    num_params = sum(math.prod(s.shape) for s in specs) * max(1, case.particles)
    params = make_params(specs, device, seed, case.particles)
    loss = torch.tensor(LOSS, device=device)
    log(f"== {case.name}: {num_params:,} parameters in {len(specs)} tensors")

    results: dict[str, dict[str, Any]] = {}
    todo = []
    for name in optimizer_names:
        if OPTIMIZERS[name].capped and num_params > velo_max_params:
            results[name] = {
                "optimizer": name,
                "status": "skipped",
                "reason": f"{num_params:,} parameters > --velo-max-params {velo_max_params:,}",
            }
        else:
            todo.append(name)

    # Interleaved: all optimizers live at once and take turns. Sequential: one at a time (less memory).
    for batch in [todo] if interleave else [[name] for name in todo]:
        results.update(
            run_batch(
                batch, params, loss, device=device, warmup=warmup, repeats=repeats, log=log, particles=case.particles
            )
        )
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ordered = [results[name] for name in optimizer_names]
    reference = next((r for r in ordered if r["optimizer"].startswith("adamw") and r["status"] == "ok"), None)
    for r in ordered:
        if r["status"] == "ok":
            r["ratio_vs_adamw"] = r["median_ms"] / reference["median_ms"] if reference else None
            r["ns_per_param"] = r["median_ms"] * 1e6 / num_params
            log(
                f"   {r['optimizer']:<14} median {r['median_ms']:10.2f} ms {r['ns_per_param']:8.1f} ns/param  "
                f"[p10 {r['p10_ms']:.2f}, p90 {r['p90_ms']:.2f}]  "
                f"x{r['ratio_vs_adamw'] or float('nan'):8.1f} vs {reference['optimizer'] if reference else '-'}  "
                f"state {r['state_bytes_per_param']:.2f} B/param"
                + (
                    f"  scratch {r['peak_step_extra_fraction_of_param_bytes']:.1%} of the params"
                    if r["peak_step_extra_fraction_of_param_bytes"] is not None
                    else ""
                )
            )
    return {
        "name": case.name,
        "description": case.description,
        "num_params": num_params,
        "num_tensors": len(specs),
        "particles": case.particles,
        "reference": reference["optimizer"] if reference else None,
        "params_finite_after": all(bool(torch.isfinite(p).all()) for p in params),
        "results": ordered,
    }


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; presets fill whatever was not given."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_optimizer_step", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    parser.add_argument(
        "--cases", nargs="+", choices=list(CASES), metavar="CASE", help=f"parameter sets: {', '.join(CASES)}"
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(OPTIMIZERS),
        metavar="OPT",
        help=f"optimizers: {', '.join(OPTIMIZERS)}; the first AdamW is the reference of the ratios",
    )
    parser.add_argument("--warmup", type=int, help="untimed steps per optimizer before timing")
    parser.add_argument("--repeats", type=int, help="timed steps per optimizer")
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        help="time the optimizers of a case in turns (default on CPU) or one after another (default on CUDA)",
    )
    parser.add_argument("--velo-max-params", type=int, help="skip VeLO above this many parameters")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        help="torch.set_num_threads, one run per value (a sweep: --threads 1 2); 0 keeps torch's default (default: 1 on CPU, because intra-op threads "
        "on a shared machine wait on descheduled siblings; 0 on CUDA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of the JSON result")
    parser.add_argument("--name", help=f"result file prefix (default {BENCHMARK!r}, or '{BENCHMARK}-quick')")
    args = parser.parse_args(argv)

    preset = "quick" if args.quick else args.device
    cases, optimizers, warmup, repeats = PRESETS[preset]
    args.preset = preset
    args.cases = args.cases or cases
    args.optimizers = args.optimizers or optimizers
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = repeats if args.repeats is None else args.repeats
    args.interleave = args.device == "cpu" if args.interleave is None else args.interleave
    if args.velo_max_params is None:
        args.velo_max_params = 400_000_000 if args.device == "cuda" else 1_000_000
    if args.threads is None:
        args.threads = [1] if args.device == "cpu" else [0]
    args.name = args.name or (f"{BENCHMARK}-quick" if args.quick else BENCHMARK)
    if args.warmup < 0 or args.repeats < 1 or min(args.threads) < 0:
        parser.error("--warmup and --threads must be >= 0 and --repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its JSON; returns the process exit code."""
    args = parse_args(argv)
    device = torch.device(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info(device)
    config = {
        "preset": args.preset,
        "device": args.device,
        "cases": args.cases,
        "optimizers": args.optimizers,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "interleave": args.interleave,
        "velo_max_params": args.velo_max_params,
        "num_steps": NUM_STEPS,
        "loss": LOSS,
        "seed": args.seed,
        "threads": args.threads,
        "dtype": "float32",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    print(f"optimizer step benchmark on {args.device} ({machine['cpu_model']}, {machine['gpu']}), "
          f"load {machine['loadavg_start']}", flush=True)
    sweep = []
    for threads in args.threads:
        if threads:
            torch.set_num_threads(threads)
        print(f"-- {torch.get_num_threads()} thread(s)", flush=True)
        cases = [
            run_case(
                CASES[name],
                args.optimizers,
                device=device,
                warmup=args.warmup,
                repeats=args.repeats,
                interleave=args.interleave,
                velo_max_params=args.velo_max_params,
                seed=args.seed,
                log=lambda line: print(line, flush=True),
            )
            for name in args.cases
        ]
        sweep.append({"threads": torch.get_num_threads(), "cases": cases})
    machine["loadavg_end"] = _loadavg()
    finished = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "benchmark": BENCHMARK,
        "schema_version": SCHEMA_VERSION,
        "started": started.isoformat(timespec="seconds"),
        "wall_s": round((finished - started).total_seconds(), 1),
        "machine": machine,
        "versions": version_info(),
        "config": config,
        # The first thread count's cases (the default run); ``sweep`` holds every thread count's.
        "cases": sweep[0]["cases"],
        "sweep": sweep,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}-{args.device}-{started.date().isoformat()}.json"
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} ({record['wall_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
