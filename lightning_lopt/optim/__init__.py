"""Optimizers: hand-designed baselines, learned optimizers and the registry.

Example::

    from lightning_lopt.optim import build, available, MuLO
    opt = build("muadam", model.named_parameters(), lr=1e-2)
    opt = MuLO(model.parameters())
"""

# Every architecture from_pretrained can build declares itself (its ``architecture``) here, first;
# pretrained.py never imports them back.
from lightning_lopt.optim import architectures, celo2_lopt  # noqa: F401
from lightning_lopt.optim.baselines import MuAdam
from lightning_lopt.optim.celo2 import Celo2, Celo2Base, MuCelo2
from lightning_lopt.optim.learned import LearnedOptimizer
from lightning_lopt.optim.optimizers import LO, Celo, MuLO, MuVeLO, VeLO
from lightning_lopt.optim.param_groups import param_groups_by_role
from lightning_lopt.optim.registry import available, build, default_lr, register, resolve
from lightning_lopt.optim.scaling import scaled_param_groups

__all__ = [
    "LO",
    "Celo",
    "Celo2",
    "Celo2Base",
    "LearnedOptimizer",
    "MuAdam",
    "MuCelo2",
    "MuLO",
    "MuVeLO",
    "VeLO",
    "available",
    "build",
    "default_lr",
    "param_groups_by_role",
    "register",
    "resolve",
    "scaled_param_groups",
]
