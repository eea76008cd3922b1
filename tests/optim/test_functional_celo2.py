"""Celo2's pure step against an independent NumPy float64 implementation of docs/reference/celo2.md#the-update-rule.

The reference below is written from the spec alone, on tensors in the JAX layout (Linear ``[in,
out]``, conv ``HWIO``), with the "last two axes" and numpy-argsort rules literally; torch-layout
tensors are permuted to the JAX view before and back after. It shares no code with the library.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_lopt.optim.celo2_lopt import Celo2LOpt
from lightning_lopt.optim.functional import StepContext, celo2
from lightning_lopt.optim.functional.newton_schulz import newton_schulz

# -- the independent reference ----------------------------------------------------------------

MOM, RMS, ADAF = (0.9, 0.99, 0.999), 0.95, (0.9, 0.99, 0.999)


def ref_newton_schulz(x):
    a, b, c = 3.4445, -4.7750, 2.0315
    swap = x.shape[-2] > x.shape[-1]
    if swap:
        x = np.swapaxes(x, -1, -2)
    x = x / (np.sqrt((x * x).sum(axis=(-2, -1), keepdims=True)) + 1e-8)
    for _ in range(5):
        A = x @ np.swapaxes(x, -1, -2)
        B = b * A + c * A @ A
        x = a * x + B @ x
    return np.swapaxes(x, -1, -2) if swap else x


def ref_init(shape, adam):
    shape = shape or (1,)
    if adam:
        return {"m": np.zeros(shape), "v": np.zeros(shape)}
    st = {"m": np.zeros((*shape, 3)), "v": np.zeros((*shape, 1))}
    if len(shape) >= 2:
        d1, d0 = np.argsort(shape, kind="stable")[-2:]
        st["vr"] = np.zeros((*np.delete(shape, d0), 3))
        st["vc"] = np.zeros((*np.delete(shape, d1), 3))
    else:
        st["vd"] = np.zeros((*shape, 3))
    return st


def ref_learned(th, p, g, st, ortho):
    """One learned-rule step on a JAX-layout tensor; returns (u, new state)."""
    g = np.clip(np.nan_to_num(g), -1000, 1000)
    m = st["m"] * np.array(MOM) + (1 - np.array(MOM)) * g[..., None]
    v = RMS * st["v"] + (1 - RMS) * (g * g)[..., None]
    q = g * g + 1e-30
    new = {"m": m, "v": v}
    groups = [g[..., None], np.clip(g, -0.1, 0.1)[..., None], p[..., None], m, v,
              m / np.sqrt(v + 1e-8), 1 / np.sqrt(v + 1e-8)]
    if p.ndim >= 2:
        d1, d0 = (int(a) for a in np.argsort(p.shape, kind="stable")[-2:])
        vr = st["vr"] * np.array(ADAF) + (1 - np.array(ADAF)) * q.mean(axis=d0)[..., None]
        vc = st["vc"] * np.array(ADAF) + (1 - np.array(ADAF)) * q.mean(axis=d1)[..., None]
        new.update(vr=vr, vc=vc)
        d1r = d1 if d1 < d0 else d1 - 1  # d1's index within vr
        r = 1 / np.sqrt(np.maximum(vr / (vr.mean(axis=d1r, keepdims=True) + 1e-9), 1e-9))
        c = 1 / np.sqrt(np.maximum(vc, 1e-9))
        r_full = np.broadcast_to(np.expand_dims(r, d0), (*p.shape, 3))
        c_full = np.broadcast_to(np.expand_dims(c, d1), (*p.shape, 3))
        fac_g = g[..., None] * r_full * c_full
    else:
        vd = st["vd"] * np.array(ADAF) + (1 - np.array(ADAF)) * q[..., None]
        new["vd"] = vd
        fac_g = g[..., None] / np.sqrt(np.maximum(vd + 1e-9, 1e-9))
    groups += [fac_g, g[..., None] / np.sqrt(v + 1e-8)]
    if p.ndim >= 2:
        vr_t = np.broadcast_to(np.expand_dims(vr, d0), (*p.shape, 3))
        vc_t = np.broadcast_to(np.expand_dims(vc, d1), (*p.shape, 3))
        groups += [vr_t, vc_t, 1 / np.sqrt(vr_t + 1e-8), 1 / np.sqrt(vc_t + 1e-8), m * r_full * c_full]
    axes = (-3, -2) if p.ndim >= 2 else (-2,)  # the last two parameter axes (channel axis last)
    x = np.concatenate([gr / np.sqrt(1e-9 + (gr * gr).mean(axis=axes, keepdims=True)) for gr in groups], -1)
    w0 = th["w0"][: x.shape[-1]]
    h = np.maximum(x @ w0 + th["b0"], 0)
    h = np.maximum(h @ th["w1"] + th["b1"], 0)
    d = (h @ th["w2"] + th["b2"])[..., 0]
    if ortho and p.ndim >= 2:
        d = ref_newton_schulz(d)
    axes = (-2, -1) if p.ndim >= 2 else (-1,)
    return d / np.sqrt(1e-9 + (d * d).mean(axis=axes, keepdims=True)), new


def ref_adam(g, st, t, mode):
    g = np.nan_to_num(g)
    m = 0.9 * st["m"] + 0.1 * g
    v = 0.95 * st["v"] + 0.05 * g * g
    if mode == "adamw":
        u = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.95**t)) + 1e-8)
    else:
        u = m / np.sqrt(v + 1e-8)
    return u, {"m": m, "v": v}


def to_jax(x):
    return x if x.ndim < 2 else np.transpose(x, (*range(2, x.ndim), 1, 0))


def from_jax(x):
    return x if x.ndim < 2 else np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))


def haiku_theta(lopt):
    sd = {k: v.double().numpy() for k, v in lopt.state_dict().items()}
    return {"w0": sd["mlp.0.weight"].T, "b0": sd["mlp.0.bias"], "w1": sd["mlp.1.weight"].T,
            "b1": sd["mlp.1.bias"], "w2": sd["mlp.2.weight"].T, "b2": sd["mlp.2.bias"]}


def ref_spectral(u, target):
    """target · u / sqrt(Σσ⁴ / Σσ²) per matrix of the last two axes (JAX view), by SVD."""
    s = np.linalg.svd(u, compute_uv=False)
    eff = np.sqrt((s**4).sum(axis=-1) / (s**2).sum(axis=-1))
    return target * u / eff[..., None, None]


def run_reference(lopt, params, grads_per_step, lrs, torch_layout=True, spectral=None):
    """Reference trajectory; ``params`` numpy arrays in the caller's layout; ``spectral[i]`` a target
    effective spectral norm for tensor i's learned direction, or None."""
    spectral = spectral or [None] * len(params)
    th = haiku_theta(lopt)
    view = (to_jax, from_jax) if torch_layout else (lambda x: x, lambda x: x)
    adam = [lopt.adam_1d and p.ndim <= 1 for p in params]
    ps = [view[0](p) if p.ndim else p.reshape(1) for p in params]
    states = [ref_init(p.shape, a) for p, a in zip(ps, adam)]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (g, a) in enumerate(zip(grads, adam)):
            g = view[0](g).reshape(ps[i].shape)
            if a:
                u, states[i] = ref_adam(g, states[i], t, lopt.adam_mode)
                u = lopt.adam_lr_mult * u
            else:
                u, states[i] = ref_learned(th, ps[i], g, states[i], lopt.orthogonalize)
                if spectral[i] is not None:
                    u = ref_spectral(u, spectral[i])
            ps[i] = ps[i] - lopt.step_mult * lrs[i] * u
    return [view[1](p).reshape(orig.shape) for p, orig in zip(ps, params)]


# -- the tests --------------------------------------------------------------------------------

SHAPES = [(), (7,), (6, 4), (4, 6), (5, 5), (3, 4, 5), (6, 3, 3, 3), (2, 3, 4, 4)]


def trajectory(lopt, shapes, steps=4, dtype=torch.float64, corrupt=False, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) * 10.0 ** rng.integers(-4, 1) for s in shapes] for _ in range(steps)]
    if corrupt:  # NaN, ±inf and huge values in step 2, on every tensor with room for them
        for g in grads[1]:
            flat = g.reshape(-1)
            flat[0] = np.nan
            if flat.size > 2:
                flat[1], flat[2] = 1e6, -1e9
            if flat.size > 3 and not (lopt.adam_1d and g.ndim <= 1):
                flat[3] = np.inf
    lrs = [10.0 ** -(i % 3 + 1) for i in range(len(shapes))]
    return params, grads, lrs


def run_library(lopt, params, grads, lrs, dtype=torch.float64, spectral=None):
    lopt = lopt.to(dtype).requires_grad_(False)
    ps = [torch.tensor(p, dtype=dtype) for p in params]
    state = lopt.init_state(ps)
    for gs in grads:
        ctx = StepContext(lrs, None, 0, spectral)
        ps, state = lopt.step(ps, [torch.tensor(g, dtype=dtype) for g in gs], state, ctx)
    return [p.numpy() for p in ps]


VARIANTS = {
    "celo2": lambda: Celo2LOpt(),
    "celo2-base": lambda: Celo2LOpt.base(),
    "celo2-meta-training-adam": lambda: Celo2LOpt.meta_training(),
}


@pytest.mark.parametrize("corrupt", [False, True], ids=["finite", "nan-inf-huge"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_step_equals_independent_reference(variant, corrupt):
    lopt = VARIANTS[variant]()
    params, grads, lrs = trajectory(lopt, SHAPES, corrupt=corrupt)
    expected = run_reference(lopt, params, grads, lrs)
    got = run_library(lopt, params, grads, lrs)
    for shape, e, g in zip(SHAPES, expected, got):
        assert np.isfinite(g).all(), shape
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-10, err_msg=str(shape))


@pytest.mark.parametrize("corrupt", [False, True], ids=["finite", "nan-inf-huge"])
@pytest.mark.parametrize("variant", ["celo2", "celo2-base"])
def test_spectral_targets_equal_the_reference_renormalised_by_svd(variant, corrupt):
    """ctx.spectral (MuCelo2's hidden matrices): each learned matrix slice's direction is rescaled to
    the target sqrt(Σσ⁴/Σσ²); the reference takes σ from an SVD, the library from a Gram matrix."""
    lopt = VARIANTS[variant]()
    params, grads, lrs = trajectory(lopt, SHAPES, corrupt=corrupt)
    spectral = [1.0 / (k + 1) if len(shape) >= 2 else None for k, shape in enumerate(SHAPES)]  # below every σ
    expected = run_reference(lopt, params, grads, lrs, spectral=spectral)
    got = run_library(lopt, params, grads, lrs, spectral=spectral)
    plain = run_library(lopt, params, grads, lrs)
    for shape, e, g, q, p0 in zip(SHAPES, expected, got, plain, params):
        assert np.isfinite(g).all(), shape
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-10, err_msg=str(shape))
        if len(shape) >= 2:  # the targets change every matrix's step by far more than the tolerance
            assert np.abs(g - q).max() > 0.1 * np.abs(q - p0).max(), shape


@pytest.mark.parametrize("layout", ["torch", "jax"])
def test_spectral_normalize_per_matrix_slice_and_errors(layout):
    torch.manual_seed(2)
    for shape in [(6, 4), (4, 6), (6, 4, 3, 2)]:
        u = torch.randn(shape, dtype=torch.float64)
        u[..., 0] = 0.0 if len(shape) > 2 else u[..., 0]  # a zero slice (torch layout, rank 4) stays zero
        got = celo2.spectral_normalize(u, 3.0, layout)
        view = to_jax(u.numpy()) if layout == "torch" else u.numpy()
        zero = np.abs(view).sum(axis=(-2, -1)) == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = np.where(zero[..., None, None], 0.0, ref_spectral(view, 3.0))
        ref = from_jax(ref) if layout == "torch" else ref
        np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12, err_msg=str(shape))
    with pytest.raises(ValueError, match="rank >= 2"):
        celo2.spectral_normalize(torch.ones(3), 1.0, layout)
    with pytest.raises(ValueError, match="ctx.spectral must have one entry per tensor"):
        lopt = Celo2LOpt().double()
        p = torch.randn(3, 3, dtype=torch.float64)
        lopt.step([p], [p], lopt.init_state([p]), StepContext([1.0], None, 0, [1.0, 2.0]))


def test_jax_layout_equals_reference_on_jax_tensors():
    lopt = Celo2LOpt(layout="jax")
    shapes = [(5, 5), (3, 3, 4, 6), (7,)]
    params, grads, lrs = trajectory(lopt, shapes)
    expected = run_reference(lopt, params, grads, lrs, torch_layout=False)
    for e, g in zip(expected, run_library(lopt, params, grads, lrs)):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-10)


def test_conv_matrix_is_in_out_plane_per_spatial_position():
    """A torch conv weight [out, in, kh, kw] is orthogonalised as kh·kw matrices of shape (in, out)."""
    torch.manual_seed(1)
    lopt = Celo2LOpt().double()
    p = torch.randn(6, 4, 3, 2, dtype=torch.float64)
    g = torch.randn_like(p)
    (new,), _ = lopt.step([p], [g], lopt.init_state([p]), StepContext([1.0], None, 0))
    u = p - new
    for i in range(3):
        for j in range(2):
            plane = u[:, :, i, j]  # (out, in) at one position
            assert plane.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-6)
            s = torch.linalg.svdvals(plane)
            assert s.max() / s.min() < 2.0  # orthogonalised: 5 quintic NS steps leave σ within ~2x
    # whereas a (kh, kw) slice for fixed (out, in) is not normalised on its own
    rms = u.pow(2).mean(dim=(2, 3)).sqrt()
    assert (rms - 1).abs().max() > 0.1


def test_float32_differs_from_float64_by_newton_schulz_rounding():
    """The float32 update u (RMS 1 per matrix) differs from float64 per element by at most 3.3e-5 with
    NS and 2.0e-5 without (median 1.1e-5 / 5.8e-6; 10 seeds, one step, these shapes): float32 rounding
    of features scaled up to 1e4 by rsqrt(v + 1e-8), amplified ~1.7x by the five NS iterations."""
    for make, bound in ((Celo2LOpt, 2e-4), (Celo2LOpt.base, 1e-4)):
        lopt = make()
        params, grads, lrs = trajectory(lopt, SHAPES, steps=1, seed=3)
        lrs = [1.0] * len(SHAPES)
        lo = run_library(lopt, params, grads, lrs, dtype=torch.float32)
        hi = run_library(lopt, params, grads, lrs, dtype=torch.float64)
        worst = max(np.abs(a.astype(np.float64) - b).max() for a, b in zip(lo, hi))
        assert worst < bound


def test_newton_schulz_batches_leading_axes_and_transposes_tall_matrices():
    x = torch.randn(2, 3, 7, 4, dtype=torch.float64)
    out = newton_schulz(x)
    np.testing.assert_allclose(out.numpy(), ref_newton_schulz(x.numpy()), atol=1e-12)
    np.testing.assert_allclose(newton_schulz(x[1, 2]).numpy(), out[1, 2].numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="rank >= 2"):
        newton_schulz(torch.randn(3))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="adam_mode"):
        Celo2LOpt(adam_mode="sgd")
    lopt = Celo2LOpt()
    p = [torch.randn(3, 3)]
    with pytest.raises(ValueError, match="one flag per tensor"):
        lopt.init_state(p, adam=[True, False])
    with pytest.raises(ValueError, match="one entry per tensor"):
        lopt.step(p, p, lopt.init_state(p), StepContext([1.0, 1.0], None, 0))


def test_vmapped_particle_step_equals_each_particle_step():
    """The meta-training seam: particles stacked on a leading axis step as they would one by one."""
    from lightning_lopt.optim.particle_step import particle_step, stack_state

    lopt = Celo2LOpt.meta_training()
    g = torch.Generator().manual_seed(2)
    thetas = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in lopt.state_dict().items()} for _ in range(3)]
    shapes = [(6, 4), (4,), (2, 3, 3, 3)]
    params = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    ctx = StepContext([1.0] * len(shapes), None, 0)
    states = [lopt.init_state(p) for p in params]
    stacked = particle_step(
        lopt,
        {k: torch.stack([t[k] for t in thetas]) for k in thetas[0]},
        [torch.stack(ps) for ps in zip(*params)],
        [torch.stack(gs) for gs in zip(*grads)],
        stack_state(states),
        ctx,
    )[0]
    for i in range(3):
        single, _ = celo2.step(thetas[i], params[i], grads[i], states[i], ctx, **lopt.step_config)
        for a, b in zip(single, stacked):
            torch.testing.assert_close(b[i], a, rtol=1e-5, atol=1e-6)


def test_from_haiku_maps_the_authors_tree():
    """``ff_mod_stack/~/w0__k`` blocks ([ch_k, 8], k order) stack into the first layer; (in, out) → [out, in]."""
    rng = np.random.default_rng(4)
    tree = {f"ff_mod_stack/~/w0__{k}": rng.standard_normal((c, 8)) for k, c in enumerate(celo2.GROUP_CHANNELS)}
    tree.update({f"ff_mod_stack/~/{n}": rng.standard_normal(s) for n, s in
                 [("b0", (8,)), ("w1", (8, 8)), ("b1", (8,)), ("w2", (8, 3)), ("b2", (3,))]})
    lopt = Celo2LOpt.from_haiku(tree)
    th = haiku_theta(lopt)
    w0 = np.concatenate([tree[f"ff_mod_stack/~/w0__{k}"] for k in range(14)])
    np.testing.assert_allclose(th["w0"], w0.astype(np.float32))
    np.testing.assert_allclose(th["w2"], tree["ff_mod_stack/~/w2"].astype(np.float32))
    with pytest.raises(KeyError, match="w0__13"):
        Celo2LOpt.from_haiku({k: v for k, v in tree.items() if not k.endswith("w0__13")})
