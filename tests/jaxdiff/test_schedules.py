import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)

SCHEDULES = {
    "vp_linear": jd.VPLinear(),
    "vp_cosine": jd.VPCosine(),
    "vp_discrete": jd.VPDiscrete(BETAS),
    "ve": jd.VE(),
    "edm": jd.EDM(),
    "rectified_flow": jd.RectifiedFlow(),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_lambda_inverse_roundtrip(name):
    s = SCHEDULES[name]
    t = jnp.linspace(s.t_min, min(s.t_max, 0.999 if name == "rectified_flow" else s.t_max), 17)
    np.testing.assert_allclose(s.t_of_lambda(s.lambda_(t)), t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_clean_data_at_time_zero_and_finite_gradients(name):
    s = SCHEDULES[name]
    assert float(s.sigma(0.0)) == 0.0 and float(s.alpha(0.0)) == 1.0
    assert float(s.lambda_(0.0)) == np.inf
    grads = jax.grad(lambda sch: sch.alpha(0.0) + sch.sigma(0.0) + sch.alpha(0.5) * sch.sigma(0.5))(s)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "vp_discrete"])
def test_variance_preserving(name):
    s = SCHEDULES[name]
    t = jnp.linspace(s.t_min, s.t_max, 33)
    np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, rtol=1e-12)


def test_vp_linear_matches_integral_of_beta():
    s = jd.VPLinear(beta_min=0.1, beta_max=20.0)
    t = 0.7
    u = np.linspace(0, t, 200001)
    integral = np.trapezoid(0.1 + u * (20.0 - 0.1), u)
    np.testing.assert_allclose(float(s.log_alpha(t)), -0.5 * integral, rtol=1e-9)


def test_vp_cosine_matches_nichol_dhariwal():
    s = jd.VPCosine()
    t = np.array([0.1, 0.5, 0.9])
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(s.alpha(t) ** 2, f(t) / f(0.0), rtol=1e-12)


def test_vp_discrete_table_knots_and_model_time():
    s = jd.VPDiscrete(BETAS)
    n = np.arange(1000)
    t = (n + 1) / 1000
    np.testing.assert_allclose(s.alpha(t) ** 2, np.cumprod(1 - BETAS.astype(np.float64)), rtol=1e-10)
    np.testing.assert_allclose(s.model_time(t), n, atol=1e-9)
    np.testing.assert_allclose(s.t_of_model_time(s.model_time(t)), t, rtol=1e-12)
    same = jd.VPDiscrete(alphas_cumprod=np.cumprod(1 - BETAS.astype(np.float64)))
    np.testing.assert_allclose(same.log_alphas, s.log_alphas, rtol=1e-10)
    # piecewise linear in log alpha between knots
    mid = 0.5 * (t[10] + t[11])
    np.testing.assert_allclose(s.log_alpha(mid), 0.5 * (s.log_alpha(t[10]) + s.log_alpha(t[11])), rtol=1e-12)


def test_vp_discrete_bad_input():
    with pytest.raises(ValueError, match="exactly one of"):
        jd.VPDiscrete(BETAS, alphas_cumprod=np.cumprod(1 - BETAS))
    with pytest.raises(ValueError, match="1-D table"):
        jd.VPDiscrete(np.ones((3, 3)) * 0.01)


def test_schedules_are_pytrees_under_jit_vmap_grad():
    betas = jnp.stack([jnp.full(5, 0.1), jnp.full(5, 0.2)])
    la = jax.vmap(lambda b: jd.VPDiscrete(b).log_alpha(0.5))(betas)
    np.testing.assert_allclose(la, [0.5 * np.log(0.9) * 2.5, 0.5 * np.log(0.8) * 2.5], rtol=1e-12)
    g = jax.jit(jax.grad(lambda bmax: jd.VPLinear(beta_max=bmax).lambda_(0.3)))(20.0)
    np.testing.assert_allclose(
        g, (jd.VPLinear(beta_max=20.0 + 1e-6).lambda_(0.3) - jd.VPLinear(beta_max=20.0 - 1e-6).lambda_(0.3)) / 2e-6, rtol=1e-6
    )
