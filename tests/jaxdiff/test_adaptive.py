"""jaxdiff.sample_adaptive: DPM-Solver-12/23 with the official error control.

Parity with the official PyTorch code (same NFE, samples equal to round-off) is measured side by side in
``benchmarks/adaptive_dpm_solver.py``; these tests check exact answers, the tolerance behaviour, the controller, a
float64 NumPy re-derivation of the whole loop on a nonlinear problem, and jit/vmap/grad.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.adaptive import _controller

S = jd.VPLinear()
GD = jd.testing.GaussianData(jnp.linspace(-1.0, 1.0, 16), jnp.linspace(0.2, 1.0, 16))
GM = jd.testing.GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[1.0, -1.0], [-1.5, 0.5]]), jnp.array([0.3, 0.6]))


@pytest.mark.parametrize("form", ["data", "noise"])
@pytest.mark.parametrize("order", [2, 3])
def test_point_mass_is_exact_in_two_attempts(order, form):
    # x0 ~ delta(0): eps = x/sigma is constant along the flow, every solver of the pair is exact, E = 0, so the
    # first attempt (h_init) is accepted and the controller jumps to the end: 2 steps, 2 * order evaluations
    point = jd.testing.GaussianData(jnp.zeros(3), jnp.zeros(3))
    x_T = jax.random.normal(jax.random.key(0), (2, 3))
    x, st = jd.sample_adaptive(point.denoiser(S), x_T, 1.0, 1e-3, order=order, form=form, args=point)
    assert (int(st.accepted), int(st.rejected), int(st.nfe)) == (2, 0, 2 * order)
    assert bool(st.reached_end) and float(st.t) == 1e-3
    expected = S.sigma(1e-3) / S.sigma(1.0) * x_T
    # the noise form's second step (lambda -4.9 -> 6.9) computes sigma_t/sigma_s (1e-3) as the difference of two
    # terms near alpha_t/alpha_s (150) whose stage errors are scaled by e^h (1e5): round-off grows to ~4e-9
    # relative (the official code has the same formulas); the data form has no such cancellation
    tol = 1e-11 if form == "data" else 1e-8  # measured 7e-13 and 4e-9
    assert float(jnp.max(jnp.abs(x - expected) / jnp.abs(expected))) < tol


@pytest.mark.parametrize("order", [2, 3])
def test_error_falls_with_the_tolerance_on_gaussian_data(order):
    x_T = jax.random.normal(jax.random.key(1), (4, 16))
    exact = GD.flow(S, x_T, 1.0, 1e-3)
    run = jax.jit(lambda x, rtol, atol: jd.sample_adaptive(GD.denoiser(S), x, 1.0, 1e-3, order=order, rtol=rtol,
                                                            atol=atol, args=GD))
    errs, nfes = [], []
    for rtol in (1e-2, 1e-3, 1e-4):
        x, st = run(x_T, rtol, 0.156 * rtol)  # the official atol/rtol ratio
        assert int(st.nfe) == order * int(st.accepted + st.rejected) and bool(st.reached_end)
        errs.append(float(jnp.max(jnp.abs(x - exact))))
        nfes.append(int(st.nfe))
    # measured (order 2): 1.5e-2, 2.1e-3, 3.2e-4 at 54, 142, 352 NFE; (order 3): 4.5e-3, 3.7e-4, 7.4e-5 at 42, 78, 135
    for rtol, err in zip((1e-2, 1e-3, 1e-4), errs):
        assert err < 5 * rtol, errs
    assert errs[0] > 4 * errs[1] and errs[1] > 4 * errs[2], errs
    assert nfes[0] < nfes[1] < nfes[2], nfes
    # NFE ~ rtol^(-1/order): per decade a factor 10^(1/order), within a factor sqrt(10)^(1/order)
    ratio = nfes[2] / nfes[1]
    assert 10 ** (0.5 / order) < ratio < 10 ** (1.5 / order), nfes


def test_controller_rule():
    lam_s, lam_end = jnp.asarray(-2.0), jnp.asarray(3.0)
    # E = 4 at order 2: h * 0.9 / 2; E = 1/8 at order 3: h * 0.9 * 2
    assert float(_controller(jnp.asarray(4.0), jnp.asarray(0.5), lam_s, lam_end, 0.9, 2)) == pytest.approx(0.225)
    assert float(_controller(jnp.asarray(0.125), jnp.asarray(0.5), lam_s, lam_end, 0.9, 3)) == pytest.approx(0.9)
    # clamped at what is left; E = 0 jumps to the end (no inf, no nan)
    assert float(_controller(jnp.asarray(1e-6), jnp.asarray(1.0), lam_s, lam_end, 0.9, 2)) == 5.0
    assert float(_controller(jnp.asarray(0.0), jnp.asarray(1.0), lam_s, lam_end, 0.9, 2)) == 5.0


# ------------------------------------------------------- float64 NumPy re-derivation of the loop (data form)

def _np_schedule(t):
    b0, b1 = 0.1, 20.0
    log_alpha = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    alpha = np.exp(log_alpha)
    sigma = np.sqrt(-np.expm1(2 * log_alpha))
    return alpha, sigma, log_alpha - np.log(sigma)


def _np_t_of_lambda(lam):
    b0, b1 = 0.1, 20.0
    log_alpha = -0.5 * np.log1p(np.exp(-2 * lam))
    return (-0.5 * b0 + np.sqrt(0.25 * b0**2 - (b1 - b0) * log_alpha)) / (0.5 * (b1 - b0))


def _np_adaptive(x, order, t_T, t_0, rtol, atol, h=0.05, theta=0.9, t_err=1e-5):
    """Algorithm 6/7 of the DPM-Solver paper in y = x/sigma: y_t = y_s + integral of e^lambda D dlambda."""

    def D(x, t):
        return np.asarray(GM.x0_eps(S, jnp.asarray(x), t)[0])

    def node(lam):
        t = _np_t_of_lambda(lam)
        a, s, _ = _np_schedule(t)
        return t, a, s

    s = t_T
    lam_s, lam_0 = _np_schedule(s)[2], _np_schedule(t_0)[2]
    x_prev, nfe, acc, rej = x, 0, 0, 0
    r1 = 0.5 if order == 2 else 1 / 3
    while abs(s - t_0) > t_err:
        h = min(h, lam_0 - lam_s)
        lam_t = lam_s + h
        t, a_t, s_t = node(lam_t) if lam_t < lam_0 else (t_0,) + _np_schedule(t_0)[:2]
        lam_t = _np_schedule(t)[2]
        hh = lam_t - lam_s
        y = x / _np_schedule(s)[1]
        d0 = D(x, s)
        # integral of e^lambda over [lam_s, lam_s + c h], and of e^lambda (lambda - lam_s)/h, in closed form
        E0 = lambda c: np.exp(lam_s) * np.expm1(c * hh)  # noqa: E731
        E1 = lambda c: np.exp(lam_s) * (np.exp(c * hh) * (c * hh - 1) + 1) / hh  # noqa: E731
        t1, _, s1 = node(lam_s + r1 * hh)
        x1 = s1 * (y + E0(r1) * d0)
        d1 = D(x1, t1)
        lo2 = s_t * (y + E0(1) * d0 + (0.5 / r1) * E0(1) * (d1 - d0))  # DPM-Solver-2 ("dpmsolver" type)
        if order == 2:
            x_lo, x_hi = s_t * (y + E0(1) * d0), lo2
        else:
            r2 = 2 / 3
            t2, _, s2 = node(lam_s + r2 * hh)
            x2 = s2 * (y + E0(r2) * d0 + E1(r2) / r1 * (d1 - d0))
            d2 = D(x2, t2)
            x_lo, x_hi = lo2, s_t * (y + E0(1) * d0 + E1(1) / r2 * (d2 - d0))
        delta = np.maximum(atol, rtol * np.maximum(np.abs(x_lo), np.abs(x_prev)))
        err = np.max(np.sqrt(np.mean(((x_hi - x_lo) / delta).reshape(x.shape[0], -1) ** 2, axis=1)))
        if err <= 1:
            x, x_prev, s, lam_s = x_hi, x_lo, t, lam_t
            acc += 1
        else:
            rej += 1
        h = min(theta * h * err ** (-1 / order) if err > 0 else np.inf, lam_0 - lam_s)
        nfe += order
    return x, nfe, acc, rej


@pytest.mark.parametrize("order", [2, 3])
def test_matches_a_numpy_rederivation_on_a_mixture(order):
    # a nonlinear field with rejections: the same accept/reject sequence and the same sample
    x_T = np.asarray(jax.random.normal(jax.random.key(3), (8, 2)))
    rtol, atol = 1e-3, 1.56e-4
    x_np, nfe, acc, rej = _np_adaptive(x_T, order, 1.0, 1e-3, rtol, atol)
    x, st = jd.sample_adaptive(GM.denoiser(S), jnp.asarray(x_T), 1.0, 1e-3, order=order, rtol=rtol, atol=atol, args=GM)
    assert rej > 0  # the problem exercises rejection
    assert (int(st.nfe), int(st.accepted), int(st.rejected)) == (nfe, acc, rej)
    assert float(jnp.max(jnp.abs(x - x_np))) < 1e-10


# --------------------------------------------------------------------------------- transformations, counts

def test_model_calls_equal_the_reported_nfe():
    calls = []

    def count(x):
        calls.append(1)
        return np.zeros((), x.dtype)

    exact_fn = GM.denoiser(S).fn

    def fn(x, t_model, params):
        return exact_fn(x, t_model, params) + jax.experimental.io_callback(count, jax.ShapeDtypeStruct((), x.dtype), x)

    x, st = jax.jit(lambda x: jd.sample_adaptive(jd.Denoiser(fn, S, "epsilon"), x, order=3, args=GM))(jnp.ones((2, 2)))
    jax.block_until_ready(x)
    assert int(st.nfe) == len(calls) == 3 * int(st.accepted + st.rejected)
    assert int(st.rejected) > 0


def test_vmap_gives_each_instance_its_own_steps():
    x_T = jax.random.normal(jax.random.key(4), (3, 1, 2)) * jnp.array([0.1, 1.0, 3.0])[:, None, None]
    run = lambda x: jd.sample_adaptive(GM.denoiser(S), x, order=2, rtol=1e-3, atol=1e-4, args=GM)  # noqa: E731
    xs, st = jax.vmap(run)(x_T)
    for i in range(3):
        x, sti = run(x_T[i])
        assert float(jnp.max(jnp.abs(xs[i] - x))) < 1e-12
        assert int(st.nfe[i]) == int(sti.nfe)
    assert len(set(np.asarray(st.nfe).tolist())) > 1  # different step sequences


def test_differentiable_mode_matches_and_has_the_exact_gradient():
    x_T = jax.random.normal(jax.random.key(5), (2, 16))
    den = GD.denoiser(S)
    kw = dict(order=3, rtol=1e-4, atol=1e-5, args=GD)
    x_w, st_w = jd.sample_adaptive(den, x_T, **kw)
    x_s, st_s = jax.jit(lambda x: jd.sample_adaptive(den, x, max_steps=80, differentiable=True, **kw))(x_T)
    assert float(jnp.max(jnp.abs(x_w - x_s))) < 1e-13 and int(st_w.nfe) == int(st_s.nfe)
    loss = lambda x: jnp.sum(jd.sample_adaptive(den, x, max_steps=80, differentiable=True, **kw)[0] ** 2)  # noqa: E731
    exact = jax.grad(lambda x: jnp.sum(GD.flow(S, x, S.t_max, S.t_min) ** 2))(x_T)
    g = jax.jit(jax.grad(loss))(x_T)
    assert float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact)) < 1e-3  # measured 2.3e-5


def test_float32_and_max_steps():
    x_T = jnp.ones((2, 16), jnp.float32)
    x, st = jd.sample_adaptive(GD.denoiser(S), x_T, args=GD)
    assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
    exact = GD.flow(S, x_T.astype(jnp.float64), S.t_max, S.t_min)
    assert float(jnp.max(jnp.abs(x - exact))) < 0.5  # the default tolerances (measured 0.14)
    x, st = jd.sample_adaptive(GD.denoiser(S), x_T, args=GD, max_steps=3)
    assert int(st.accepted + st.rejected) == 3 and not bool(st.reached_end) and float(st.t) > 0.01


def test_bad_inputs():
    den = GD.denoiser(S)
    x = jnp.ones((1, 16))
    with pytest.raises(ValueError, match=r"`order` must be 2 \(DPM-Solver-12\) or 3 \(DPM-Solver-23\), got 1"):
        jd.sample_adaptive(den, x, order=1, args=GD)
    with pytest.raises(ValueError, match=r"`rtol` must be a real number in \(0, inf\], got 0.0. The official default is 0.05"):
        jd.sample_adaptive(den, x, rtol=0.0, args=GD)
    with pytest.raises(ValueError, match=r"`atol` must be .*got -1"):
        jd.sample_adaptive(den, x, atol=-1, args=GD)
    with pytest.raises(ValueError, match=r"`form` must be one of \('data', 'noise'\).*got 'eps'"):
        jd.sample_adaptive(den, x, form="eps", args=GD)
    with pytest.raises(ValueError, match=r"`max_steps` must be an integer >= 1"):
        jd.sample_adaptive(den, x, max_steps=0, args=GD)
    with pytest.raises(ValueError, match=r"`t_end` must be smaller than `t_start`.*t_start=0.001, t_end=1.0"):
        jd.sample_adaptive(den, x, 1e-3, 1.0, args=GD)
    with pytest.raises(ValueError, match=r"lambda\(t_end=0.0\) = inf.*start where alpha > 0 and stop where sigma > 0"):
        jd.sample_adaptive(den, x, 1.0, 0.0, args=GD)
    flow = jd.RectifiedFlow()
    with pytest.raises(ValueError, match=r"lambda\(t_start=1.0\) = -inf"):
        jd.sample_adaptive(GD.denoiser(flow, "velocity"), x, 1.0, 0.01, args=GD)
    with pytest.raises(TypeError, match=r"`denoiser` must be a `jaxdiff.Denoiser`"):
        jd.sample_adaptive(lambda x, t, a: x, x)
    with pytest.raises(ValueError, match=r"The model returned shape \(3,\) for `x` of shape \(1, 16\)"):
        jd.sample_adaptive(jd.Denoiser(lambda x, t, a: jnp.zeros(3), S), x)
