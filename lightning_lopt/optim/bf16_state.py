"""bf16 storage of the per-element accumulators (``state_dtype=torch.bfloat16``: 8 B/param).

The momenta ``m`` (3 per element) and the second moment ``rms`` are kept in bf16; everything is
still computed in float32 (the stored values are widened on load). The Adafactor statistics
(``v_row``, ``v_col``, and ``v`` of vectors) stay float32: they are O(rows + columns).

Why stochastic rounding. An EMA with decay 0.999 changes by 0.1% of the gap to its input per step,
less than half a bf16 ulp (0.4%) once it is within about 3x of its target, so round-to-nearest
freezes it there (the rms feature would sit at about a third of its true value). Rounding up with
probability equal to the dropped fraction keeps every accumulator unbiased.

The random bits are a hash of (iteration, tensor index, element, channel), not a generator draw,
so the rounding is reproducible, needs no RNG state in checkpoints, and is the same for every
thread count; the fused CPU kernel (``fused/kernel.c``: ``mix32``, ``to_bf16``) computes the same
bits, so the fused and the pure path round the same float32 value identically.

Example::

    m16 = round_to_bf16(m, tensor_key(iteration=7, tensor=0), channels=3, first_channel=0)
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
#: The channel slots per element in the hash: m uses 0-2, rms uses 3.
SLOTS = 4


def _mix32(x: Tensor | int) -> Tensor | int:
    """A 32-bit integer hash on int64 values in [0, 2^32); both multipliers are < 2^31, so no
    product overflows int64 (kernel.c's ``mix32`` on uint32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x21F0AAAD) & _MASK32
    return x ^ (x >> 15)


def tensor_key(iteration: int, tensor: int) -> int:
    """The hash key of one tensor's accumulators at one step (``iteration`` before the increment)."""
    return int(_mix32(((iteration & _MASK32) * 0x2C1B3C6D + tensor) & _MASK32))


def round_to_bf16(x: Tensor, key: int, *, channels: int, first_channel: int) -> Tensor:
    """Stochastically round a float32 accumulator ``[*, channels]`` to bf16.

    Element ``e``, channel ``c`` draws its 16 bits from ``hash(key ^ (4e + first_channel + c))``.
    Infinities are kept and NaNs become quiet NaNs.
    """
    flat = x.detach().to(torch.float32).contiguous().reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    slot = (index // channels) * SLOTS + first_channel + index % channels
    noise = _mix32(key ^ (slot & _MASK32)) & 0xFFFF
    bits = flat.view(torch.int32).to(torch.int64) & _MASK32
    special = (bits & 0x7F800000) == 0x7F800000
    nan = special & ((bits & 0x007FFFFF) != 0)
    rounded = torch.where(special, bits >> 16, (bits + noise) >> 16)
    rounded = torch.where(nan, rounded | 0x0040, rounded)
    signed = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16)
    return signed.view(torch.bfloat16).reshape(x.shape)


def round_accumulators(acc: dict[str, Tensor], iteration: int, tensor: int) -> dict[str, Tensor]:
    """``acc`` with ``m`` and ``rms`` stochastically rounded to bf16 (other entries unchanged)."""
    key = tensor_key(iteration, tensor)
    out = dict(acc)
    out["m"] = round_to_bf16(acc["m"], key, channels=acc["m"].shape[-1], first_channel=0)
    out["rms"] = round_to_bf16(acc["rms"], key, channels=1, first_channel=3)
    return out


def widen_accumulators(acc: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """``acc`` with every entry in ``dtype`` (bf16 ``m`` / ``rms`` widened for computing)."""
    return {k: v if v.dtype == dtype else v.to(dtype) for k, v in acc.items()}
