"""The per-tensor LSTM shared by Celo's learned scheduler and VeLO (docs/reference/celo.md#learned-scheduler,
docs/reference/velo.md#lstm).

Haiku semantics, which differ from ``torch.nn.LSTM``:

- the input is mixed across tensors first: z = direct(x) + max over tensors of ReLU(mix(x));
- one Linear acts on ``[z, h]`` and its 4H outputs are the gates in the order **i, g, f, o**;
- the forget gate gets **+1** before its sigmoid: c = σ(f + 1)·c + σ(i)·tanh(g), h = σ(o)·tanh(c).

The reference also builds a first mixing Linear whose output is overwritten (dead parameters); it is
not part of θ here.

θ entries under ``prefix`` (PyTorch ``nn.Linear`` layout ``[out, in]``): ``mix.weight/bias``
(Haiku ``linear_1``), ``direct.weight/bias`` (``linear_2``), ``lstm.weight`` ``[4H, 2H]`` /
``lstm.bias`` (``rnn/linear``), ``step_size.weight/bias``, ``init_hidden``, ``init_cell``
(``lstm_init_state``) and, for VeLO, ``controls.weight/bias`` (``rnn_to_controls``).

Example::

    h, c = lstm_forward(theta, "scheduler.", x, h, c)   # x: [n_tensors, n_features]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lstm_forward(
    theta: dict[str, Tensor], prefix: str, x: Tensor, hidden: Tensor, cell: Tensor
) -> tuple[Tensor, Tensor]:
    """One mixed-input Haiku LSTM step for ``x: [n_tensors, F]``; returns the new ``(h, c)``."""
    mixed = F.relu(F.linear(x, theta[prefix + "mix.weight"], theta[prefix + "mix.bias"]))
    z = F.linear(x, theta[prefix + "direct.weight"], theta[prefix + "direct.bias"])
    z = z + mixed.amax(dim=0, keepdim=True)
    gates = F.linear(
        torch.cat([z, hidden], dim=-1), theta[prefix + "lstm.weight"], theta[prefix + "lstm.bias"]
    )
    i, g, f, o = gates.chunk(4, dim=-1)
    new_cell = torch.sigmoid(f + 1.0) * cell + torch.sigmoid(i) * torch.tanh(g)
    new_hidden = torch.sigmoid(o) * torch.tanh(new_cell)
    return new_hidden, new_cell


def head(theta: dict[str, Tensor], name: str, hidden: Tensor) -> Tensor:
    """A Linear head on the LSTM output (``step_size`` or ``controls``)."""
    return F.linear(hidden, theta[name + ".weight"], theta[name + ".bias"])
