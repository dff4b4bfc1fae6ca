"""DPM-Solver-v3: against DPM-Solver++ (degenerate EMS), the exact Gaussian flow (optimal EMS),
measured orders, estimated statistics, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.testing import GaussianData, GaussianMixture

S = jd.VPLinear()
T_START, T_END = 1.0, 1e-3
LAM_T, LAM_0 = float(S.lambda_(T_START)), float(S.lambda_(T_END))
GD = GaussianData(jnp.array([0.5, -1.0, 2.0]), jnp.array([0.3, 1.0, 2.0]))
GM = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[1.0, -1.0], [-1.5, 0.5]]), jnp.array([0.3, 0.6]))


def logsnr_grid(n):
    return jnp.asarray(S.t_of_lambda(jnp.linspace(LAM_T, LAM_0, n + 1)))


def ems_grid(n):
    return np.linspace(LAM_T, LAM_0, n)


def gaussian_ems(lam, l_scale=1.0, l_shift=0.0, s=0.0, b_scale=1.0):
    """The optimal EMS of GD in closed form: l = sigma^2 / C, s = 0, b = d/dlambda(-sigma^2 mean / C)."""

    def l_of(lm):
        t = S.t_of_lambda(lm)
        return S.sigma(t) ** 2 / (S.alpha(t) ** 2 * GD.scale**2 + S.sigma(t) ** 2)

    def f_of(lm):
        return -l_of(lm) * GD.mean

    lams = jnp.asarray(lam)
    l = np.asarray(jax.vmap(l_of)(lams))
    b = np.asarray(jax.vmap(lambda u: jax.jvp(f_of, (u,), (jnp.ones_like(u),))[1])(lams))
    return jd.EMS(lam, l_scale * l + l_shift, s + 0 * l, b_scale * b)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_degenerate_ems_is_dpm_solver_pp_up_to_quadrature(order):
    """l = 1, s = b = 0 is DPM-Solver++ multistep with exact phi weights (diffusers' "heun");
    the only difference is the trapezoid on the EMS grid, which falls as dlambda^2."""
    den = GM.denoiser(S)
    x_T = jax.random.normal(jax.random.key(1), (16, 2))
    ts = logsnr_grid(10)
    ref = jd.sample(den, x_T, ts, jd.DPMSolverPP(order=order, solver_type="heun", lower_order_final=True), args=GM)
    gaps = []
    for n in (101, 401):
        solver = jd.DPMSolverV3(jd.EMS.degenerate(ems_grid(n)), order=order, use_corrector=False)
        gaps.append(float(jnp.max(jnp.abs(jd.sample(den, x_T, ts, solver, args=GM) - ref))))
    assert gaps[1] < 1e-3
    assert 12 < gaps[0] / gaps[1] < 20  # (400/100)^2 = 16


def test_optimal_ems_make_gaussian_sampling_exact():
    """For Gaussian data the optimal EMS absorb the whole model: 5 steps are exact up to quadrature."""
    den = GD.denoiser(S)
    x_T = GD.sample_marginal(jax.random.key(0), S, T_START, (64, 3))
    ts = logsnr_grid(5)
    exact = GD.flow(S, x_T, T_START, ts[-1])
    errs = [float(jnp.max(jnp.abs(jd.sample(den, x_T, ts, jd.DPMSolverV3(gaussian_ems(ems_grid(n))), args=GD) - exact)))
            for n in (201, 801)]
    assert errs[0] < 2e-4 and errs[1] < 1e-5  # piecewise-linear statistics: O(dlambda^2)
    for peer in (jd.DPMSolverPP(order=3), jd.UniPC(order=3)):
        assert float(jnp.max(jnp.abs(jd.sample(den, x_T, ts, peer, args=GD) - exact))) > 0.5


def test_measured_orders_with_non_optimal_ems():
    """Perturbed statistics leave a nonlinear g: the predictor converges with its order
    (order 3 with its first-order warm-up tends to 2; it stays ahead of order 2)."""
    den = GD.denoiser(S)
    lam = ems_grid(8001)
    ems = gaussian_ems(lam, l_scale=0.7, l_shift=0.1, s=0.3, b_scale=0.5)
    x_T = GD.sample_marginal(jax.random.key(0), S, T_START, (32, 3))

    def errors(**kw):
        out = []
        for n in (20, 40, 80):
            ts = logsnr_grid(n)
            solver = jd.DPMSolverV3(ems, use_corrector=False, lower_order_final=False, **kw)
            x = jd.sample(den, x_T, ts, solver, args=GD)
            out.append(float(jnp.max(jnp.abs(x - GD.flow(S, x_T, T_START, ts[-1])))))
        return np.array(out)

    e1, e2, e3 = errors(order=1), errors(order=2), errors(order=3)
    rate = lambda e: np.log2(e[:-1] / e[1:])  # noqa: E731
    assert np.all((rate(e1) > 0.9) & (rate(e1) < 1.2))
    assert np.all((rate(e2) > 1.9) & (rate(e2) < 2.9))
    assert np.all(rate(e3) > 2.3) and np.all(e3 < e2)


def test_disable_corrector_indexes_steps_like_unipc():
    den = GD.denoiser(S)
    ems = gaussian_ems(ems_grid(101), l_scale=0.8)
    x_T = GD.sample_marginal(jax.random.key(0), S, T_START, (8, 3))
    ts = logsnr_grid(6)
    run = lambda **kw: jd.sample(den, x_T, ts, jd.DPMSolverV3(ems, **kw), args=GD)  # noqa: E731
    off = run(use_corrector=False)
    np.testing.assert_array_equal(run(disable_corrector=range(6)), off)
    assert float(jnp.max(jnp.abs(run() - off))) > 1e-3
    # step 5 is the last: its result is never corrected, so disabling it changes nothing
    np.testing.assert_array_equal(run(disable_corrector=(5,)), run())


def test_computed_ems_recover_the_gaussian_statistics():
    den = GD.denoiser(S)
    lam = ems_grid(101)
    data = GD.sample_marginal(jax.random.key(3), S, 0.0, (2048, 3))
    est = jd.compute_ems(den, data, jax.random.key(4), lam, args=GD)
    exact = gaussian_ems(lam)
    np.testing.assert_allclose(est.l, exact.l, atol=1e-10)  # the Jacobian is diagonal: Hutchinson is exact
    np.testing.assert_allclose(est.s, 0.0, atol=1e-12)  # f does not vary across samples
    np.testing.assert_allclose(est.b, exact.b, atol=1e-2)  # l' from finite differences on the grid


def test_compute_ems_with_data_sharded_over_devices_gives_the_same_statistics():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    den = GM.denoiser(S)
    lam = ems_grid(21)
    data = GM.sample(jax.random.key(5), 512)
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharded = jax.device_put(data, NamedSharding(mesh, PartitionSpec("batch")))
    assert len(sharded.sharding.device_set) == len(jax.devices()) > 1
    a, b = (jd.compute_ems(den, x, jax.random.key(6), lam, args=GM, batch_size=512) for x in (data, sharded))
    for name in ("l", "s", "b"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-10)


def test_computed_ems_beat_dpm_solver_pp_and_unipc_at_few_steps_on_a_mixture():
    den = GM.denoiser(S)
    ems = jd.compute_ems(den, GM.sample(jax.random.key(5), 2048), jax.random.key(6), ems_grid(201), args=GM)
    assert np.all(np.isfinite(ems.s)) and np.ptp(ems.s) > 0.1  # the mixture's f is not affine in x
    x_T = jax.random.normal(jax.random.key(1), (256, 2))
    ref = jd.sample(den, x_T, logsnr_grid(1000), jd.DPMSolverPP(order=3, solver_type="heun"), args=GM)
    rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.sum((x - ref) ** 2, -1))))  # noqa: E731
    for n in (6, 10):
        ts = logsnr_grid(n)
        ours = rms(jd.sample(den, x_T, ts, jd.DPMSolverV3(ems), args=GM))
        for peer in (jd.DPMSolverPP(order=3), jd.UniPC(order=3)):
            assert ours < 0.7 * rms(jd.sample(den, x_T, ts, peer, args=GM)), (n, peer)


def test_jit_vmap_grad_and_adjoint():
    den = GD.denoiser(S)
    solver = jd.DPMSolverV3(gaussian_ems(ems_grid(201), l_scale=0.9, s=0.1))
    ts = logsnr_grid(8)
    x_T = GD.sample_marginal(jax.random.key(0), S, T_START, (4, 3))
    eager = jd.sample(den, x_T, ts, solver, args=GD)
    jitted = jax.jit(lambda x: jd.sample(den, x, ts, solver, args=GD))(x_T)
    mapped = jax.vmap(lambda x: jd.sample(den, x[None], ts, solver, args=GD)[0])(x_T)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)
    np.testing.assert_allclose(mapped, eager, rtol=1e-12)

    def loss(x, adjoint=None):
        return jnp.sum(jd.sample(den, x, ts, solver, args=GD, adjoint=adjoint) ** 2)

    g = jax.grad(loss)(x_T)
    eps = 1e-6
    e = jnp.zeros_like(x_T).at[0, 1].set(eps)
    fd = (loss(x_T + e) - loss(x_T - e)) / (2 * eps)
    np.testing.assert_allclose(g[0, 1], fd, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: loss(x, jd.Backprop()))(x_T), g, rtol=1e-10)
    # AdjointDPM integrates the continuous adjoint: it approaches the discrete gradient with the steps
    ts = logsnr_grid(30)
    g, g_adj = (jax.grad(lambda x: loss(x, a))(x_T) for a in (None, jd.AdjointDPM()))
    assert float(jnp.max(jnp.abs(g_adj - g)) / jnp.max(jnp.abs(g))) < 0.05


def test_bad_input_is_a_clear_error():
    lam = ems_grid(11)
    ones = np.ones((11, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        jd.EMS(lam[::-1], ones, ones, ones)
    with pytest.raises(ValueError, match=r"shape \(len\(lam\), \*e\)"):
        jd.EMS(lam, ones, ones[:5], ones)
    with pytest.raises(ValueError, match="non-finite"):
        jd.EMS(lam, ones, ones * np.nan, ones)
    with pytest.raises(ValueError, match="order"):
        jd.DPMSolverV3(jd.EMS.degenerate(lam), order=4)
    with pytest.raises(ValueError, match="jaxdiff.EMS"):
        jd.DPMSolverV3(np.ones(3))
    den = GD.denoiser(S)
    solver = jd.DPMSolverV3(jd.EMS(lam, ones, 0 * ones, 0 * ones))
    x_T = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="leave the EMS range"):
        jd.sample(den, x_T, jd.timesteps(S, 5, "logsnr", final="zero"), solver, args=GD)
    with pytest.raises(ValueError, match="does not broadcast"):
        jd.sample(den, jnp.ones((2, 4)), logsnr_grid(5), solver, args=GD)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda x, ts: jd.sample(den, x, ts, solver, args=GD))(x_T, logsnr_grid(5))
    with pytest.raises(ValueError, match="K >= 2"):
        jd.compute_ems(den, jnp.ones((1, 3)), jax.random.key(0), lam, args=GD)
