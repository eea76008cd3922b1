"""The all-reduce overhead of the sharded (FSDP2) learned-optimizer step, on gloo CPU ranks or CUDA.

A μMLP-shaped stack of Linear layers is sharded with ``fully_shard`` over ``--world`` processes;
random fixed gradients are set once (no forward/backward is timed). For each optimizer it times
``optimizer.step()`` on every rank, and, inside it, every ``torch.distributed.all_reduce`` call
(the time includes waiting for the slower rank). Baselines measured in the same run by every rank
at once, on the unsharded parameters: the pure step (``fused=False``, the code the sharded step
runs on each CPU block) and the default fused step.

``--device cuda``: one rank per GPU (NCCL; ``--world`` at most the number of GPUs, 1 on a one-GPU
machine, where the all-reduces still run through NCCL over one rank). The sharded step then runs
the Triton phases (``lightning_lopt.optim.gpu.step.sharded_step_in_place``); on CPU the fused
kernel's phases (``lightning_lopt.optim.fused.driver.sharded_step_in_place``). On both, the pure core
on the same sharded parameters (``fused=False``) is timed too, as ``sharded_pure_core``. The device is
synchronised around every timed step and every all-reduce (NCCL calls return before they finish),
so the sharded step's time includes those synchronisations.

Usage::

    python benchmarks/bench_sharded_step.py --world 2 --width 1024 --repeats 20
    python benchmarks/bench_sharded_step.py --device cuda --world 1 --width 4096 --repeats 20

Writes ``benchmarks/results/sharded_step-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizer_step import machine_info, version_info  # noqa: E402

import lightning_lopt as llo  # noqa: E402

OPTIMIZERS = ("mulo", "celo")


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def make_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    if name == "mulo":
        return llo.MuLO(params, allow_sp=True, **kwargs)
    return llo.Celo(params, num_steps=1000, **kwargs)


def set_grads(model: nn.Module, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        full = (torch.randn(p.shape, generator=generator) * 1e-2).to(device)
        if isinstance(p, DTensor):
            local = full.chunk(p.device_mesh.size())[p.device_mesh.get_local_rank()] if p.shape[0] else full
            rows = p.to_local().shape[0]
            p.grad = DTensor.from_local(local[:rows].contiguous(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        else:
            p.grad = full


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": statistics.median(values) * 1e3,
        "p10_ms": ordered[int(0.1 * (len(values) - 1))] * 1e3,
        "p90_ms": ordered[int(0.9 * (len(values) - 1))] * 1e3,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt: torch.optim.Optimizer, repeats: int, warmup: int, device: torch.device) -> list[float]:
    times = []
    for index in range(warmup + repeats):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        opt.step(loss=torch.tensor(2.0, device=device))
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh(device.type, (world,))
    calls: list[tuple[int, float]] = []
    original = dist.all_reduce

    def timed_all_reduce(tensor, *a, **k):
        _sync(device)
        start = time.perf_counter()
        result = original(tensor, *a, **k)
        _sync(device)
        calls.append((tensor.numel(), time.perf_counter() - start))
        return result

    def time_sharded(name: str, fused: bool | None) -> dict[str, Any]:
        model = make_model(args.width).to(device)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        set_grads(model, device)
        opt = make_optimizer(name, model.parameters(), fused=fused)
        for _ in range(args.warmup):
            opt.step(loss=torch.tensor(2.0, device=device))
        steps, reduce_time, reduce_calls, reduce_floats = [], [], [], []
        for _ in range(args.repeats):
            calls.clear()
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            opt.step(loss=torch.tensor(2.0, device=device))
            _sync(device)
            steps.append(time.perf_counter() - start)
            reduce_time.append(sum(t for _, t in calls))
            reduce_calls.append(len(calls))
            reduce_floats.append(sum(n for n, _ in calls))
        return {
            "step": summary(steps),
            "all_reduce": summary(reduce_time),
            "all_reduce_calls_per_step": reduce_calls[0],
            "all_reduce_floats_per_step": reduce_floats[0],
            "all_reduce_share_of_step_median": statistics.median(r / s for r, s in zip(reduce_time, steps)),
        }

    dist.all_reduce = timed_all_reduce  # learned.py and sharding.py call it through the module
    results: dict[str, Any] = {}
    for name in OPTIMIZERS:
        sharded = time_sharded(name, None)
        item = {
            "sharded_step": sharded.pop("step"),
            **sharded,
        }
        # The pure core on the same sharded parameters (fused=False): what the blocks ran before the phases.
        pure = time_sharded(name, False)
        item["sharded_pure_core"] = {"step": pure["step"], "all_reduce": pure["all_reduce"]}
        dist.barrier()
        # One-process baselines on the unsharded parameters, same machine, same run. Every rank
        # runs them at once (Celo's loss average is a collective; the load matches the sharded run).
        dist.all_reduce = original
        full = make_model(args.width).to(device)
        set_grads(full, device)
        for label, fused in (("one_process_pure_step", False), ("one_process_fused_step", None)):
            params = [nn.Parameter(p.detach().clone()) for p in full.parameters()]
            for p, q in zip(params, full.parameters()):
                p.grad = q.grad
            baseline = make_optimizer(name, params, fused=fused)
            item[label] = summary(time_steps(baseline, args.repeats, args.warmup, device))
        dist.all_reduce = timed_all_reduce
        item["sharded_vs_one_process_pure"] = item["sharded_step"]["median_ms"] / item["one_process_pure_step"]["median_ms"]
        item["sharded_vs_one_process_fused"] = (
            item["sharded_step"]["median_ms"] / item["one_process_fused_step"]["median_ms"]
        )
        dist.barrier()
        results[name] = item
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not 1 <= args.world <= torch.cuda.device_count():
        parser.error(f"--device cuda needs 1 <= --world <= {torch.cuda.device_count()} (one rank per GPU)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scratch = Path(f"/tmp/bench_sharded_step-{os.getpid()}.json")
    mp.spawn(run, args=(args.world, port, args, str(scratch)), nprocs=args.world)
    date = datetime.date.today().isoformat()
    out = args.out or Path(__file__).parent / "results" / f"sharded_step-{args.device}-{date}.json"
    n_params = sum(p.numel() for p in make_model(args.width).parameters())
    report = {
        "benchmark": "sharded_step",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(torch.device(args.device)),
        "versions": version_info(),
        "world": args.world,
        "device": args.device,
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "threads_per_rank": 1,
        "model": f"Linear 784-{args.width}-{args.width}-10, fully_shard per layer, Shard(0)",
        "num_params": n_params,
        "repeats": args.repeats,
        "results": json.loads(scratch.read_text()),
    }
    scratch.unlink()
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
