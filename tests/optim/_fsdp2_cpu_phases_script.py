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

import sys

import _fsdp2_helpers as fsdp2
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import lightning_lopt as llo
from lightning_lopt.optim.fused import driver

STEPS = 5
IN_FEATURES = 3
SCALES = {"0.weight": 1.0, "2.weight": 1 / 8, "5.weight": 1 / 3, "7.weight": 1 / 8, "9.weight": 1 / 5, "11.weight": 1 / 5}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 8), nn.Tanh(), nn.Linear(8, 40), nn.Unflatten(1, (8, 5, 1)), nn.Conv2d(8, 3, (5, 1)),
        nn.Flatten(), nn.Tanh(), nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 5),
        nn.Tanh(), nn.Linear(5, 1),
    )


def make_optimizer(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    if name == "LO":
        return llo.LO(model.parameters(), **kwargs)
    if name == "MuLO":
        return llo.MuLO(model.named_parameters(), scales=SCALES, allow_sp=True, **kwargs)
    return llo.Celo(model.parameters(), num_steps=10, **kwargs)


def run(rank: int, world: int, out_dir: str, port: int, skip_round: int) -> None:
    fsdp2.init_rank(rank, world, port)
    phase_steps, reduce_calls = fsdp2.count_phases_and_reductions(driver, skip_round)
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, object] = {}
    for name in ("LO", "MuLO", "Celo"):
        reference = make_model()
        start = fsdp2.full(reference)
        fsdp2.train(reference, make_optimizer(name, reference, fused=False), range(STEPS), IN_FEATURES)
        expected = fsdp2.full(reference)
        # The same kernel on one process: what the sharded phases must reproduce up to the order of
        # the reductions. (The kernel itself is within 1e-5 of the pure step, tests/optim/test_fused*.py;
        # on this model about 5e-7 for MuLO, too close to 1e-6 to compare the sharded step with the
        # pure one at 1e-6 on every CPU.)
        fused_reference = make_model()
        fsdp2.train(fused_reference, make_optimizer(name, fused_reference, fused=True), range(STEPS), IN_FEATURES)
        expected_fused = fsdp2.full(fused_reference)

        model = fsdp2.shard(make_model(), mesh, layers=(nn.Linear, nn.Conv2d))
        phase_steps[0], reduce_calls[:] = 0, []
        opt = make_optimizer(name, model)
        fsdp2.train(model, opt, range(STEPS), IN_FEATURES)
        result[name] = {
            **fsdp2.measured(model, opt, expected, start),
            "error_vs_fused": fsdp2.max_error(fsdp2.full(model), expected_fused),
            "phase_steps": phase_steps[0],
            "reduce_calls": list(reduce_calls),
        }
    fsdp2.finish(out_dir, rank, result)


if __name__ == "__main__":
    out, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    skip = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    mp.spawn(run, args=(world, out, port, skip), nprocs=world)
