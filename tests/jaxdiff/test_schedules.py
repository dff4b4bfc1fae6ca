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
        g,
        (jd.VPLinear(beta_max=20.0 + 1e-6).lambda_(0.3) - jd.VPLinear(beta_max=20.0 - 1e-6).lambda_(0.3)) / 2e-6,
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------------- diffusers configs

DIFFUSERS_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"]


def _config(beta_schedule, n, rescale=False):
    cfg = {"num_train_timesteps": n, "beta_schedule": beta_schedule, "rescale_betas_zero_snr": rescale}
    if beta_schedule == "scaled_linear":  # Stable Diffusion's values
        cfg.update(beta_start=0.00085, beta_end=0.012)
    return cfg


def _alphas_cumprod(s):
    return np.exp(2.0 * np.asarray(s.log_alphas, dtype=np.float64))


@pytest.mark.reference("torch", "diffusers")
@pytest.mark.parametrize("n", [1000, 250])
@pytest.mark.parametrize("beta_schedule", DIFFUSERS_SCHEDULES)
def test_from_diffusers_matches_ddpm_scheduler(beta_schedule, n):
    from diffusers import DDPMScheduler

    cfg = _config(beta_schedule, n)
    ref = DDPMScheduler(**cfg)
    ours = _alphas_cumprod(jd.VPDiscrete.from_diffusers(cfg))
    # diffusers' float32 table, to its last rounding (measured <= 6.7e-8)
    np.testing.assert_allclose(ours, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-7)
    # a scheduler instance (its `.config`) gives the same table
    np.testing.assert_array_equal(_alphas_cumprod(jd.VPDiscrete.from_diffusers(ref)), ours)


@pytest.mark.reference("torch", "diffusers")
@pytest.mark.parametrize("n", [1000, 250])
@pytest.mark.parametrize("beta_schedule", DIFFUSERS_SCHEDULES)
def test_from_diffusers_zero_snr_matches_ddpm_scheduler(beta_schedule, n):
    import torch
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    s = jd.VPDiscrete.from_diffusers(_config(beta_schedule, n, rescale=True))
    ours = _alphas_cumprod(s)
    assert ours[-1] == 0.0 and np.isneginf(float(s.log_alphas[-1]))
    # diffusers' own rescaling run in float64 (on its float32 1 - beta, as its scheduler rounds them)
    betas32 = DDPMScheduler(**_config(beta_schedule, n)).betas.numpy()
    alphas = (np.float32(1.0) - betas32).astype(np.float64)
    betas64 = rescale_zero_terminal_snr(torch.from_numpy(1.0 - alphas))
    # (PyTorch's float32 sigmoid is one ulp off a correctly rounded one in a quarter of the sigmoid betas)
    atol = 1e-7 if beta_schedule == "sigmoid" else 1e-12  # measured 4.3e-8 for sigmoid
    np.testing.assert_allclose(ours, torch.cumprod(1.0 - betas64, 0).numpy(), rtol=0, atol=atol)
    # its float32 scheduler: PyTorch's float32 CPU sqrt is not correctly rounded (one ulp off in ~25% of
    # entries), so diffusers' rescaled float32 table itself carries errors of up to ~1e-6 (measured 8.3e-7)
    ref32 = DDPMScheduler(**_config(beta_schedule, n, rescale=True)).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, ref32, rtol=0, atol=2e-6)


@pytest.mark.reference("torch", "diffusers")
def test_from_diffusers_exp_schedule_and_zero_snr_floor_match_diffusers():
    from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

    heun = HeunDiscreteScheduler(beta_schedule="exp")
    ours = _alphas_cumprod(jd.VPDiscrete.from_diffusers(heun))
    np.testing.assert_allclose(ours, heun.alphas_cumprod.numpy(), rtol=0, atol=1e-7)
    # DPMSolverMultistep with zero SNR replaces alphas_cumprod[-1] = 0 by 2**-24
    dpm = DPMSolverMultistepScheduler(**_config("scaled_linear", 1000, rescale=True))
    s = jd.VPDiscrete.from_diffusers(dpm, zero_snr_floor=2**-24)
    ours = _alphas_cumprod(s)
    assert ours[-1] == pytest.approx(2**-24, rel=1e-12)
    np.testing.assert_allclose(ours, dpm.alphas_cumprod.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(float(s.lambda_(1.0)), 0.5 * np.log(2**-24 / (1 - 2**-24)), rtol=1e-12)
    # on the linear table diffusers' floor exceeds alphas_cumprod[N-2] = 4.2e-9: not monotone, refused
    with pytest.raises(ValueError, match=r"`zero_snr_floor=5.96.*e-08` exceeds the previous .* entry 4.21e-09"):
        jd.VPDiscrete.from_diffusers(_config("linear", 1000, rescale=True), zero_snr_floor=2**-24)


def test_from_diffusers_defaults_and_trained_betas():
    # absent keys take diffusers' defaults: linear 1e-4..0.02 over 1000 steps
    s = jd.VPDiscrete.from_diffusers({"_class_name": "DDPMScheduler", "prediction_type": "v_prediction"})
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)
    np.testing.assert_allclose(_alphas_cumprod(s), np.cumprod(1.0 - betas.astype(np.float64)), rtol=2e-6)
    trained = [0.1, 0.2, 0.3]
    s = jd.VPDiscrete.from_diffusers({"trained_betas": trained, "beta_schedule": "no-such-name"})
    expected = np.cumprod(np.float32(1.0) - np.asarray(trained, np.float32), dtype=np.float64)
    np.testing.assert_allclose(_alphas_cumprod(s), expected, rtol=1e-14)


def test_from_diffusers_closed_forms():
    n = 1000
    # squaredcos_cap_v2: the product telescopes to abar(t)/abar(0) while the 0.999 cap is inactive
    abar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    ours = _alphas_cumprod(jd.VPDiscrete.from_diffusers(_config("squaredcos_cap_v2", n)))
    t = np.arange(1, n + 1) / n
    free = 1.0 - abar(t) / abar(t - 1.0 / n) < 0.999
    assert free[:-1].all() and not free[-1]  # only the last beta (abar(1) = 0) is capped
    np.testing.assert_allclose(ours[free], abar(t[free]) / abar(0.0), rtol=2e-6)
    capped = float(np.float32(1) - np.float32(0.999))  # a float32 beta, as diffusers
    np.testing.assert_allclose(ours[-1], ours[-2] * capped, rtol=1e-12)
    # scaled_linear: first and last betas are beta_start and beta_end
    sl = _alphas_cumprod(jd.VPDiscrete.from_diffusers(_config("scaled_linear", n)))
    f32 = np.float32
    first, last = (float(f32(1) - f32(f32(b**0.5) ** 2)) for b in (0.00085, 0.012))  # float32, as diffusers
    np.testing.assert_allclose([sl[0], sl[-1] / sl[-2]], [first, last], rtol=1e-13)
    np.testing.assert_allclose([first, last], [1 - 0.00085, 1 - 0.012], rtol=0, atol=1.2e-7)
    # zero terminal SNR: keeps alphas_cumprod[0], ends at exactly 0, sqrt(abar) affine in the old one
    for name in DIFFUSERS_SCHEDULES:
        old = _alphas_cumprod(jd.VPDiscrete.from_diffusers(_config(name, n)))
        new = _alphas_cumprod(jd.VPDiscrete.from_diffusers(_config(name, n, rescale=True)))
        assert new[-1] == 0.0
        np.testing.assert_allclose(new[0], old[0], rtol=1e-13)
        a_old, a_new = np.sqrt(old), np.sqrt(new)
        slope = (a_new[0] - a_new[-1]) / (a_old[0] - a_old[-1])
        np.testing.assert_allclose(a_new, slope * (a_old - a_old[-1]), rtol=0, atol=1e-13)


def test_from_diffusers_bad_config():
    with pytest.raises(ValueError, match=r"Unknown `beta_schedule='cosine'` in the scheduler config; supported: \('"):
        jd.VPDiscrete.from_diffusers({"beta_schedule": "cosine"})
    with pytest.raises(ValueError, match=r"`num_train_timesteps` must be an int >= 2, got 1.5"):
        jd.VPDiscrete.from_diffusers({"num_train_timesteps": 1.5})
    with pytest.raises(ValueError, match=r"`rescale_betas_zero_snr` must be True or False, got 'yes'"):
        jd.VPDiscrete.from_diffusers({"rescale_betas_zero_snr": "yes"})
    with pytest.raises(ValueError, match=r"`beta_end` must be a number in \(0, 1\), got '0.02'"):
        jd.VPDiscrete.from_diffusers({"beta_end": "0.02"})
    with pytest.raises(ValueError, match=r"`beta_schedule='linear'` .* gives invalid betas: `betas` must lie in \("):
        jd.VPDiscrete.from_diffusers({"beta_start": -0.1})
    with pytest.raises(ValueError, match=r"`trained_betas` has 3 entries but `num_train_timesteps` is 1000"):
        jd.VPDiscrete.from_diffusers({"trained_betas": [0.1, 0.2, 0.3], "num_train_timesteps": 1000})
    with pytest.raises(TypeError, match=r"`config` must be a diffusers scheduler config .* got list"):
        jd.VPDiscrete.from_diffusers([("beta_schedule", "linear")])
    with pytest.raises(ValueError, match=r"`zero_snr_floor` must be a float in \(0, 1\)"):
        jd.VPDiscrete.from_diffusers({"rescale_betas_zero_snr": True}, zero_snr_floor=0.0)


def test_vp_discrete_validates_concrete_tables():
    with pytest.raises(ValueError, match=r"`betas` must lie in \(0, 1\]; got betas\[1\] = -0.1"):
        jd.VPDiscrete(np.array([0.1, -0.1, 0.2]))
    with pytest.raises(ValueError, match=r"`betas` must lie in \(0, 1\]; got betas\[0\] = nan"):
        jd.VPDiscrete(np.array([np.nan, 0.1]))
    with pytest.raises(ValueError, match=r"Only the last beta may be 1 \(a zero terminal SNR\); got betas\[0\] = 1"):
        jd.VPDiscrete(np.array([1.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"`alphas_cumprod` must lie in \[0, 1\]; got alphas_cumprod\[0\] = 1.5"):
        jd.VPDiscrete(alphas_cumprod=np.array([1.5, 0.5]))
    with pytest.raises(ValueError, match=r"non-increasing; got alphas_cumprod\[1\] = 0.5 < alphas_cumprod\[2\] = 0.7"):
        jd.VPDiscrete(alphas_cumprod=np.array([0.9, 0.5, 0.7]))
    with pytest.raises(ValueError, match=r"Only the last `alphas_cumprod` entry may be 0"):
        jd.VPDiscrete(alphas_cumprod=np.array([0.9, 0.0, 0.0]))
    # traced tables are not checked (and gradient pytrees rebuilt through `log_alphas` never are)
    out = jax.jit(lambda b: jd.VPDiscrete(b).alpha(0.5))(jnp.array([0.1, -0.1]))
    assert out.shape == ()
    g = jax.grad(lambda s: s.alpha(0.7))(jd.VPDiscrete(jnp.array([0.1, 0.2])))
    s = jd.VPDiscrete(jnp.array([0.1, 0.2]))  # t = 0.7 is 40% into segment (t_0, t_1]: weights 0.6, 0.4
    np.testing.assert_allclose(g.log_alphas, float(s.alpha(0.7)) * np.array([0.6, 0.4]), rtol=1e-12)


# ---------------------------------------------------------------------------- zero terminal SNR tables

ZERO_SNR = jd.VPDiscrete.from_diffusers({"num_train_timesteps": 20, "rescale_betas_zero_snr": True})


@jax.jit
def _zero_snr_values(s, t, t_last, t_in):
    """Everything the zero-SNR tests read, in one compiled call (eager op-by-op dispatch is slow on CI)."""
    fns = {"log_alpha": s.log_alpha, "alpha": s.alpha, "sigma": s.sigma, "log_sigma": s.log_sigma, "lambda": s.lambda_}
    return {
        **{k: f(t) for k, f in fns.items()},
        **{f"d_{k}": jax.vmap(jax.grad(f))(t) for k, f in fns.items()},
        "at_one": jnp.stack([s.alpha(1.0), s.sigma(1.0), s.lambda_(1.0), s.t_of_lambda(-jnp.inf)]),
        "d_at_one": jnp.stack([jax.grad(s.alpha)(1.0), jax.grad(s.sigma)(1.0), jax.grad(s.t_of_lambda)(-jnp.inf)]),
        "alpha_last": s.alpha(t_last),
        "sigma_last": s.sigma(t_last),
        "d_alpha_last": jax.vmap(jax.grad(s.alpha))(t_last),
        "roundtrip": s.t_of_lambda(s.lambda_(t_in)),
        "d_t_of_lambda": jax.vmap(jax.grad(s.t_of_lambda))(s.lambda_(t_in)),
        "table_grads": jax.grad(
            lambda sch: sch.alpha(0.97) + sch.sigma(1.0) + sch.t_of_lambda(-4.0) + sch.t_of_lambda(-jnp.inf)
        )(s).log_alphas,
    }


ZERO_T = jnp.concatenate([jnp.linspace(1e-3, 0.999, 40), jnp.array([0.11, 0.42, 0.77, 0.95 + 1e-9, 0.97, 1 - 1e-9])])
ZERO_T_LAST = jnp.array([0.95, 0.951, 0.96, 0.99, 1 - 1e-9, 1.0])
ZERO_T_IN = jnp.array([0.3, 0.95, 0.951, 0.99, 1 - 1e-7])


def test_zero_snr_table_is_finite_inside_with_the_right_limits():
    s, n = ZERO_SNR, 20
    v = _zero_snr_values(s, ZERO_T, ZERO_T_LAST, ZERO_T_IN)
    for k in ("log_alpha", "alpha", "sigma", "log_sigma", "lambda"):
        assert bool(jnp.all(jnp.isfinite(v[k]))), k
    # alpha = 0, sigma = 1, lambda = -inf at t = 1, and lambda = -inf maps back to t = 1
    np.testing.assert_array_equal(v["at_one"], [0.0, 1.0, -np.inf, 1.0])
    # the last segment is linear in alpha, from alpha_{N-2} at t = (N-1)/N to 0 at t = 1
    a_prev = np.exp(float(s.log_alphas[-2]))
    tt = np.asarray(ZERO_T_LAST)
    np.testing.assert_allclose(v["alpha_last"], a_prev * (1 - (n * tt - (n - 1))), rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(v["alpha_last"] ** 2 + v["sigma_last"] ** 2, 1.0, rtol=1e-12)
    # exact inverse of lambda there
    np.testing.assert_allclose(v["roundtrip"], ZERO_T_IN, rtol=1e-12)


def test_zero_snr_table_has_finite_gradients():
    s, n = ZERO_SNR, 20
    v = _zero_snr_values(s, ZERO_T, ZERO_T_LAST, ZERO_T_IN)
    for k in ("log_alpha", "alpha", "sigma", "log_sigma", "lambda"):
        assert bool(jnp.all(jnp.isfinite(v[f"d_{k}"]))), k
    assert bool(jnp.all(jnp.isfinite(v["d_t_of_lambda"]))) and bool(jnp.all(jnp.isfinite(v["table_grads"])))
    # d alpha/dt = -N alpha_{N-2} on the last segment, including t = 1 itself; d sigma/dt = 0 there
    a_prev = np.exp(float(s.log_alphas[-2]))
    np.testing.assert_allclose(v["d_alpha_last"][1:], -n * a_prev, rtol=1e-12)
    np.testing.assert_allclose(v["d_at_one"], [-n * a_prev, 0.0, 0.0], rtol=1e-12)
    # central differences off the knots (k / 20, where alpha has kinks)
    t = jnp.array([0.11, 0.42, 0.77])
    fd = (s.alpha(t + 1e-7) - s.alpha(t - 1e-7)) / 2e-7
    np.testing.assert_allclose(v["d_alpha"][40:43], fd, rtol=1e-6)
    # the same table given as alphas_cumprod with an exact zero
    same = jd.VPDiscrete(alphas_cumprod=_alphas_cumprod(s))
    np.testing.assert_allclose(_zero_snr_values(same, ZERO_T, ZERO_T_LAST, ZERO_T_IN)["alpha"], v["alpha"], rtol=1e-12)


def test_vp_discrete_derivative_at_t_one_is_one_sided():
    # the derivative at t = 1 (where sampling starts) is the last segment's slope, not half of it
    s = jd.VPDiscrete(BETAS)
    la = np.asarray(s.log_alphas)
    slope = 1000 * (la[-1] - la[-2])
    np.testing.assert_allclose(jax.grad(s.log_alpha)(1.0), slope, rtol=1e-10)
    np.testing.assert_allclose(jax.grad(s.alpha)(1.0), np.exp(la[-1]) * slope, rtol=1e-10)


def test_vp_discrete_rebuilds_with_any_leaves():
    """tree_map with placeholder leaves (as diffrax and optax do) rebuilds a VPDiscrete without validation."""
    s = jd.VPDiscrete(np.linspace(1e-4, 0.02, 100))
    assert jax.tree.map(lambda x: None, s).log_alphas is None
    doubled = jax.tree.map(lambda x: 2 * x, s)
    np.testing.assert_array_equal(doubled.log_alphas, 2 * s.log_alphas)
    with pytest.raises(ValueError, match="takes exactly one of"):
        jd.VPDiscrete()
