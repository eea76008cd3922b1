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

import sys
from pathlib import Path

import _fsdp2_helpers as fsdp2
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import lightning_lopt as llo

STEPS = 5
IN_FEATURES = 7
RESUME_AT = 3
SCALES = {"0.weight": 1.0, "0.bias": 1.0, "2.weight": 1 / 5, "2.bias": 1.0, "4.weight": 1 / 5, "4.bias": 1.0}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1))


def make_optimizer(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    if name == "LO":
        return llo.LO(model.parameters(), **kwargs)
    if name == "MuLO":
        return llo.MuLO(model.named_parameters(), scales=SCALES, **kwargs)
    return llo.Celo(model.parameters(), num_steps=20, **kwargs)


def run(rank: int, world: int, out_dir: str, port: int) -> None:
    fsdp2.init_rank(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, object] = {}
    for name in ("LO", "MuLO", "Celo"):
        reference = make_model()
        start = fsdp2.full(reference)
        reference_opt = make_optimizer(name, reference, fused=False)
        fsdp2.train(reference, reference_opt, range(STEPS), IN_FEATURES)
        expected = fsdp2.full(reference)

        model = fsdp2.shard(make_model(), mesh)
        opt = make_optimizer(name, model)
        fsdp2.train(model, opt, range(STEPS), IN_FEATURES)
        result[name] = fsdp2.measured(model, opt, expected, start)
        got = fsdp2.full(model)

        # Resume: save after RESUME_AT steps, load into a fresh model and optimizer, finish.
        model = fsdp2.shard(make_model(), mesh)
        opt = make_optimizer(name, model)
        fsdp2.train(model, opt, range(RESUME_AT), IN_FEATURES)
        path = Path(out_dir) / f"checkpoint-{name}"
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
        resumed = fsdp2.shard(make_model(), mesh)
        resumed_opt = make_optimizer(name, resumed)  # its state exists already: dcp loads into it
        template = {"model": resumed.state_dict(), "optim": resumed_opt.state_dict()}
        dcp.load(template, checkpoint_id=path)
        resumed.load_state_dict(template["model"])
        resumed_opt.load_state_dict(template["optim"])
        fsdp2.train(resumed, resumed_opt, range(RESUME_AT, STEPS), IN_FEATURES)
        result[name]["resume_error"] = fsdp2.max_error(fsdp2.full(resumed), got)

    if world == 2:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = FullyShardedDataParallel(make_model(), use_orig_params=True, device_id=torch.device("cpu"))
        try:
            llo.MuLO(fsdp1.parameters(), allow_sp=True)
            result["fsdp1_error"] = None
        except TypeError as error:
            result["fsdp1_error"] = str(error)
    fsdp2.finish(out_dir, rank, result)


if __name__ == "__main__":
    out, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(run, args=(world, out, port), nprocs=world)
