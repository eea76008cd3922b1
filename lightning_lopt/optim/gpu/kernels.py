"""The Triton kernels of the GPU step of small_fc_lopt / μLO and Celo (docs/reference/small_fc.md,
docs/reference/celo.md#one-update, docs/reference/celo.md#per-parameter-features).

Every kernel runs over many tensors at once: a *job table* (int64 ``[n_jobs, J_COUNT]``, built by
:mod:`lightning_lopt.optim.gpu.table`) holds each tensor's size, its 5-D view ``[pre, A, mid, B,
post]`` around the two factored axes ``a < b`` and raw pointers to its parameter, gradient and
accumulators; a *block map* sends each program of a 1-D grid to its job and block. Phases (one
launch each, in this order):

1. :func:`reduce_matrix_kernel` (plain matrices, in 2-D tiles) and :func:`reduce_kernel` (other
   factored tensors, per element): sums of G = g² + 1e-30 over axis a and over axis b into the
   workspace (atomics);
2. :func:`tables_kernel`: the new ``v_row`` / ``v_col`` (written to the state), per entry
   ``[v, rsqrt(v + 1e-8), factor]`` x 3 decays into the workspace, and the sums of ``v_row`` over
   its d1 axis; :func:`row_factor_kernel`: the row factors, which need those sums;
3. :func:`stats_kernel`: the sum over the elements of every MLP input channel squared, ``stats
   [n_jobs, 32]`` in the spec's channel order (docs/reference/small_fc.md#features,
   docs/reference/celo.md#per-parameter-features; padded with zeros);
4. :func:`apply_kernel`: rebuild the inputs of a block of elements, normalise them with ``stats``,
   run the MLP with ``tl.dot`` and write the parameter, ``m``, ``rms`` (and ``v`` of vectors).

A job may be a block of rows of a tensor split along axis 0 (FSDP2's ``Shard(0)``): the element
loops run over the block (``J_N``, ``J_A``), the means divide by the whole tensor's counts
(``J_N_TOTAL``, ``J_A_TOTAL``), and the sharded step reduces the sums across blocks between phase 1
and 2 and between 3 and 4. When the mean of ``v_row`` over d1 crosses the blocks
(``J_RBAR_SHARED``), :func:`tables_kernel` with ``COMMIT=False`` adds the block's new ``v_row``
into it in phase 1, storing nothing (see :mod:`lightning_lopt.optim.gpu`).

The MLP inputs of a block are a ``[BLOCK, 32]`` tile assembled with a tree of ``tl.join`` (no
[numel, features] tensor exists anywhere): the join tree puts channel ``c`` in column
``bitrev5(c)``, so the packed first layer is permuted the same way (:func:`bit_reverse5`).
``PRECISION`` selects the ``tl.dot`` arithmetic: ``"ieee"`` (fp32 FMA, the exact mode) or
``"tf32"`` (tensor cores, the fast mode).

bf16 accumulators (``STATE_BF16``) are widened on load and stochastically rounded on store with
the hash of :mod:`lightning_lopt.optim.bf16_state` (``mix32``), so all three implementations round
the same float32 value identically.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Job table fields (int64), mirrored by table.py. Globals a kernel reads must be tl.constexpr.
_c = tl.constexpr
J_N, J_FACTORED, J_PRE, J_A, J_MID, J_B, J_POST, J_D0_IS_A = (_c(i) for i in range(8))
J_P, J_G, J_M, J_RMS, J_VROW, J_VCOL = (_c(i) for i in range(8, 14))  # pointers; non-factored: v in J_VROW
J_SUM_A, J_SUM_B, J_TAB_A, J_TAB_B, J_RBAR = (_c(i) for i in range(14, 19))  # float offsets into the workspace
J_INDEX, J_PARTICLE = _c(19), _c(20)
# Counts of the whole tensor when the job is a block of rows of it (FSDP2's Shard(0); otherwise
# equal to J_N / J_A): the mean of the statistics over axis a, the channel means; and whether the
# mean of v_row over d1 crosses the blocks (d1 = a = axis 0), so its partial sum is reduced first.
J_N_TOTAL, J_A_TOTAL, J_RBAR_SHARED = _c(21), _c(22), _c(23)
J_COUNT = _c(24)
#: Per table unit (int64): job, side (0: the statistic without axis a, 1: without axis b), entries.
U_JOB, U_SIDE, U_ENTRIES = (_c(i) for i in range(3))
U_COUNT = _c(3)
#: Padded MLP widths: inputs and hidden units (tl.dot needs ≥ 16 per side), outputs.
WIDTH = _c(32)
OUT_WIDTH = _c(16)
#: Per-particle decays: momentum (3), rms (1), Adafactor (3).
N_DECAYS = _c(7)
HI_SMALL_FC = _c(3.4028234663852886e38)  # nan_to_num's ±inf → ±max
HI_CELO = _c(1000.0)  # Celo's gradient clip


def bit_reverse5(c: int) -> int:
    """The column of channel ``c`` in the join-tree tile (and vice versa): 5-bit reversal."""
    return int(f"{c:05b}"[::-1], 2)


@triton.jit
def _leaf_of_column(c):
    return ((c & 1) << 4) | ((c & 2) << 2) | (c & 4) | ((c & 8) >> 2) | ((c & 16) >> 4)


@triton.jit
def _block(block_job_ptr, first_block_ptr, BLOCK: tl.constexpr):
    """(unit, offsets of this program's block within the unit) from the block map."""
    pid = tl.program_id(0)
    unit = tl.load(block_job_ptr + pid)
    local = pid - tl.load(first_block_ptr + unit)
    return unit, local * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _clean_grad(g, HI: tl.constexpr):
    """nan_to_num (NaN → 0, ±inf → ±max), then Celo's clip to ±1000 (HI)."""
    g = tl.where(g != g, 0.0, g)
    return tl.minimum(tl.maximum(g, -HI), HI)


@triton.jit
def _param_ptr(job_row, P_BF16: tl.constexpr):
    if P_BF16:
        ptr = tl.load(job_row + J_P).to(tl.pointer_type(tl.bfloat16))
    else:
        ptr = tl.load(job_row + J_P).to(tl.pointer_type(tl.float32))
    return ptr


@triton.jit
def _load_grad(job_row, e, mask, CELO: tl.constexpr, G_BF16: tl.constexpr):
    """The gradient of elements e in float32, cleaned (nan_to_num; Celo: clipped to ±1000)."""
    if G_BF16:
        g_ptr = tl.load(job_row + J_G).to(tl.pointer_type(tl.bfloat16))
    else:
        g_ptr = tl.load(job_row + J_G).to(tl.pointer_type(tl.float32))
    g = tl.load(g_ptr + e, mask=mask, other=0.0).to(tl.float32)
    if CELO:
        g = _clean_grad(g, HI_CELO)
    else:
        g = _clean_grad(g, HI_SMALL_FC)
    return g


@triton.jit
def _safe_rsqrt(x):
    return tl.rsqrt(tl.maximum(x, 1e-9))


@triton.jit
def _table_indices(e, job_row):
    """Indices of element ``e`` in the statistic without axis a and in the one without axis b."""
    a_ = tl.load(job_row + J_A)
    mid_ = tl.load(job_row + J_MID)
    b_ = tl.load(job_row + J_B)
    post_ = tl.load(job_row + J_POST)
    ipost = e % post_
    t = e // post_
    ib = t % b_
    t = t // b_
    imid = t % mid_
    t = t // mid_
    ia = t % a_
    ipre = t // a_
    idx_a = ((ipre * mid_ + imid) * b_ + ib) * post_ + ipost
    idx_b = ((ipre * a_ + ia) * mid_ + imid) * post_ + ipost
    return idx_a, idx_b


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x21F0AAAD
    return x ^ (x >> 15)


@triton.jit
def _round_bf16(x, key, slot):
    """Stochastic rounding of float32 ``x`` to bf16 (bf16_state.round_to_bf16's bits)."""
    bits = x.to(tl.uint32, bitcast=True)
    noise = _mix32(key ^ slot) & 0xFFFF
    special = (bits & 0x7F800000) == 0x7F800000
    nan = special & ((bits & 0x007FFFFF) != 0)
    rounded = tl.where(special, bits >> 16, (bits + noise) >> 16)
    rounded = tl.where(nan, rounded | 0x0040, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _join32(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
            x16, x17, x18, x19, x20, x21, x22, x23, x24, x25, x26, x27, x28, x29, x30, x31,
            BLOCK: tl.constexpr):
    """32 ``[BLOCK]`` channels → a ``[BLOCK, 32]`` tile, channel c in column bitrev5(c)."""
    a0 = tl.join(tl.join(tl.join(x0, x1), tl.join(x2, x3)), tl.join(tl.join(x4, x5), tl.join(x6, x7)))
    a1 = tl.join(tl.join(tl.join(x8, x9), tl.join(x10, x11)), tl.join(tl.join(x12, x13), tl.join(x14, x15)))
    a2 = tl.join(tl.join(tl.join(x16, x17), tl.join(x18, x19)), tl.join(tl.join(x20, x21), tl.join(x22, x23)))
    a3 = tl.join(tl.join(tl.join(x24, x25), tl.join(x26, x27)), tl.join(tl.join(x28, x29), tl.join(x30, x31)))
    return tl.reshape(tl.join(tl.join(a0, a1), tl.join(a2, a3)), (BLOCK, 32))


@triton.jit
def _features(job_row, e, mask, decays_row, ws_ptr, BLOCK: tl.constexpr, CELO: tl.constexpr,
              STATE_BF16: tl.constexpr, P_BF16: tl.constexpr, G_BF16: tl.constexpr):
    """The MLP inputs of elements ``e`` (a ``[BLOCK, 32]`` tile, zero on masked lanes) and the new
    accumulators the apply pass stores."""
    factored = tl.load(job_row + J_FACTORED)
    p_ptr = _param_ptr(job_row, P_BF16)
    g = _load_grad(job_row, e, mask, CELO, G_BF16)
    if STATE_BF16:
        m_ptr = tl.load(job_row + J_M).to(tl.pointer_type(tl.bfloat16))
        r_ptr = tl.load(job_row + J_RMS).to(tl.pointer_type(tl.bfloat16))
    else:
        m_ptr = tl.load(job_row + J_M).to(tl.pointer_type(tl.float32))
        r_ptr = tl.load(job_row + J_RMS).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(job_row + J_VROW).to(tl.pointer_type(tl.float32))
    p = tl.load(p_ptr + e, mask=mask, other=0.0).to(tl.float32)
    mom0 = tl.load(decays_row + 0)
    mom1 = tl.load(decays_row + 1)
    mom2 = tl.load(decays_row + 2)
    rd = tl.minimum(tl.maximum(tl.load(decays_row + 3), 0.0), 1.0)
    m0 = mom0 * tl.load(m_ptr + 3 * e, mask=mask, other=0.0).to(tl.float32) + (1.0 - mom0) * g
    m1 = mom1 * tl.load(m_ptr + 3 * e + 1, mask=mask, other=0.0).to(tl.float32) + (1.0 - mom1) * g
    m2 = mom2 * tl.load(m_ptr + 3 * e + 2, mask=mask, other=0.0).to(tl.float32) + (1.0 - mom2) * g
    rms = rd * tl.load(r_ptr + e, mask=mask, other=0.0).to(tl.float32) + (1.0 - rd) * (g * g)
    rs = tl.rsqrt(rms + 1e-6)
    if factored != 0:
        # Factored: v and its rsqrt broadcast from the tables, fac_g = g·row·col.
        idx_a, idx_b = _table_indices(e, job_row)
        d0_is_a = tl.load(job_row + J_D0_IS_A)
        row_idx = tl.where(d0_is_a != 0, idx_a, idx_b)
        col_idx = tl.where(d0_is_a != 0, idx_b, idx_a)
        tab_a = tl.load(job_row + J_TAB_A)
        tab_b = tl.load(job_row + J_TAB_B)
        row_tab = ws_ptr + tl.where(d0_is_a != 0, tab_a, tab_b)
        col_tab = ws_ptr + tl.where(d0_is_a != 0, tab_b, tab_a)
        vr0 = tl.load(row_tab + 9 * row_idx + 0, mask=mask, other=1.0)
        vr1 = tl.load(row_tab + 9 * row_idx + 1, mask=mask, other=1.0)
        vr2 = tl.load(row_tab + 9 * row_idx + 2, mask=mask, other=1.0)
        ir0 = tl.load(row_tab + 9 * row_idx + 3, mask=mask, other=1.0)
        ir1 = tl.load(row_tab + 9 * row_idx + 4, mask=mask, other=1.0)
        ir2 = tl.load(row_tab + 9 * row_idx + 5, mask=mask, other=1.0)
        fr0 = tl.load(row_tab + 9 * row_idx + 6, mask=mask, other=1.0)
        fr1 = tl.load(row_tab + 9 * row_idx + 7, mask=mask, other=1.0)
        fr2 = tl.load(row_tab + 9 * row_idx + 8, mask=mask, other=1.0)
        vc0 = tl.load(col_tab + 9 * col_idx + 0, mask=mask, other=1.0)
        vc1 = tl.load(col_tab + 9 * col_idx + 1, mask=mask, other=1.0)
        vc2 = tl.load(col_tab + 9 * col_idx + 2, mask=mask, other=1.0)
        ic0 = tl.load(col_tab + 9 * col_idx + 3, mask=mask, other=1.0)
        ic1 = tl.load(col_tab + 9 * col_idx + 4, mask=mask, other=1.0)
        ic2 = tl.load(col_tab + 9 * col_idx + 5, mask=mask, other=1.0)
        fc0 = tl.load(col_tab + 9 * col_idx + 6, mask=mask, other=1.0)
        fc1 = tl.load(col_tab + 9 * col_idx + 7, mask=mask, other=1.0)
        fc2 = tl.load(col_tab + 9 * col_idx + 8, mask=mask, other=1.0)
        fg0 = g * fr0 * fc0
        fg1 = g * fr1 * fc1
        fg2 = g * fr2 * fc2
        mf0 = m0 * fr0 * fc0
        mf1 = m1 * fr1 * fc1
        mf2 = m2 * fr2 * fc2
        v0 = vr0
        v1 = vr1
        v2 = vr2
    else:
        # Vectors: the full second moment v, updated here (stored by the apply pass).
        fd0 = tl.minimum(tl.maximum(tl.load(decays_row + 4), 0.0), 1.0)
        fd1 = tl.minimum(tl.maximum(tl.load(decays_row + 5), 0.0), 1.0)
        fd2 = tl.minimum(tl.maximum(tl.load(decays_row + 6), 0.0), 1.0)
        gsq = g * g + 1e-30
        v0 = fd0 * tl.load(v_ptr + 3 * e, mask=mask, other=0.0) + (1.0 - fd0) * gsq
        v1 = fd1 * tl.load(v_ptr + 3 * e + 1, mask=mask, other=0.0) + (1.0 - fd1) * gsq
        v2 = fd2 * tl.load(v_ptr + 3 * e + 2, mask=mask, other=0.0) + (1.0 - fd2) * gsq
        fg0 = g * _safe_rsqrt(v0 + 1e-9)
        fg1 = g * _safe_rsqrt(v1 + 1e-9)
        fg2 = g * _safe_rsqrt(v2 + 1e-9)
        if CELO:
            mf0 = m0 * tl.rsqrt(v0)
            mf1 = m1 * tl.rsqrt(v1)
            mf2 = m2 * tl.rsqrt(v2)
        else:
            mf0 = m0 * tl.rsqrt(v0 + 1e-6)
            mf1 = m1 * tl.rsqrt(v1 + 1e-6)
            mf2 = m2 * tl.rsqrt(v2 + 1e-6)
        vr0 = v0
        vr1 = v1
        vr2 = v2
        vc0 = v0
        vc1 = v1
        vc2 = v2
        ir0 = tl.rsqrt(v0 + 1e-8)
        ir1 = tl.rsqrt(v1 + 1e-8)
        ir2 = tl.rsqrt(v2 + 1e-8)
        ic0 = ir0
        ic1 = ir1
        ic2 = ir2
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    if CELO:
        x = _join32(g, tl.minimum(tl.maximum(g, -0.1), 0.1), p, m0, m1, m2, rms, m0 * rs, m1 * rs, m2 * rs, rs,
                    fg0, fg1, fg2, g * rs, vr0, vr1, vr2, vc0, vc1, vc2, ir0, ir1, ir2, ic0, ic1, ic2,
                    mf0, mf1, mf2, zero, zero, BLOCK)
    else:
        x = _join32(g, p, m0, m1, m2, rms, m0 * rs, m1 * rs, m2 * rs, rs, fg0, fg1, fg2,
                    vr0, vr1, vr2, vc0, vc1, vc2, ir0, ir1, ir2, ic0, ic1, ic2, mf0, mf1, mf2,
                    zero, zero, zero, zero, BLOCK)
    x = tl.where(mask[:, None], x, 0.0)
    return x, p, m0, m1, m2, rms, v0, v1, v2


@triton.jit
def reduce_kernel(jobs_ptr, block_job_ptr, first_block_ptr, ws_ptr, BLOCK: tl.constexpr, CELO: tl.constexpr,
                  G_BF16: tl.constexpr):
    """Phase 1: per factored job, Σ G over axis a (→ SUM_A) and over axis b (→ SUM_B)."""
    job, e = _block(block_job_ptr, first_block_ptr, BLOCK)
    job_row = jobs_ptr + job * J_COUNT
    mask = e < tl.load(job_row + J_N)
    g = _load_grad(job_row, e, mask, CELO, G_BF16)
    gsq = g * g + 1e-30
    idx_a, idx_b = _table_indices(e, job_row)
    tl.atomic_add(ws_ptr + tl.load(job_row + J_SUM_A) + idx_a, gsq, mask=mask)
    tl.atomic_add(ws_ptr + tl.load(job_row + J_SUM_B) + idx_b, gsq, mask=mask)


@triton.jit
def reduce_matrix_kernel(jobs_ptr, tile_job_ptr, first_tile_ptr, ws_ptr, ROWS: tl.constexpr, COLS: tl.constexpr,
                         CELO: tl.constexpr, G_BF16: tl.constexpr):
    """Phase 1 for plain matrices ``[A, B]`` (pre = mid = post = 1): a ``[ROWS, COLS]`` tile sums
    over its rows into SUM_A (one atomic per column) and over its columns into SUM_B (one per row)."""
    pid = tl.program_id(0)
    job = tl.load(tile_job_ptr + pid)
    tile = pid - tl.load(first_tile_ptr + job)
    job_row = jobs_ptr + job * J_COUNT
    n_rows = tl.load(job_row + J_A)
    n_cols = tl.load(job_row + J_B)
    tiles_per_row = (n_cols + COLS - 1) // COLS
    rows = (tile // tiles_per_row) * ROWS + tl.arange(0, ROWS)
    cols = (tile % tiles_per_row) * COLS + tl.arange(0, COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    g = _load_grad(job_row, rows[:, None] * n_cols + cols[None, :], mask, CELO, G_BF16)
    gsq = tl.where(mask, g * g + 1e-30, 0.0)
    tl.atomic_add(ws_ptr + tl.load(job_row + J_SUM_A) + cols, tl.sum(gsq, axis=0), mask=cols < n_cols)
    tl.atomic_add(ws_ptr + tl.load(job_row + J_SUM_B) + rows, tl.sum(gsq, axis=1), mask=rows < n_rows)


@triton.jit
def _batch_of_row_entry(e, job_row):
    """The (pre, mid, post) batch index of entry e of the row statistic (its mean over d1 is per batch)."""
    a_ = tl.maximum(tl.load(job_row + J_A), 1)  # an empty block of rows has A = 0 (nothing to index)
    mid_ = tl.load(job_row + J_MID)
    b_ = tl.load(job_row + J_B)
    post_ = tl.load(job_row + J_POST)
    d0_is_a = tl.load(job_row + J_D0_IS_A)
    ipost = e % post_
    t = e // post_
    # d0 = a: entries [pre][mid][B][post]; d0 = b: entries [pre][A][mid][post].
    t_a = t // b_
    imid = tl.where(d0_is_a != 0, t_a % mid_, t % mid_)
    ipre = tl.where(d0_is_a != 0, t_a // mid_, (t // mid_) // a_)
    return (ipre * mid_ + imid) * post_ + ipost


@triton.jit
def tables_kernel(jobs_ptr, units_ptr, block_job_ptr, first_block_ptr, decays_ptr, ws_ptr, BLOCK: tl.constexpr,
                  COMMIT: tl.constexpr):
    """Phase 2a: the new factored statistics (into the state) and their table rows; row sums for r̄.

    ``COMMIT=False`` (the sharded step's first phase, on the row units of jobs with J_RBAR_SHARED)
    only adds the new ``v_row`` into r̄, the partial sum reduced across blocks; it stores nothing
    else. ``COMMIT=True`` stores everything and adds into r̄ for the other jobs.
    """
    unit, e = _block(block_job_ptr, first_block_ptr, BLOCK)
    unit_row = units_ptr + unit * U_COUNT
    job = tl.load(unit_row + U_JOB)
    side = tl.load(unit_row + U_SIDE)
    mask = e < tl.load(unit_row + U_ENTRIES)
    job_row = jobs_ptr + job * J_COUNT
    d0_is_a = tl.load(job_row + J_D0_IS_A)
    is_row = (side == 0) == (d0_is_a != 0)
    is_col = (side == 0) != (d0_is_a != 0)
    count = tl.where(side == 0, tl.load(job_row + J_A_TOTAL), tl.load(job_row + J_B)).to(tl.float32)
    sums = ws_ptr + tl.where(side == 0, tl.load(job_row + J_SUM_A), tl.load(job_row + J_SUM_B))
    tab = ws_ptr + tl.where(side == 0, tl.load(job_row + J_TAB_A), tl.load(job_row + J_TAB_B))
    v_ptr = tl.load(job_row + tl.where(is_row, J_VROW, J_VCOL)).to(tl.pointer_type(tl.float32))
    decays_row = decays_ptr + tl.load(job_row + J_PARTICLE) * N_DECAYS
    mean = tl.load(sums + e, mask=mask, other=0.0) / count
    rbar = ws_ptr + tl.load(job_row + J_RBAR) + 3 * _batch_of_row_entry(e, job_row)
    rbar_here = tl.load(job_row + J_RBAR_SHARED) == 0
    for j in tl.static_range(3):
        fd = tl.minimum(tl.maximum(tl.load(decays_row + 4 + j), 0.0), 1.0)
        v = fd * tl.load(v_ptr + 3 * e + j, mask=mask, other=0.0) + (1.0 - fd) * mean
        if COMMIT:
            tl.store(v_ptr + 3 * e + j, v, mask=mask)
            tl.store(tab + 9 * e + j, v, mask=mask)
            tl.store(tab + 9 * e + 3 + j, tl.rsqrt(v + 1e-8), mask=mask)
            # Columns: factor = safe_rsqrt(v); rows wait for r̄, the mean of v_row over d1.
            tl.store(tab + 9 * e + 6 + j, _safe_rsqrt(v), mask=mask & is_col)
            tl.atomic_add(rbar + j, v, mask=mask & is_row & rbar_here)
        else:
            tl.atomic_add(rbar + j, v, mask=mask & is_row)


@triton.jit
def row_factor_kernel(jobs_ptr, units_ptr, block_job_ptr, first_block_ptr, ws_ptr, BLOCK: tl.constexpr):
    """Phase 2b: row factor = safe_rsqrt(v_row / (mean of v_row over d1 + 1e-9))
    (docs/reference/small_fc.md#accumulators)."""
    unit, e = _block(block_job_ptr, first_block_ptr, BLOCK)
    unit_row = units_ptr + unit * U_COUNT
    job = tl.load(unit_row + U_JOB)
    side = tl.load(unit_row + U_SIDE)
    mask = e < tl.load(unit_row + U_ENTRIES)
    job_row = jobs_ptr + job * J_COUNT
    d0_is_a = tl.load(job_row + J_D0_IS_A)
    span = tl.where(d0_is_a != 0, tl.load(job_row + J_B), tl.load(job_row + J_A_TOTAL)).to(tl.float32)
    tab = ws_ptr + tl.where(side == 0, tl.load(job_row + J_TAB_A), tl.load(job_row + J_TAB_B))
    rbar = ws_ptr + tl.load(job_row + J_RBAR) + 3 * _batch_of_row_entry(e, job_row)
    for j in tl.static_range(3):
        row_mean = tl.load(rbar + j, mask=mask, other=1.0) / span
        v = tl.load(tab + 9 * e + j, mask=mask, other=1.0)
        tl.store(tab + 9 * e + 6 + j, _safe_rsqrt(v / (row_mean + 1e-9)), mask=mask)


@triton.jit
def stats_kernel(jobs_ptr, block_job_ptr, first_block_ptr, decays_ptr, ws_ptr, stats_ptr,
                 BLOCK: tl.constexpr, ITERS: tl.constexpr, CELO: tl.constexpr, STATE_BF16: tl.constexpr,
                 P_BF16: tl.constexpr, G_BF16: tl.constexpr):
    """Phase 3: stats[job, c] += Σ over ITERS blocks of channel c squared (channels in spec order).

    A program sums ITERS consecutive blocks before its one atomic add per channel.
    """
    pid = tl.program_id(0)
    job = tl.load(block_job_ptr + pid)
    start = (pid - tl.load(first_block_ptr + job)) * (BLOCK * ITERS)
    job_row = jobs_ptr + job * J_COUNT
    n = tl.load(job_row + J_N)
    decays_row = decays_ptr + tl.load(job_row + J_PARTICLE) * N_DECAYS
    acc = tl.zeros([WIDTH], dtype=tl.float32)
    for it in range(0, tl.minimum(ITERS, (n - start + BLOCK - 1) // BLOCK)):
        e = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = e < n
        x, p, m0, m1, m2, rms, v0, v1, v2 = _features(job_row, e, mask, decays_row, ws_ptr, BLOCK, CELO, STATE_BF16,
                                                      P_BF16, G_BF16)
        acc += tl.sum(x * x, axis=0)
    cols = tl.arange(0, WIDTH)
    tl.atomic_add(stats_ptr + job * WIDTH + _leaf_of_column(cols), acc)


@triton.jit
def apply_kernel(jobs_ptr, block_job_ptr, first_block_ptr, decays_ptr, ws_ptr, stats_ptr, scalars_ptr,
                 w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, lr_ptr, iteration_ptr, exp_mult,
                 BLOCK: tl.constexpr, CELO: tl.constexpr, STATE_BF16: tl.constexpr, P_BF16: tl.constexpr,
                 G_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """Phase 4: features → normalised → MLP (tl.dot) → the update; p, m, rms (and v) written in place.

    ``scalars[job] = (update scale s_p·lr, decoupled weight decay lr·wd)``; per particle: packed
    weights (``w0 [32, 32]`` rows in column order, ``w1 [32, 32]``, ``w2 [32, 16]``, all ``[in,
    out]``), ``lr`` (small_fc: step_mult; Celo: η·1e-3) and the iteration (bf16 rounding key).
    """
    job, e = _block(block_job_ptr, first_block_ptr, BLOCK)
    job_row = jobs_ptr + job * J_COUNT
    n = tl.load(job_row + J_N)
    mask = e < n
    part = tl.load(job_row + J_PARTICLE)
    decays_row = decays_ptr + part * N_DECAYS
    x, p, m0, m1, m2, rms, v0, v1, v2 = _features(job_row, e, mask, decays_row, ws_ptr, BLOCK, CELO, STATE_BF16,
                                                  P_BF16, G_BF16)

    cols = tl.arange(0, WIDTH)
    count = tl.load(job_row + J_N_TOTAL).to(tl.float32)
    sq = tl.load(stats_ptr + job * WIDTH + _leaf_of_column(cols))
    x = x * tl.rsqrt(1e-5 + sq / count)[None, :]
    rows = tl.arange(0, WIDTH)
    out_cols = tl.arange(0, OUT_WIDTH)
    w0 = tl.load(w0_ptr + part * WIDTH * WIDTH + rows[:, None] * WIDTH + cols[None, :])
    w1 = tl.load(w1_ptr + part * WIDTH * WIDTH + rows[:, None] * WIDTH + cols[None, :])
    w2 = tl.load(w2_ptr + part * WIDTH * OUT_WIDTH + rows[:, None] * OUT_WIDTH + out_cols[None, :])
    h = tl.dot(x, w0, input_precision=PRECISION) + tl.load(b0_ptr + part * WIDTH + cols)[None, :]
    h = tl.maximum(h, 0.0)
    h = tl.dot(h, w1, input_precision=PRECISION) + tl.load(b1_ptr + part * WIDTH + cols)[None, :]
    h = tl.maximum(h, 0.0)
    out = tl.dot(h, w2, input_precision=PRECISION) + tl.load(b2_ptr + part * OUT_WIDTH + out_cols)[None, :]
    direction = tl.sum(tl.where(out_cols[None, :] == 0, out, 0.0), axis=1)
    magnitude = tl.sum(tl.where(out_cols[None, :] == 1, out, 0.0), axis=1)

    scale = tl.load(scalars_ptr + 2 * job)
    decay = tl.load(scalars_ptr + 2 * job + 1)
    step = tl.load(lr_ptr + part) * direction * tl.exp(exp_mult * magnitude)
    if CELO:
        # Celo scales the step by the tensor's RMS; p is channel 2.
        step = step * tl.sqrt(tl.load(stats_ptr + job * WIDTH + 2) / count + 1e-9)
    new_p = p - step * scale - decay * p

    p_ptr = _param_ptr(job_row, P_BF16)
    tl.store(p_ptr + e, new_p.to(p_ptr.dtype.element_ty), mask=mask)
    if STATE_BF16:
        m_ptr = tl.load(job_row + J_M).to(tl.pointer_type(tl.bfloat16))
        r_ptr = tl.load(job_row + J_RMS).to(tl.pointer_type(tl.bfloat16))
        iteration = (tl.load(iteration_ptr + part) & 0xFFFFFFFF).to(tl.uint32)
        index = tl.load(job_row + J_INDEX).to(tl.uint32)
        key = _mix32(iteration * 0x2C1B3C6D + index)
        slot = e.to(tl.uint32) * 4
        tl.store(m_ptr + 3 * e, _round_bf16(m0, key, slot), mask=mask)
        tl.store(m_ptr + 3 * e + 1, _round_bf16(m1, key, slot + 1), mask=mask)
        tl.store(m_ptr + 3 * e + 2, _round_bf16(m2, key, slot + 2), mask=mask)
        tl.store(r_ptr + e, _round_bf16(rms, key, slot + 3), mask=mask)
    else:
        m_ptr = tl.load(job_row + J_M).to(tl.pointer_type(tl.float32))
        r_ptr = tl.load(job_row + J_RMS).to(tl.pointer_type(tl.float32))
        tl.store(m_ptr + 3 * e, m0, mask=mask)
        tl.store(m_ptr + 3 * e + 1, m1, mask=mask)
        tl.store(m_ptr + 3 * e + 2, m2, mask=mask)
        tl.store(r_ptr + e, rms, mask=mask)
    if tl.load(job_row + J_FACTORED) == 0:
        v_ptr = tl.load(job_row + J_VROW).to(tl.pointer_type(tl.float32))
        tl.store(v_ptr + 3 * e, v0, mask=mask)
        tl.store(v_ptr + 3 * e + 1, v1, mask=mask)
        tl.store(v_ptr + 3 * e + 2, v2, mask=mask)
