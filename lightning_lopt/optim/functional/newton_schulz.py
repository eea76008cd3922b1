"""Newton–Schulz orthogonalisation of matrices, batched over leading axes
(docs/reference/celo2.md#orthogonalisation-and-output-normalisation).

Muon's quintic iteration, as Celo2 uses it: for a matrix X (the last two axes; every leading axis
is a batch of independent matrices),

1. if rows > columns, work on Xᵀ (so ``X Xᵀ`` is the smaller Gram matrix);
2. X ← X / (‖X‖_F + 1e-8), the Frobenius norm of each matrix;
3. five times: A = X Xᵀ, B = b·A + c·A², X ← a·X + B·X, with (a, b, c) = (3.4445, −4.7750, 2.0315);
4. transpose back.

Everything is a batched ``matmul`` (BLAS on CPU, tensor cores on GPU) in the input's dtype. The
result approximates U Vᵀ of X = U Σ Vᵀ; the quintic is tuned for speed, not exactness, so singular
values end in roughly [0.7, 1.2] rather than at 1.

Example::

    o = newton_schulz(torch.randn(4, 32, 64))    # four (32, 64) matrices, orthogonalised
"""

from __future__ import annotations

import torch
from torch import Tensor

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
STEPS = 5
EPS = 1e-8


def newton_schulz(x: Tensor, steps: int = STEPS, eps: float = EPS) -> Tensor:
    """Orthogonalise every matrix ``x[..., :, :]``; ``x`` has rank ≥ 2. Pure (no in-place writes)."""
    if x.dim() < 2:
        raise ValueError(f"newton_schulz needs a tensor of rank >= 2, got shape {list(x.shape)}")
    a, b, c = COEFFICIENTS
    transpose = x.shape[-2] > x.shape[-1]  # a static shape test: fine under vmap
    if transpose:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / (norm + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if transpose else x
