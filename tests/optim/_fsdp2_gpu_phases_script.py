"""FSDP2 through the GPU step's Triton phases, against one process (used by test_sharded.py).

Run as ``TRITON_INTERPRET=1 python _fsdp2_gpu_phases_script.py OUT_DIR WORLD_SIZE PORT`` (gloo CPU
ranks: Triton's interpreter runs the kernels on CPU tensors, and the test hook
:data:`lightning_lopt.optim.sharding.TRITON_ON_CPU` sends the CPU blocks through
:func:`lightning_lopt.optim.gpu.step.sharded_step_in_place`, the CUDA path), or with a fifth
argument ``cuda`` (NCCL, one rank per GPU, the real kernels). Every rank feeds the same batches, so
FSDP2's averaged gradients equal one process's, and compares, after a few steps with
``gpu_numerics="exact"``, the gathered parameters with an unsharded copy stepped by the pure step.
The weights put the factored axis d0 on the split axis 0 ([8, 3]: ``v_row`` replicated), d1 on it
([5, 8]: the mean of ``v_row`` over d1 crosses the shards), a square ([5, 5]) and one row ([1, 5]
and the biases of 1: empty local shards); 5 rows over 2 or 3 ranks are uneven. Each rank writes
``OUT_DIR/rank<r>.json``: the error, how far the reference moved, the local rows, how many steps
took the Triton phases and how many ``reduce`` calls each step made.
"""

from __future__ import annotations

import os
import sys

import _fsdp2_helpers as fsdp2
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import lightning_lopt as llo
from lightning_lopt.optim import sharding
from lightning_lopt.optim.gpu import step as gpu_step

STEPS = 3
IN_FEATURES = 3
SCALES = {"0.weight": 1.0, "2.weight": 1 / 8, "4.weight": 1 / 5, "6.weight": 1 / 5}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)
    )


def make_optimizer(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    if name == "LO":
        opt = llo.LO(model.parameters(), **kwargs)
    elif name == "MuLO":
        opt = llo.MuLO(model.named_parameters(), scales=SCALES, allow_sp=True, **kwargs)
    else:
        opt = llo.Celo(model.parameters(), num_steps=10, **kwargs)
    opt.gpu_numerics = "exact"
    return opt


def run(rank: int, world: int, out_dir: str, port: int, device_type: str) -> None:
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    fsdp2.init_rank(rank, world, port, "nccl" if device.type == "cuda" else "gloo")
    sharding.TRITON_ON_CPU = device.type == "cpu"
    phase_steps, reduce_calls = fsdp2.count_phases_and_reductions(gpu_step)
    mesh = init_device_mesh(device.type, (world,))
    result: dict[str, object] = {}
    for name in ("LO", "MuLO", "Celo"):
        reference = make_model().to(device)
        start = fsdp2.full(reference)
        fsdp2.train(reference, make_optimizer(name, reference, fused=False), range(STEPS), IN_FEATURES, device)
        expected = fsdp2.full(reference)

        model = fsdp2.shard(make_model().to(device), mesh)
        phase_steps[0], reduce_calls[:] = 0, []
        opt = make_optimizer(name, model)
        fsdp2.train(model, opt, range(STEPS), IN_FEATURES, device)
        result[name] = {
            **fsdp2.measured(model, opt, expected, start),
            "phase_steps": phase_steps[0],
            "reduce_calls": list(reduce_calls),
        }
    fsdp2.finish(out_dir, rank, result)


if __name__ == "__main__":
    out, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    device_type = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("on CPU, run with TRITON_INTERPRET=1 (Triton's interpreter runs the kernels on CPU tensors)")
    mp.spawn(run, args=(world, out, port, device_type), nprocs=world)
