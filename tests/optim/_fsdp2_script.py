"""FSDP2 on gloo CPU: LO, MuLO and Celo on sharded parameters against one process (used by test_sharded.py).

Run as ``python _fsdp2_script.py OUT_DIR WORLD_SIZE PORT``. Every rank feeds the same batches, so
FSDP2's averaged gradients equal the one-process gradients, and compares, after 5 steps, the
gathered sharded parameters with an unsharded copy stepped by the pure step. The shapes give
uneven shards (5 rows over 2 or 3 ranks) and empty local shards (1 row over 2 or 3 ranks), a
square matrix (the factored axes' tie rule) and biases. Also checks that a
``torch.distributed.checkpoint`` save after 3 steps, loaded into a fresh model and optimizer,
continues bit-exactly, and (2 ranks) that FSDP1 parameters are refused. Each rank writes
``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import lightning_lopt as llo

STEPS = 5
RESUME_AT = 3
SCALES = {"0.weight": 1.0, "0.bias": 1.0, "2.weight": 1 / 5, "2.bias": 1.0, "4.weight": 1 / 5, "4.bias": 1.0}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1))


def shard(model: nn.Module, mesh) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def make_optimizer(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    if name == "LO":
        return llo.LO(model.parameters(), **kwargs)
    if name == "MuLO":
        return llo.MuLO(model.named_parameters(), scales=SCALES, **kwargs)
    return llo.Celo(model.parameters(), num_steps=20, **kwargs)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)  # the same batch on every rank
        x = torch.randn(16, 7, generator=generator)
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


def run(rank: int, world: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, object] = {}
    for name in ("LO", "MuLO", "Celo"):
        reference = make_model()
        start = full(reference)
        reference_opt = make_optimizer(name, reference, fused=False)
        train(reference, reference_opt, range(STEPS))
        expected = full(reference)

        model = shard(make_model(), mesh)
        opt = make_optimizer(name, model)
        train(model, opt, range(STEPS))
        got = full(model)
        state = opt.state_dict()["state"]
        result[name] = {
            "error": max_error(got, expected),
            "moved": max_error(expected, start),
            "local_rows": [p.to_local().shape[0] for p in model.parameters()],
            "state_is_dtensor": all(
                type(v).__name__ == "DTensor" for s in state.values() for k, v in s.items() if not k.startswith("learned_optimizer.")
            ),
        }

        # Resume: save after RESUME_AT steps, load into a fresh model and optimizer, finish.
        model = shard(make_model(), mesh)
        opt = make_optimizer(name, model)
        train(model, opt, range(RESUME_AT))
        path = Path(out_dir) / f"checkpoint-{name}"
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
        resumed = shard(make_model(), mesh)
        resumed_opt = make_optimizer(name, resumed)  # its state exists already: dcp loads into it
        template = {"model": resumed.state_dict(), "optim": resumed_opt.state_dict()}
        dcp.load(template, checkpoint_id=path)
        resumed.load_state_dict(template["model"])
        resumed_opt.load_state_dict(template["optim"])
        train(resumed, resumed_opt, range(RESUME_AT, STEPS))
        result[name]["resume_error"] = max_error(full(resumed), got)

    if world == 2:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = FullyShardedDataParallel(make_model(), use_orig_params=True, device_id=torch.device("cpu"))
        try:
            llo.MuLO(fsdp1.parameters(), allow_sp=True)
            result["fsdp1_error"] = None
        except TypeError as error:
            result["fsdp1_error"] = str(error)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(run, args=(world, out, port), nprocs=world)
