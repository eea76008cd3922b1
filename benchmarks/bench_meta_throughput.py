"""Meta-training throughput: the MetaTrainer's inner step against the bare vmapped step it is built on.

For each case (a CPU recipe's task instances and PES settings) two things are timed in one run,
interleaved round by round so that load from other processes hits both alike:

- **meta**: ``MetaTrainer.meta_gradient(step)`` for one meta-step, i.e. everything a meta-step does
  except the meta-optimizer's update of θ (perturbations, data sampling, the persistent unroll with
  its resets and bookkeeping, the PES estimate), divided by the truncation length;
- **bare**: the same number of inner steps as a tight loop over ``torch.func.vmap`` of forward +
  backward followed by :func:`~lightning_lopt.optim.particle_step.particle_step` on the same stacked
  particles, batches and θ, with nothing else.

Reported per case: the median seconds per inner step of both, their ratio (target ≤ 1.15), particle
inner steps per second, ns per parameter per particle step, and meta-steps per second. The step
implementation in use (fused or the vmapped pure step) is recorded.

Usage::

    python -m benchmarks.bench_meta_throughput                       # CPU recipes, 1 thread
    python -m benchmarks.bench_meta_throughput --threads 2
    python -m benchmarks.bench_meta_throughput --quick               # smoke configuration
    python -m benchmarks.bench_meta_throughput --device cuda

Writes ``benchmarks/results/meta_throughput-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_optimizer_step import machine_info, version_info
from lightning_lopt.meta import ImageMLPTask, LogUniformLengthSchedule, MetaTrainer, PES
from lightning_lopt.meta.estimator import stack_theta
from lightning_lopt.meta.rng import generator
from lightning_lopt.meta.unroll import make_loss_and_grad
from lightning_lopt.optim import particle_step as seam
from lightning_lopt.optim.functional import StepContext

BENCHMARK = "meta_throughput"
SCHEMA_VERSION = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    """A recipe-shaped meta-training configuration."""

    name: str
    lopt: str
    widths: tuple[int, ...]
    depth: int
    batch_size: int
    num_pairs: int
    trunc_length: int
    param: str = "mup"
    dataset: str = "digits"

    def build(self, device: str) -> MetaTrainer:
        task = ImageMLPTask(self.dataset, 8, widths=list(self.widths), depth=self.depth, param=self.param,
                            batch_size=self.batch_size)
        stage = {"stage": 1} if self.lopt == "celo" else {}
        meta = MetaTrainer(
            self.lopt, tasks=[task], estimator=PES(self.num_pairs, 0.01, self.trunc_length),
            truncation=LogUniformLengthSchedule(100, 1000), **stage,
        ).to(device)
        meta.setup("fit")
        return meta


CASES = {
    # The reference case: 16 particles of a depth-3, width-128 MLP on 8x8 inputs, batch 128.
    "mulo_s_cpu": Case("mulo_s_cpu", "mulo", (128,), 3, 128, 8, 50),
    "mulo_m_cpu": Case("mulo_m_cpu", "mulo", (32, 64, 128), 3, 128, 8, 50),
    "lo_m_cpu": Case("lo_m_cpu", "lo", (32, 64, 128), 3, 128, 8, 50, param="sp"),
    "celo_cpu": Case("celo_cpu", "celo", (32,), 1, 64, 8, 50, param="sp"),
    "digits_tiny": Case("digits_tiny", "mulo", (32,), 2, 64, 4, 20),
}
QUICK = {"quick": Case("quick", "mulo", (8,), 2, 16, 2, 4)}


def bare_inner_steps(meta: MetaTrainer, steps: int) -> Callable[[], None]:
    """A closure running ``steps`` bare inner steps of every instance (vmapped loss/grad + the step)."""
    flat = meta._theta_flat()
    n = len(meta.gradient_estimator.pairs)
    work = []
    for index, inst in enumerate(meta.instances):
        eps = 0.01 * torch.randn(n, flat.numel(), generator=torch.Generator().manual_seed(index)).to(flat.device)
        theta = stack_theta(meta.lopt, meta.trainable_names, flat, eps)
        params = [torch.stack([p] * (2 * n)) for p in inst.init(0)]
        state = seam.stack_state([meta.lopt.functional.init_state(
            {k: v[i] for k, v in theta.items()}, [p[i] for p in params], layout=meta.lopt.layout) for i in range(2 * n)])
        batches = inst.sample(steps, [generator(0, j) for j in range(n)])
        length = torch.full((2 * n,), 1000, device=flat.device)
        work.append((inst, theta, params, state, batches, make_loss_and_grad(inst, False), length))

    def run() -> None:
        for inst, theta, params, state, batches, loss_and_grad, length in work:
            for t in range(steps):
                batch = tuple(torch.cat([x[t], x[t]]) for x in batches)
                with torch.enable_grad():
                    loss, grads = loss_and_grad(params, None, batch)
                ctx = StepContext(inst.scales, loss.detach(), length)
                params, state = seam.particle_step(meta.lopt, theta, params, [g.detach() for g in grads], state, ctx)

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case: Case, device: torch.device, rounds: int) -> dict[str, Any]:
    meta = case.build(str(device))
    bare = bare_inner_steps(meta, case.trunc_length)
    meta.meta_gradient(0)  # warm-up: builds the particles
    bare()
    meta_times, bare_times = [], []
    for step in range(1, rounds + 1):
        order = [("meta", lambda s=step: meta.meta_gradient(s)), ("bare", bare)]
        for label, fn in order if step % 2 else order[::-1]:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            (meta_times if label == "meta" else bare_times).append(time.perf_counter() - start)
    per_step = case.trunc_length
    meta_s = statistics.median(meta_times) / per_step
    bare_s = statistics.median(bare_times) / per_step
    particles = 2 * len(meta.gradient_estimator.pairs)
    params = sum(i.num_params for i in meta.instances)
    instances = len(meta.instances)
    return {
        "case": case.__dict__,
        "params_per_particle": [i.num_params for i in meta.instances],
        "particles_per_instance": particles,
        "step_implementation": _implementation(meta, device),
        "meta_s_per_inner_step": meta_s,
        "bare_s_per_inner_step": bare_s,
        "overhead_ratio": meta_s / bare_s,
        "particle_inner_steps_per_s": particles * instances / meta_s,
        "ns_per_param_per_particle_step": meta_s / (particles * params) * 1e9,
        "meta_steps_per_s": 1.0 / (meta_s * per_step),
        "hours_per_1000_meta_steps": meta_s * per_step * 1000 / 3600,
        "rounds": rounds,
        "meta_times_s": meta_times,
        "bare_times_s": bare_times,
    }


def _implementation(meta: MetaTrainer, device: torch.device) -> str:
    entry = seam.implementation(type(meta.lopt))
    params = [torch.zeros(2, *s, device=device) for s in meta.instances[0].shapes]
    if entry is not None and entry[1](meta.lopt, params):
        return getattr(entry[0], "__qualname__", "registered")
    return "vmapped_pure_step"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed meta-steps per case")
    parser.add_argument("--quick", action="store_true", help="one tiny case, 2 rounds (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=None, help="file name stem (default meta_throughput-<device>-<date>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    cases = QUICK if args.quick else {k: CASES[k] for k in args.cases.split(",")}
    rounds = 2 if args.quick else args.rounds
    results = []
    for case in cases.values():
        row = measure(case, device, rounds)
        results.append(row)
        print(
            f"{case.name:12s} meta {row['meta_s_per_inner_step'] * 1e3:8.2f} ms/inner step  bare "
            f"{row['bare_s_per_inner_step'] * 1e3:8.2f}  ratio {row['overhead_ratio']:.3f}  "
            f"{row['particle_inner_steps_per_s']:8.1f} particle-steps/s  "
            f"{row['hours_per_1000_meta_steps']:.2f} h/1000 meta-steps  [{row['step_implementation']}]",
            flush=True,
        )
    machine = machine_info(device)
    report = {
        "benchmark": BENCHMARK,
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "benchmarks.bench_meta_throughput", *(argv or sys.argv[1:])]),
        "device": str(device),
        "threads": args.threads,
        "machine": machine,
        "versions": version_info(),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{BENCHMARK}-{device.type}-{datetime.date.today().isoformat()}"
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
