"""The tensor table and the launches of the GPU step: many tensors per launch, no host sync.

A :class:`Plan` describes one step's tensors (all particles): the int64 job table the kernels read
(sizes, the 5-D view around the factored axes, raw pointers), the block maps of the 1-D grids and
the workspace offsets. Plans are cached by the tensors' addresses and shapes, so a training loop
builds its plan once and every later step (or a CUDA-graph replay) only launches kernels.

The two passes are separately callable (the FSDP2 sharded step all-reduces between them):

- :func:`statistics` (phases 1-3) → ``stats [n_jobs, 32]``: per tensor, the SUM over its elements
  of each MLP input channel squared (channels in spec order, zero beyond the rule's 28 / 30);
- :func:`apply` (phase 4) takes ``stats`` and writes the parameters and state in place; the mean
  square it normalises with is ``stats / n`` with n = :attr:`Plan.numels`.

Example::

    plan = Plan.build(jobs, celo=False)
    stats = statistics(plan, nets)
    apply(plan, nets, stats, numerics="fast")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_lopt.optim.functional.accumulators import factored_dims
from lightning_lopt.optim.gpu import kernels as K
from lightning_lopt.optim.gpu.theta import PackedNets

#: Elements per program: the element passes, the apply pass (a [BLOCK, 32] MLP tile) and tables.
REDUCE_BLOCK = 1024
MATRIX_TILE = (32, 128)  # rows x columns of a plain matrix per program of the factored reduction
STATS_BLOCK = 128
STATS_ITERS = 8  # blocks per program of the statistics pass (one atomic add per channel each)
APPLY_BLOCK = 128
TABLE_BLOCK = 256
NUMERICS = {"exact": "ieee", "fast": "tf32"}


@dataclass
class Job:
    """One tensor of one particle, updated in place: its work shape and buffers."""

    shape: tuple[int, ...]
    p: Tensor
    g: Tensor
    acc: dict[str, Tensor]
    scale: float  # update scale s_p·lr
    weight_decay: float  # lr·wd, applied to the pre-update p
    index: int  # position in the step's tensor list (keys the bf16 rounding)
    particle: int = 0


def _view(shape: tuple[int, ...], layout: str) -> tuple[list[int], int, int, int]:
    """``[N, factored, pre, A, mid, B, post, d0_is_a]``, the two table sizes and the batch count."""
    n = math.prod(shape)
    dims = factored_dims(shape, layout)
    if dims is None:
        return [n, 0, 1, 1, 1, 1, 1, 0], 0, 0, 0
    a, b = sorted(dims)
    pre, mid, post = math.prod(shape[:a]), math.prod(shape[a + 1 : b]), math.prod(shape[b + 1 :])
    na, nb = pre * mid * shape[b] * post, pre * shape[a] * mid * post
    return [n, 1, pre, shape[a], mid, shape[b], post, int(dims[1] == a)], na, nb, pre * mid * post


def _block_map(counts: Sequence[int], block: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(program → unit, unit → first program, number of programs) for units of ``counts`` items."""
    blocks = torch.tensor([math.ceil(c / block) for c in counts], dtype=torch.int64)
    first = torch.cumsum(blocks, 0) - blocks
    owner = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), blocks)
    return _staged(owner, device), _staged(first, device), int(blocks.sum())


def _staged(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without a blocking copy (pinned staging on CUDA)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    return _staged(torch.tensor(data, dtype=dtype), device)


class Plan:
    """The job table, block maps and workspace layout of one step's tensors; see the module docstring."""

    def __init__(self, jobs: Sequence[Job], layout: str, celo: bool) -> None:
        jobs = [job for job in jobs if job.p.numel() > 0]
        if not jobs:
            raise ValueError("a GPU step needs at least one non-empty tensor")
        self.device = jobs[0].p.device
        self.celo = celo
        self.n_jobs = len(jobs)
        self.p_bf16 = _single_dtype([j.p for j in jobs], "parameters") == torch.bfloat16
        self.g_bf16 = _single_dtype([j.g for j in jobs], "gradients") == torch.bfloat16
        self.state_bf16 = _single_dtype([j.acc[k] for j in jobs for k in ("m", "rms")], "m / rms") == torch.bfloat16
        rows, units, factored, numels = [], [], [], []
        offset = 0
        for i, job in enumerate(jobs):
            view, na, nb, nbatch = _view(job.shape, layout)
            ws = [0, 0, 0, 0, 0]
            if view[1]:
                # sum_a [na], sum_b [nb], tab_a [9·na], tab_b [9·nb], r̄ [3·nbatch] (float32).
                sizes = [na, nb, 9 * na, 9 * nb, 3 * nbatch]
                for k, size in enumerate(sizes):
                    ws[k] = offset
                    offset += size
                factored.append(i)
                units += [[i, 0, na], [i, 1, nb]]
            acc = job.acc
            v_row, v_col = (acc["v_row"], acc["v_col"]) if view[1] else (acc["v"], acc["v"])
            pointers = [t.data_ptr() for t in (job.p, job.g, acc["m"], acc["rms"], v_row, v_col)]
            rows.append([*view, *pointers, *ws, job.index, job.particle])
            numels.append(view[0])
        device = self.device
        self.jobs = _to_device(rows, torch.int64, device)
        self._scalars: dict[tuple[float, ...], Tensor] = {}
        self.set_scalars(jobs)
        self.numels = _to_device(numels, torch.float32, device)
        self.workspace_floats = offset
        self.factored_jobs = factored
        self.units = _to_device(units or [[0, 0, 0]], torch.int64, device)
        self.row_units = _to_device(
            [u for u in units if (u[1] == 0) == bool(rows[u[0]][K.J_D0_IS_A])] or [[0, 0, 0]], torch.int64, device
        )
        n_row_units = len(units) // 2
        # Plain matrices (the two factored axes are the only ones) reduce in 2-D tiles.
        matrix = [bool(r[K.J_FACTORED]) and r[K.J_PRE] == r[K.J_MID] == r[K.J_POST] == 1 for r in rows]
        self.maps = {
            "reduce": _block_map(
                [numels[i] if i in factored and not matrix[i] else 0 for i in range(len(jobs))], REDUCE_BLOCK, device
            ),
            "reduce_matrix": _block_map(
                [math.ceil(r[K.J_A] / MATRIX_TILE[0]) * math.ceil(r[K.J_B] / MATRIX_TILE[1]) if m else 0
                 for r, m in zip(rows, matrix)],
                1,
                device,
            ),
            "tables": _block_map([u[2] for u in units], TABLE_BLOCK, device),
            "rows": _block_map([u[2] for u in units if (u[1] == 0) == bool(rows[u[0]][K.J_D0_IS_A])], TABLE_BLOCK, device)
            if n_row_units
            else None,
            "stats": _block_map(numels, STATS_BLOCK * STATS_ITERS, device),
            "apply": _block_map(numels, APPLY_BLOCK, device),
        }

    def set_scalars(self, jobs: Sequence[Job]) -> None:
        """The per-tensor update scale and weight decay for this step (they follow lr schedules).

        Cached by value, so a constant lr copies nothing after the first step (and a CUDA graph
        replays the same table); a changing lr costs one small non-blocking copy per step.
        """
        values = tuple(x for job in jobs if job.p.numel() > 0 for x in (job.scale, job.weight_decay))
        if values not in self._scalars:
            if len(self._scalars) >= 4:
                self._scalars.pop(next(iter(self._scalars)))
            self._scalars[values] = _to_device(list(values), torch.float32, self.device)
        self.scalars = self._scalars[values]


def _single_dtype(tensors: Sequence[Tensor], what: str) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16}:
        raise TypeError(f"the GPU step needs {what} all float32 or all bfloat16, got {sorted(map(str, dtypes))}")
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"the GPU step needs contiguous {what}")
    return dtypes.pop()


_PLANS: dict[tuple, Plan] = {}
_MAX_PLANS = 8


def plan_for(jobs: Sequence[Job], layout: str, celo: bool) -> Plan:
    """The cached :class:`Plan` of these tensors (rebuilt when an address, shape or scalar changes).

    The key holds everything the plan's tables encode, so a plan whose tensors were freed is
    reused only for tensors at the same addresses with the same shapes and dtypes, for which its
    tables are exactly right; plans hold no references to the tensors. The per-tensor scalars (lr
    times the update scale, the weight decay) are set on the plan at every call.
    """
    key = (
        layout,
        celo,
        tuple(
            (job.shape, job.index, job.particle, job.p.dtype, job.g.dtype)
            + tuple(t.data_ptr() for t in (job.p, job.g, *job.acc.values()))
            + tuple(t.dtype for t in job.acc.values())
            for job in jobs
        ),
    )
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[key] = Plan(jobs, layout, celo)
    else:
        plan.set_scalars(jobs)
    return plan


def statistics(plan: Plan, nets: PackedNets) -> tuple[Tensor, Tensor]:
    """Phases 1-3: the factored statistics (written to the state) and ``(stats, workspace)``.

    ``stats [n_jobs, 32]`` float32: per tensor, the sum over its elements of each MLP input channel
    squared; ``workspace`` holds the factored tables :func:`apply` reads.
    """
    ws = torch.zeros(max(plan.workspace_floats, 1), dtype=torch.float32, device=plan.device)
    stats = torch.zeros(plan.n_jobs, K.WIDTH, dtype=torch.float32, device=plan.device)
    if plan.factored_jobs:
        owner, first, n = plan.maps["reduce"]
        if n:
            K.reduce_kernel[(n,)](plan.jobs, owner, first, ws, BLOCK=REDUCE_BLOCK, CELO=plan.celo, G_BF16=plan.g_bf16)
        owner, first, n = plan.maps["reduce_matrix"]
        if n:
            K.reduce_matrix_kernel[(n,)](
                plan.jobs, owner, first, ws, ROWS=MATRIX_TILE[0], COLS=MATRIX_TILE[1], CELO=plan.celo, G_BF16=plan.g_bf16
            )
        owner, first, n = plan.maps["tables"]
        K.tables_kernel[(n,)](plan.jobs, plan.units, owner, first, nets.decays, ws, BLOCK=TABLE_BLOCK)
        owner, first, n = plan.maps["rows"]
        K.row_factor_kernel[(n,)](plan.jobs, plan.row_units, owner, first, ws, BLOCK=TABLE_BLOCK)
    owner, first, n = plan.maps["stats"]
    K.stats_kernel[(n,)](
        plan.jobs, owner, first, nets.decays, ws, stats, BLOCK=STATS_BLOCK, ITERS=STATS_ITERS, CELO=plan.celo,
        STATE_BF16=plan.state_bf16, P_BF16=plan.p_bf16, G_BF16=plan.g_bf16,
    )
    return stats, ws


def apply(plan: Plan, nets: PackedNets, stats: Tensor, workspace: Tensor, *, numerics: str = "fast") -> None:
    """Phase 4: the update from ``stats`` (see :func:`statistics`), written in place."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {sorted(NUMERICS)}, got {numerics!r}")
    owner, first, n = plan.maps["apply"]
    K.apply_kernel[(n,)](
        plan.jobs, owner, first, nets.decays, workspace, stats.contiguous(), plan.scalars,
        nets.w0, nets.b0, nets.w1, nets.b1, nets.w2, nets.b2, nets.lr, nets.iteration, nets.exp_mult,
        BLOCK=APPLY_BLOCK, CELO=plan.celo, STATE_BF16=plan.state_bf16, P_BF16=plan.p_bf16, G_BF16=plan.g_bf16,
        PRECISION=NUMERICS[numerics],
    )
