"""The fused CPU step of Celo2 / Celo2Base / MuCelo2: the C kernel's elementwise part, the rest in torch.

Per tensor routed to the learned rule (docs/reference/celo2.md#one-step):

- kernel.c (:func:`~lightning_lopt.optim.fused.driver.celo2_directions`): steps 1–4, the clipped
  gradient, the accumulators (written in place), the 30 (or 15) features, their second-moment
  normalisation over the matrix axes per slice, and the 30→8→8→3 MLP, giving d;
- torch (:func:`lightning_lopt.optim.functional.celo2.output_direction`, the pure step's own code):
  Newton–Schulz on every matrix slice (Celo2, batched matmuls) and the RMS-1 normalisation, then
  :func:`~lightning_lopt.optim.functional.celo2.spectral_normalize` where ``ctx.spectral`` asks;
- torch: ``p ← p − step_mult·s·u − weight_decay·p``, in place; except that a tensor of at most
  one kernel work unit normalised as a whole (a vector, a matrix without Newton–Schulz) is
  normalised and stepped by the kernel itself (FINISH), where three torch passes per tensor would
  cost more than its arithmetic.

Tensors routed to the Adam branch take the pure step's Adam update
(:func:`lightning_lopt.optim.functional.celo2.adam_direction`) as torch foreach operations, all
such tensors at once: a handful of elementwise operations with no statistics, so a kernel would
gain little, but one call per tensor would cost more than the arithmetic on small vectors.

Two forms, as for the other rules (:mod:`.driver`): :func:`step_in_place` for the optimizer classes
and :func:`particle_step` for meta-training (P stacked particles, θ per particle; the torch part is
the pure functions mapped over the particle axis with ``torch.func.vmap``).

Example::

    from lightning_lopt.optim import fused
    from lightning_lopt.optim.fused import celo2_step
    new_global = celo2_step.step_in_place(fused.kernel(), lopt, params, grads, state, ctx, [0.0] * len(params))
    params, state = celo2_step.particle_step(fused.kernel(), lopt, theta, stacked, grads, stacked_state, ctx)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.functional import StepContext, celo2
from lightning_lopt.optim.functional.accumulators import work_shape
from lightning_lopt.optim.fused import driver
from lightning_lopt.optim.fused.build import Kernel
from lightning_lopt.optim.step_contract import State


def step_in_place(
    kernel: Kernel,
    module: Celo2LOpt,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    ctx: StepContext,
    weight_decays: Sequence[float],
) -> State:
    """One Celo2 step of one optimizer: writes ``params`` and ``state["tensors"]`` in place and
    returns the new global state (``iteration``).

    ``params``, ``grads`` and the accumulators must be contiguous float32 (the tensor-step seam
    makes them so, :func:`lightning_lopt.optim.fast_steps.run_in_place`).
    """
    iteration = state["iteration"] + 1
    accumulators = state["tensors"]
    learned = [i for i, acc in enumerate(accumulators) if "adam_m" not in acc]
    multipliers = [module.step_mult * float(s) for s in ctx.scales]
    spectral = ctx.spectral if ctx.spectral is not None else [None] * len(params)
    whole = {i for i in learned if _normalised_whole(max(params[i].dim(), 1), spectral[i], module.orthogonalize)}
    # Small tensors normalised as a whole are also normalised and stepped by the kernel (FINISH in
    # kernel.c): per tensor, the three foreach passes below cost more than the kernel's arithmetic.
    finished = {
        i
        for i in whole
        if params[i].numel() <= driver.CELO2_FINISH_MAX and (multipliers[i] != 0.0 or weight_decays[i] != 0.0)
    }
    directions = driver.celo2_directions(
        kernel,
        module,
        [params[i] for i in learned],
        [grads[i] for i in learned],
        [accumulators[i] for i in learned],
        learned,
        state["iteration"],
        finish=[(multipliers[i], float(weight_decays[i])) if i in finished else (0.0, 0.0) for i in learned],
    )
    updates: dict[int, Tensor] = {}
    for i, d in zip(learned, directions):
        if i in finished:
            continue
        if i in whole:  # normalised below, with the other whole tensors, from one foreach norm
            updates[i] = d
        else:
            updates[i] = celo2.output_direction(d, orthogonalize_matrices=module.orthogonalize, layout=module.layout)
            if spectral[i] is not None:  # the pure step's order: steps 5–6, then the target
                updates[i] = celo2.spectral_normalize(updates[i], spectral[i], module.layout)
    by_torch = [i for i in learned if i in whole and i not in finished]
    if by_torch:
        for i, factor in zip(by_torch, _whole_tensor_normalizers([updates[i] for i in by_torch])):
            multipliers[i] *= factor
    adam = [i for i, acc in enumerate(accumulators) if "adam_m" in acc]
    if adam:
        directions = _adam_directions_in_place(
            [grads[i] for i in adam], [accumulators[i] for i in adam], int(iteration), module.adam_mode
        )
        updates.update(zip(adam, directions))
        for i in adam:
            multipliers[i] *= module.adam_lr_mult
    # p − step_mult·s·u − wd·p (the pure step, then the wrappers' decay on the pre-update p), as
    # foreach operations: with many small tensors the per-operation overhead dominates, so the
    # whole-tensor normalisation and the Adam branch's lr multiplier ride on the one scaling.
    rest = sorted(updates)
    if not rest:
        return {"iteration": iteration}
    steps = [updates[i] if updates[i].shape == params[i].shape else updates[i].view(params[i].shape) for i in rest]
    torch._foreach_mul_(steps, [multipliers[i] for i in rest])  # a view above costs 2 µs: only where shapes differ
    decayed = [k for k, i in enumerate(rest) if weight_decays[i]]
    if decayed:
        torch._foreach_add_(
            [steps[k] for k in decayed], torch._foreach_mul([params[rest[k]] for k in decayed], [float(weight_decays[rest[k]]) for k in decayed])
        )
    torch._foreach_sub_([params[i] for i in rest], steps)
    return {"iteration": iteration}


def _normalised_whole(rank: int, spectral_target: float | None, orthogonalize: bool) -> bool:
    """Whether the pure step normalises a tensor's direction as a whole: vectors, and matrices that
    skip Newton–Schulz and have no spectral target (a vector's target is ignored, as there)."""
    return rank == 1 or (rank == 2 and not orthogonalize and spectral_target is None)


def _adam_directions_in_place(grads: list[Tensor], accumulators: list[State], iteration: int, adam_mode: str) -> list[Tensor]:
    """The Adam branch of every tensor routed to it, as foreach operations (one call per operation,
    not per tensor: the branch takes vectors, biases and norms, many small tensors); updates the
    moments in place. Equals :func:`~lightning_lopt.optim.functional.celo2.adam_direction` per
    tensor to float32 rounding (the bias corrections are folded into scalars)."""
    b1, b2 = celo2.ADAM_BETAS
    ms = [acc["adam_m"] for acc in accumulators]
    vs = [acc["adam_v"] for acc in accumulators]
    gs = [g.view(m.shape) for g, m in zip(grads, ms)]
    # NaN → 0 and ±inf → ±max, as the pure step; a non-finite norm flags the tensors that need it
    # (a huge finite one only costs a copy).
    finite = torch.isfinite(torch.stack(torch._foreach_norm(gs))).tolist()
    gs = [g if ok else torch.nan_to_num(g) for g, ok in zip(gs, finite)]
    torch._foreach_mul_(ms, b1)
    torch._foreach_add_(ms, gs, alpha=1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
    if adam_mode == "adamw":
        # m̂ / (√v̂ + eps) with m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t)
        denominators = torch._foreach_div(vs, 1 - b2**iteration)
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, celo2.ADAM_EPS)
        directions = torch._foreach_div(ms, denominators)
        torch._foreach_div_(directions, 1 - b1**iteration)
    else:
        # m · rsqrt(v + eps): the meta-training form, without bias correction
        directions = torch._foreach_add(vs, celo2.ADAM_EPS)
        torch._foreach_rsqrt_(directions)
        torch._foreach_mul_(directions, ms)
    return directions


def _whole_tensor_normalizers(directions: list[Tensor]) -> list[float]:
    """rsqrt(1e-9 + mean(d²)) of each tensor normalised as a whole (vectors, and matrices without
    Newton–Schulz): the pure step's output normalisation, u = d · factor, from one foreach norm."""
    norms = torch.stack(torch._foreach_norm(directions))
    sizes = torch.tensor([d.numel() for d in directions], dtype=norms.dtype)
    return torch.rsqrt(celo2.NORMALIZER_EPS + norms.square() / sizes).tolist()


def particle_step(
    kernel: Kernel,
    module: Celo2LOpt,
    theta: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    state: State,
    ctx: StepContext,
) -> tuple[list[Tensor], State]:
    """P stacked particles (leading axis everywhere, θ per particle); new tensors, inputs untouched.

    Returns what :func:`~lightning_lopt.optim.particle_step.vmapped_pure_step` returns, within
    float32 rounding.
    """
    iteration = state["iteration"]
    new_iteration = iteration + 1
    accumulators = state["tensors"]
    learned = [i for i, acc in enumerate(accumulators) if "adam_m" not in acc]
    params = [p.contiguous() for p in params]
    new_tensors: list[dict[str, Tensor]] = [{} for _ in accumulators]
    jobs = []
    directions: dict[int, Tensor] = {}
    for i in learned:
        shape = work_shape(params[i].shape[1:])
        directions[i] = torch.empty((params[i].shape[0], *shape), dtype=torch.float32)
        new_tensors[i] = {k: torch.empty_like(v) for k, v in accumulators[i].items()}
        jobs.append(
            driver._Job(
                shape,
                module.layout,
                params[i],
                directions[i],
                grads[i].to(torch.float32).contiguous(),
                {k: v.contiguous() for k, v in accumulators[i].items()},
                new_tensors[i],
                0.0,
                0.0,
                i,
                driver.normalisation_view(shape, module.layout),
            )
        )
    if jobs:
        driver._launch(kernel, module, driver._celo2_nets(theta, iteration), jobs)
    output = torch.func.vmap(
        functools.partial(celo2.output_direction, orthogonalize_matrices=module.orthogonalize, layout=module.layout)
    )
    adam = torch.func.vmap(functools.partial(celo2.adam_direction, adam_mode=module.adam_mode))
    new_params = []
    for i, (p, g, acc) in enumerate(zip(params, grads, accumulators)):
        if i in directions:
            u = output(directions[i])
            if ctx.spectral is not None and ctx.spectral[i] is not None and u.dim() >= 3:
                normalize = functools.partial(celo2.spectral_normalize, target=ctx.spectral[i], layout=module.layout)
                u = torch.func.vmap(normalize)(u)
        else:
            u, new_tensors[i] = adam(g.reshape(g.shape[0], *work_shape(g.shape[1:])), acc, new_iteration)
            u = module.adam_lr_mult * u
        new_params.append(p - (module.step_mult * float(ctx.scales[i])) * u.reshape(p.shape))
    return new_params, {"iteration": new_iteration, "tensors": new_tensors}
