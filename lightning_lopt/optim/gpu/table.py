"""The tensor table and the launches of the GPU step: many tensors per launch, no host sync.

A :class:`Plan` describes one step's tensors (all particles): the int64 job table the kernels read
(sizes, the 5-D view around the factored axes, raw pointers), the block maps of the 1-D grids and
the workspace offsets. Plans are cached by the tensors' addresses and shapes, so a training loop
builds its plan once and every later step (or a CUDA-graph replay) only launches kernels.

The passes are separately callable (the FSDP2 sharded step all-reduces between them; see the
contract in :mod:`lightning_lopt.optim.gpu`):

- :func:`partial_sums` (phase A: the factored reductions) → the workspace, whose prefix
  ``[:shared_floats]`` holds the partial sums over axis 0 of split tensors (:attr:`Job.total_rows`);
- :func:`finish_statistics` (phase B) → ``stats [n_jobs, 32]``: per tensor, the SUM over its
  elements of each MLP input channel squared (channels in spec order, zero beyond the rule's 28 / 30);
- :func:`apply` (phase C) takes ``stats`` and writes the parameters and state in place; the mean
  square it normalises with is ``stats / n`` with n = :attr:`Plan.numels` (the whole tensor's count);
- :func:`statistics`: phases A and B of an unsharded step.

Example::

    plan = plan_for(jobs, layout="torch", celo=False)
    stats, workspace = statistics(plan, nets)
    apply(plan, nets, stats, workspace, numerics="fast")
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
    #: Axis 0's size in the whole tensor when ``shape`` is a block of its rows (FSDP2's ``Shard(0)``:
    #: the factored axes and every count come from the whole tensor); ``None``: the job is the tensor.
    total_rows: int | None = None

    def total_shape(self) -> tuple[int, ...]:
        """The shape of the whole tensor."""
        return self.shape if self.total_rows is None else (self.total_rows, *self.shape[1:])


def _view(shape: tuple[int, ...], total_shape: tuple[int, ...], layout: str) -> tuple[list[int], int, int, int]:
    """``[N, factored, pre, A, mid, B, post, d0_is_a]`` of a block ``shape`` of rows of a tensor of
    ``total_shape`` (the factored axes are the whole tensor's), the two table sizes and the batch count."""
    n = math.prod(shape)
    dims = factored_dims(total_shape, layout)
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
        # Empty blocks of split tensors stay: their stats rows line up across ranks, and the
        # statistic reduced over axis 0 (replicated) is updated on every rank.
        jobs = [job for job in jobs if job.p.numel() > 0 or job.total_rows is not None]
        if not jobs:
            raise ValueError("a GPU step needs at least one non-empty tensor")
        self.device = jobs[0].p.device
        self.celo = celo
        self.n_jobs = len(jobs)
        self.p_bf16 = _single_dtype([j.p for j in jobs], "parameters") == torch.bfloat16
        self.g_bf16 = _single_dtype([j.g for j in jobs], "gradients") == torch.bfloat16
        self.state_bf16 = _single_dtype([j.acc[k] for j in jobs for k in ("m", "rms")], "m / rms") == torch.bfloat16
        views = [_view(job.shape, job.total_shape(), layout) for job in jobs]
        # The sums over axis 0 of split tensors (SUM_A when a = 0, r̄ when also d1 = a) come first in
        # the workspace, so the sharded step reduces one prefix: ``workspace[:shared_floats]``.
        dims = [factored_dims(job.total_shape(), layout) for job in jobs]
        shared = [job.total_rows is not None and d is not None and min(d) == 0 for job, d in zip(jobs, dims)]
        rbar_shared = [s and d[0] == 0 for s, d in zip(shared, dims)]  # d1 = 0: v_row keeps axis 0
        offset = 0
        ws = [[0, 0, 0, 0, 0] for _ in jobs]
        for i, (view, na, nb, nbatch) in enumerate(views):
            if shared[i]:
                ws[i][0], offset = offset, offset + na
            if rbar_shared[i]:
                ws[i][4], offset = offset, offset + 3 * nbatch
        self.shared_floats = offset
        rows, units, factored, numels, totals = [], [], [], [], []
        for i, (job, (view, na, nb, nbatch)) in enumerate(zip(jobs, views)):
            if view[1]:
                # sum_a [na], sum_b [nb], tab_a [9·na], tab_b [9·nb], r̄ [3·nbatch] (float32).
                sizes = [na, nb, 9 * na, 9 * nb, 3 * nbatch]
                for k, size in enumerate(sizes):
                    if (k == 0 and shared[i]) or (k == 4 and rbar_shared[i]):
                        continue
                    ws[i][k] = offset
                    offset += size
                factored.append(i)
                units += [[i, 0, na], [i, 1, nb]]
            acc = job.acc
            v_row, v_col = (acc["v_row"], acc["v_col"]) if view[1] else (acc["v"], acc["v"])
            pointers = [t.data_ptr() for t in (job.p, job.g, acc["m"], acc["rms"], v_row, v_col)]
            total = _view(job.total_shape(), job.total_shape(), layout)[0]
            rows.append([*view, *pointers, *ws[i], job.index, job.particle, total[0], total[3], int(rbar_shared[i])])
            numels.append(view[0])
            totals.append(total[0])
        device = self.device
        self.jobs = _to_device(rows, torch.int64, device)
        self._scalars: dict[tuple[float, ...], Tensor] = {}
        self.set_scalars(jobs)
        #: The element count each tensor's channel means divide by (the whole tensor's).
        self.numels = _to_device(totals, torch.float32, device)
        #: Rows of ``stats`` that are partial sums over a block (split tensors), reduced across blocks.
        self.split_jobs = _to_device([i for i, job in enumerate(jobs) if job.total_rows is not None], torch.int64, device)
        self.n_split = sum(job.total_rows is not None for job in jobs)
        self.workspace_floats = offset
        self.factored_jobs = factored
        self.units = _to_device(units or [[0, 0, 0]], torch.int64, device)
        self.row_units = _to_device(
            [u for u in units if (u[1] == 0) == bool(rows[u[0]][K.J_D0_IS_A])] or [[0, 0, 0]], torch.int64, device
        )
        n_row_units = len(units) // 2
        shared_row_units = [u for u in units if rbar_shared[u[0]] and (u[1] == 0) == bool(rows[u[0]][K.J_D0_IS_A])]
        self.shared_row_units = _to_device(shared_row_units or [[0, 0, 0]], torch.int64, device)
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
            "shared_rows": _block_map([u[2] for u in shared_row_units], TABLE_BLOCK, device),
            "stats": _block_map(numels, STATS_BLOCK * STATS_ITERS, device),
            "apply": _block_map(numels, APPLY_BLOCK, device),
        }

    def set_scalars(self, jobs: Sequence[Job]) -> None:
        """The per-tensor update scale and weight decay for this step (they follow lr schedules).

        Cached by value, so a constant lr copies nothing after the first step (and a CUDA graph
        replays the same table); a changing lr costs one small non-blocking copy per step.
        """
        values = tuple(
            x for job in jobs if job.p.numel() > 0 or job.total_rows is not None for x in (job.scale, job.weight_decay)
        )
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
            (job.shape, job.total_rows, job.index, job.particle, job.p.dtype, job.g.dtype)
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


def partial_sums(plan: Plan, nets: PackedNets) -> Tensor:
    """Phase A: the workspace with the sums of g² over the factored axes (and, for split tensors
    whose ``v_row`` keeps axis 0, the partial sums of the new ``v_row`` over it). Writes no state.

    ``workspace[:plan.shared_floats]`` are partial sums over a block of rows, which a sharded step
    reduces across blocks before :func:`finish_statistics`; the rest is complete.
    """
    ws = torch.zeros(max(plan.workspace_floats, 1), dtype=torch.float32, device=plan.device)
    if plan.factored_jobs:
        owner, first, n = plan.maps["reduce"]
        if n:
            K.reduce_kernel[(n,)](plan.jobs, owner, first, ws, BLOCK=REDUCE_BLOCK, CELO=plan.celo, G_BF16=plan.g_bf16)
        owner, first, n = plan.maps["reduce_matrix"]
        if n:
            K.reduce_matrix_kernel[(n,)](
                plan.jobs, owner, first, ws, ROWS=MATRIX_TILE[0], COLS=MATRIX_TILE[1], CELO=plan.celo, G_BF16=plan.g_bf16
            )
        owner, first, n = plan.maps["shared_rows"]
        if n:
            K.tables_kernel[(n,)](
                plan.jobs, plan.shared_row_units, owner, first, nets.decays, ws, BLOCK=TABLE_BLOCK, COMMIT=False
            )
    return ws


def finish_statistics(plan: Plan, nets: PackedNets, workspace: Tensor) -> Tensor:
    """Phase B: the factored statistics (written to the state), their tables, and ``stats``.

    ``stats [n_jobs, 32]`` float32: per tensor, the sum over its elements of each MLP input channel
    squared (of split tensors: over the block; rows :attr:`Plan.split_jobs`).
    """
    stats = torch.zeros(plan.n_jobs, K.WIDTH, dtype=torch.float32, device=plan.device)
    if plan.factored_jobs:
        owner, first, n = plan.maps["tables"]
        if n:
            K.tables_kernel[(n,)](plan.jobs, plan.units, owner, first, nets.decays, workspace, BLOCK=TABLE_BLOCK,
                                  COMMIT=True)
        owner, first, n = plan.maps["rows"]
        if n:
            K.row_factor_kernel[(n,)](plan.jobs, plan.row_units, owner, first, workspace, BLOCK=TABLE_BLOCK)
    owner, first, n = plan.maps["stats"]
    if n:
        K.stats_kernel[(n,)](
            plan.jobs, owner, first, nets.decays, workspace, stats, BLOCK=STATS_BLOCK, ITERS=STATS_ITERS,
            CELO=plan.celo, STATE_BF16=plan.state_bf16, P_BF16=plan.p_bf16, G_BF16=plan.g_bf16,
        )
    return stats


def statistics(plan: Plan, nets: PackedNets) -> tuple[Tensor, Tensor]:
    """Phases A and B of an unsharded step: ``(stats, workspace)`` (see :func:`finish_statistics`)."""
    workspace = partial_sums(plan, nets)
    return finish_statistics(plan, nets, workspace), workspace


def apply(plan: Plan, nets: PackedNets, stats: Tensor, workspace: Tensor, *, numerics: str = "fast") -> None:
    """Phase 4: the update from ``stats`` (see :func:`statistics`), written in place."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {sorted(NUMERICS)}, got {numerics!r}")
    owner, first, n = plan.maps["apply"]
    if not n:
        return
    K.apply_kernel[(n,)](
        plan.jobs, owner, first, nets.decays, workspace, stats.contiguous(), plan.scalars,
        nets.w0, nets.b0, nets.w1, nets.b1, nets.w2, nets.b2, nets.lr, nets.iteration, nets.exp_mult,
        BLOCK=APPLY_BLOCK, CELO=plan.celo, STATE_BF16=plan.state_bf16, P_BF16=plan.p_bf16, G_BF16=plan.g_bf16,
        PRECISION=NUMERICS[numerics],
    )
