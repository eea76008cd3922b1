"""What the FSDP2 rank scripts (tests/optim/_fsdp2_*_script.py) share on each process.

The scripts run as ``python tests/optim/_fsdp2_..._script.py``, so this directory is on
``sys.path`` (and on the spawned ranks'): they import this module by name. Each rank joins the
process group, shards a model, trains it on the same batches as every other rank, gathers the
parameters and writes what it measured to ``OUT_DIR/rank<r>.json``.

Example::

    import _fsdp2_helpers as fsdp2

    fsdp2.init_rank(rank, world, port)
    model = fsdp2.shard(make_model(), init_device_mesh("cpu", (world,)))
    fsdp2.train(model, opt, range(5), in_features=3)
    fsdp2.finish(out_dir, rank, fsdp2.measured(model, opt, expected, start))
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_lopt.optim import sharding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _process_group
from _process_group import tear_down  # noqa: E402


def init_rank(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    """Join the ``world``-rank process group on this machine; one intra-op thread (ranks share few CPUs).
    A rank that dies of a signal (an abort in C++) prints its Python stack, so a failure says where."""
    faulthandler.enable(all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    torch.set_num_threads(1)


def finish(out_dir: str, rank: int, result: dict[str, object]) -> None:
    """Write this rank's ``result`` to ``OUT_DIR/rank<r>.json`` and end the process with the other
    ranks (``tests/_process_group.tear_down``: why it does not return)."""
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    tear_down()


def shard(model: nn.Module, mesh, layers: tuple[type[nn.Module], ...] = (nn.Linear,)) -> nn.Module:
    """FSDP2 on every child of ``model`` of the types ``layers``, then on ``model`` itself."""
    for layer in model:
        if isinstance(layer, layers):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: range, in_features: int, device: torch.device | str = "cpu"
) -> None:
    """Steps ``steps`` of a squared-output loss; step ``t``'s batch is seeded by ``t``, so every rank
    (and the unsharded reference) sees the same batches and FSDP2's averaged gradients equal one process's."""
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, in_features, generator=generator).to(device)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state, sharded entries gathered into whole tensors (copies)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }


def max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over the entries of two states with the same keys."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def measured(
    model: nn.Module, opt: torch.optim.Optimizer, expected: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> dict[str, object]:
    """What every script reports of a sharded run against the unsharded reference's ``expected``
    state (which started at ``start``): the error, how far the reference moved, this rank's rows of
    axis 0 of each parameter, and whether every per-parameter state tensor is a DTensor (the learned
    optimizer's global state aside)."""
    state = opt.state_dict()["state"]
    per_parameter = [v for s in state.values() for k, v in s.items() if not k.startswith(sharding.GLOBAL_PREFIX)]
    return {
        "error": max_error(full(model), expected),
        "moved": max_error(expected, start),
        "local_rows": [p.to_local().shape[0] for p in model.parameters()],
        "state_is_dtensor": all(type(v).__name__ == "DTensor" for v in per_parameter),
    }


def count_phases_and_reductions(phases: ModuleType, skip_round: int = 0) -> tuple[list[int], list[int]]:
    """Count the sharded steps that take ``phases.sharded_step_in_place`` and the ``reduce`` calls of
    each step (one :func:`lightning_lopt.optim.sharding._all_reduce` per step), by wrapping both.

    Returns ``(phase_steps, reduce_calls)``: ``phase_steps[0]`` counts the steps, ``reduce_calls``
    holds one count per step; the caller resets them. ``skip_round`` (1 or 2) leaves that round's
    sums unreduced, to show that a comparison catches a missing reduction.
    """
    phase_steps: list[int] = [0]
    reduce_calls: list[int] = []
    phased, all_reduce = phases.sharded_step_in_place, sharding._all_reduce

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

    phases.sharded_step_in_place = counted_phases
    sharding._all_reduce = counted_all_reduce
    return phase_steps, reduce_calls
