"""Warm start: regress the learned optimizer's step onto a tuned Adam's before PES.

PES from a random meta-initialisation spends its first hundreds of meta-steps learning what Adam
already does. With little compute, a warm start is cheaper: along Adam trajectories on the
meta-training tasks, fit θ so that the learned step matches Adam's. For μ optimizers the teacher is
μAdam (Adam with the per-tensor μP scale s_p on the step), for SP ones plain Adam; both use the same
tasks and the same budget, so μLO and LO are warm-started alike.

At every teacher step the learned optimizer's accumulators follow the teacher's gradients exactly
as they would in its own run (they depend on the gradients only); every ``every`` steps one
regression update of θ minimises, per tensor, the relative squared error

    ‖Δ_θ − Δ_Adam‖² / ‖Δ_Adam‖²,   Δ_θ = p − step_θ(p, g, state),  Δ_Adam = lr · s_p · m̂ / (√v̂ + ε)

averaged over tensors and seeds (tensors whose teacher step is exactly zero are left out: they
have no relative error), with Adam(``fit_lr``) on θ. The result is a starting θ, recorded
on the weight card; PES then improves on it.

Example::

    warm = WarmStart(lr=0.03, steps=400, seeds=4)
    report = warm_start(meta.lopt, meta.instances, warm, mu=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_lopt.meta.rng import generator
from lightning_lopt.meta.tasks import TaskInstance
from lightning_lopt.meta.unroll import make_loss_and_grad
from lightning_lopt.optim.architectures import LearnedOptimizerModule
from lightning_lopt.optim.functional import StepContext

#: Key space of the warm start's draws (distinct from meta-training's and held-out runs').
WARM_START_KEY = 2**30


@dataclass(frozen=True)
class WarmStart:
    """Settings of the regression onto Adam.

    Args:
        lr: the teacher's learning rate (tune it on the meta-training tasks, never on evaluation tasks).
        betas, eps: the teacher's Adam constants.
        steps: teacher steps per trajectory (up to the meta-training horizon).
        seeds: trajectories per task instance, run side by side.
        every: one regression update of θ every ``every`` teacher steps.
        fit_lr: Adam's learning rate on θ.
        rounds: how many times the trajectories are re-run (fresh seeds each round).
    """

    lr: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    steps: int = 500
    seeds: int = 4
    every: int = 2
    fit_lr: float = 3e-3
    rounds: int = 1


def _adam_update(grads: Sequence[Tensor], m: list[Tensor], v: list[Tensor], t: int, warm: WarmStart) -> list[Tensor]:
    """One bias-corrected Adam direction per tensor (updates ``m`` and ``v`` in place)."""
    b1, b2 = warm.betas
    out = []
    for g, mi, vi in zip(grads, m, v):
        mi.mul_(b1).add_(g, alpha=1 - b1)
        vi.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = mi / (1 - b1 ** (t + 1))
        v_hat = vi / (1 - b2 ** (t + 1))
        out.append(m_hat / (v_hat.sqrt() + warm.eps))
    return out


def relative_step_error(params: Sequence[Tensor], new_params: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor | None:
    """Mean over (tensor, seed) of ‖Δ_θ − Δ_Adam‖² / ‖Δ_Adam‖², leaving out zero teacher steps.

    A tensor whose teacher step is exactly zero (at step 0 of a μP MLP the zero-initialised readout
    gives zero hidden-layer gradients, so Adam's step is 0) has no relative error: dividing by a tiny
    constant instead made the error about 1e25 and let those tensors dominate the fit. Returns
    ``None`` when every teacher step is zero. Tensors are stacked over seeds (dim 0).
    """
    terms, weights = [], []
    for p, new, target in zip(params, new_params, teacher):
        dims = tuple(range(1, p.dim()))
        norm = (target**2).sum(dim=dims)
        nonzero = norm > 0
        err = ((p - new - target) ** 2).sum(dim=dims) / torch.where(nonzero, norm, torch.ones_like(norm))
        terms.append(torch.where(nonzero, err, torch.zeros_like(err)))
        weights.append(nonzero.to(err.dtype))
    count = torch.stack(weights).sum()
    if count == 0:
        return None
    return torch.stack(terms).sum() / count


def warm_start(
    lopt: LearnedOptimizerModule, instances: Sequence[TaskInstance], warm: WarmStart, *, mu: bool
) -> dict[str, Any]:
    """Fit ``lopt``'s θ in place; returns a report (the final relative error per instance)."""
    fit = torch.optim.Adam([p for p in lopt.parameters() if p.requires_grad], lr=warm.fit_lr)
    pure = lopt.pure_step
    errors: dict[str, list[float]] = {inst.label: [] for inst in instances}
    for round_index in range(warm.rounds):
        for index, inst in enumerate(instances):
            errors[inst.label] += _fit_instance(lopt, pure, inst, warm, fit, round_index, index)
    window = lambda xs: round(sum(xs) / max(1, len(xs)), 4)  # noqa: E731
    return {
        "settings": {**vars(warm), "teacher": "muadam" if mu else "adam"},
        # Relative squared error of the learned step against the teacher's, first and last 10 fits.
        "relative_error_start": {k: window(v[:10]) for k, v in errors.items()},
        "relative_error_end": {k: window(v[-10:]) for k, v in errors.items()},
    }


def _fit_instance(
    lopt: LearnedOptimizerModule,
    pure: Any,
    inst: TaskInstance,
    warm: WarmStart,
    fit: torch.optim.Optimizer,
    round_index: int,
    index: int,
) -> list[float]:
    """One round of teacher trajectories on one instance; returns the regression errors."""
    n = warm.seeds
    seeds = [int(torch.randint(0, 2**62, (1,), generator=generator(WARM_START_KEY, round_index, index, s))) for s in range(n)]
    params = [torch.stack(ps) for ps in zip(*[inst.init(s) for s in seeds])]
    theta0 = {k: v.detach() for k, v in lopt.state_dict().items()}
    states = [lopt.functional.init_state(theta0, [p[i] for p in params], layout=lopt.layout) for i in range(n)]
    state = torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *states)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    loss_and_grad = make_loss_and_grad(inst, False)
    batches = inst.sample(warm.steps, [generator(WARM_START_KEY, round_index, index, s, 1) for s in range(n)])
    scales = inst.scales
    errors = []
    for t in range(warm.steps):
        batch = torch.utils._pytree.tree_map(lambda x: x[t], batches)
        with torch.enable_grad():
            loss, grads = loss_and_grad(params, None, batch)
        grads = [g.detach() for g in grads]
        teacher = [warm.lr * s * d for s, d in zip(scales, _adam_update(grads, m, v, t, warm))]
        ctx = StepContext(scales, loss.detach(), warm.steps, inst.spectral)

        def one(theta, p, g, s, loss):
            return pure(theta, p, g, s, StepContext(scales, loss, warm.steps, inst.spectral))

        regress = t % warm.every == 0
        theta = lopt.theta() if regress else {k: v.detach() for k, v in lopt.theta().items()}
        with torch.set_grad_enabled(regress):
            new_params, new_state = torch.func.vmap(one, in_dims=(None, 0, 0, 0, 0))(theta, params, grads, state, ctx.loss)
        objective = relative_step_error(params, new_params, teacher) if regress else None
        if objective is not None:
            fit.zero_grad()
            objective.backward()
            fit.step()
            errors.append(float(objective.detach()))
        state = torch.utils._pytree.tree_map(lambda x: x.detach(), new_state)
        params = [p - d for p, d in zip(params, teacher)]
    return errors
