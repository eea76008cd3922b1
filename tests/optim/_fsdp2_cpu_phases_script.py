"""FSDP2 through the fused CPU kernel's phases, against one process (used by test_sharded.py).

Run as ``python _fsdp2_cpu_phases_script.py OUT_DIR WORLD_SIZE PORT [SKIP_ROUND]`` (gloo CPU ranks).
The optimizers' default dispatch sends the local blocks through
:func:`lightning_lopt.optim.fused.driver.sharded_step_in_place` (kernel.c's phases 1, 2, 3). Every
rank feeds the same batches, so FSDP2's averaged gradients equal one process's, and compares, after
5 steps, the gathered parameters with unsharded copies stepped by the fused and by the pure step. The weights put
the factored axis d0 on the split axis 0 ([8, 3]: ``v_row`` replicated), d1 on it ([5, 8]: the mean
of ``v_row`` over d1 crosses the shards), axis 0 outside the factored axes (the convolution's [3, 8,
5, 1]: both tables keep the split axis), a square ([5, 5]) and one row ([1, 5] and the biases of 1:
empty local shards); 3 and 5 rows over 2 or 3 ranks are uneven. ``SKIP_ROUND`` (1 or 2) leaves that
round's sums unreduced, to show that the comparison catches a missing reduction. Each rank writes
``OUT_DIR/rank<r>.json``: the error, how far the reference moved, the local rows, how many steps
took the kernel's phases and how many ``reduce`` calls each step made.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import lightning_lopt as llo
from lightning_lopt.optim import sharding
from lightning_lopt.optim.fused import driver

STEPS = 5
SCALES = {"0.weight": 1.0, "2.weight": 1 / 8, "5.weight": 1 / 3, "7.weight": 1 / 8, "9.weight": 1 / 5, "11.weight": 1 / 5}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 40), nn.Unflatten(1, (8, 5, 1)), nn.Conv2d(8, 3, (5, 1)),
        nn.Flatten(), nn.Tanh(), nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 5),
        nn.Tanh(), nn.Linear(5, 1),
    )


def make_optimizer(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    if name == "LO":
        return llo.LO(model.parameters(), **kwargs)
    if name == "MuLO":
        return llo.MuLO(model.named_parameters(), scales=SCALES, allow_sp=True, **kwargs)
    return llo.Celo(model.parameters(), num_steps=10, **kwargs)


def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(step)  # the same batch on every rank
        x = torch.randn(16, 3, generator=generator)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }


def max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run(rank: int, world: int, out_dir: str, port: int, skip_round: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    phase_steps, reduce_calls = [0], []
    phased, all_reduce = driver.sharded_step_in_place, sharding._all_reduce

    def counted_phases(*args, **kwargs):
        phase_steps[0] += 1
        return phased(*args, **kwargs)

    def counted_all_reduce(group):
        reduce = all_reduce(group)
        reduce_calls.append(0)

        def counted(flat):
            reduce_calls[-1] += 1
            return flat if reduce_calls[-1] == skip_round else reduce(flat)

        return counted

    driver.sharded_step_in_place = counted_phases
    sharding._all_reduce = counted_all_reduce
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, object] = {}
    for name in ("LO", "MuLO", "Celo"):
        reference = make_model()
        start = full(reference)
        train(reference, make_optimizer(name, reference, fused=False))
        expected = full(reference)
        # The same kernel on one process: what the sharded phases must reproduce up to the order of
        # the reductions. (The kernel itself is within 1e-5 of the pure step, tests/optim/test_fused*.py;
        # on this model about 5e-7 for MuLO, too close to 1e-6 to compare the sharded step with the
        # pure one at 1e-6 on every CPU.)
        fused_reference = make_model()
        train(fused_reference, make_optimizer(name, fused_reference, fused=True))
        expected_fused = full(fused_reference)

        model = make_model()
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        phase_steps[0], reduce_calls[:] = 0, []
        opt = make_optimizer(name, model)
        train(model, opt)
        state = opt.state_dict()["state"]
        result[name] = {
            "error": max_error(full(model), expected),
            "error_vs_fused": max_error(full(model), expected_fused),
            "moved": max_error(expected, start),
            "local_rows": [p.to_local().shape[0] for p in model.parameters()],
            "phase_steps": phase_steps[0],
            "reduce_calls": list(reduce_calls),
            "state_is_dtensor": all(
                type(v).__name__ == "DTensor" for s in state.values() for k, v in s.items()
                if not k.startswith(sharding.GLOBAL_PREFIX)
            ),
        }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    skip = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    mp.spawn(run, args=(world, out, port, skip), nprocs=world)
