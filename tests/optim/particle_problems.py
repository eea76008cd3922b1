"""A stacked-particle problem shared by the kernel tests (fused CPU and GPU step against the pure step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_lopt.optim.particle_step import stack_state


def stacked_problem(module, shapes: Sequence[tuple[int, ...]], particles: int, seed: int = 0, device="cpu"):
    """θ per particle (distinct), parameters and fresh stacked state, on ``device``; and the generator.

    ``module``'s own parameters are perturbed in place (so θ is not an untrained initialisation).
    Every draw is made on the CPU generator, so the numbers do not depend on ``device``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    theta = {
        k: (v.detach().unsqueeze(0).repeat(particles, *[1] * v.dim()) + 0.01 * torch.randn(particles, *v.shape, generator=g)).to(device)
        for k, v in module.state_dict().items()
    }
    params = [(0.5 * torch.randn(particles, *s, generator=g)).to(device) for s in shapes]
    state = stack_state(
        [
            module.functional.init_state({k: v[i] for k, v in theta.items()}, [p[i] for p in params], layout=module.layout)
            for i in range(particles)
        ]
    )
    return theta, params, state, g
