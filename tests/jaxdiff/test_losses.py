"""jaxdiff.losses: closed-form expected losses, target invariance, weights, time sampling, dropout, EMA."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxdiff as jd
from jaxdiff import losses

MEAN = np.array([0.5, -1.0, 2.0])
SCALE = np.array([0.3, 1.5, 0.8])
GD = jd.testing.GaussianData(mean=jnp.asarray(MEAN), scale=jnp.asarray(SCALE))
PERTURBED = jd.testing.GaussianData(
    mean=jnp.asarray(MEAN + [0.2, -0.1, 0.3]), scale=jnp.asarray(SCALE * [1.3, 0.8, 1.1])
)
TABLE = jd.VPDiscrete(np.linspace(1e-4, 0.02, 1000))


def exact(schedule, prediction, calls=None):
    """GaussianData's exact model on a batch with one time per sample; ``args`` is the GaussianData."""

    def fn(x, t_model, params):
        if calls is not None:
            calls.append(jnp.shape(t_model))
        t = jnp.broadcast_to(schedule.t_of_model_time(t_model), x.shape[:1])

        def one(xi, ti):
            x0, eps = params.x0_eps(schedule, xi, ti)
            return jd.testing.from_x0_eps(schedule, ti, xi, x0, eps, prediction)

        return jax.vmap(one)(x, t)

    return jd.Denoiser(fn, schedule, prediction)


def data(key, n):
    return jnp.asarray(MEAN)[None] + jnp.asarray(SCALE)[None] * jax.random.normal(key, (n, 3))


def posterior_variance(alpha, sigma):
    """Var(x0 | x_t) per dimension for Gaussian data: s^2 sigma^2 / (alpha^2 s^2 + sigma^2), shape (T, 3)."""
    a, s = np.asarray(alpha)[:, None], np.asarray(sigma)[:, None]
    return SCALE**2 * s**2 / (a**2 * SCALE**2 + s**2)


def np_schedule(schedule, t):
    t = jnp.asarray(t)
    return np.asarray(schedule.alpha(t)), np.asarray(schedule.sigma(t))


# ------------------------------------------------------------------ the exact model: closed-form losses


def _expected_table_x0_uniform():
    t = (np.arange(1000) + 1) / 1000.0  # TableTime: every entry equally likely, an exact average
    return posterior_variance(*np_schedule(TABLE, t)).mean()


def _expected_vp_linear_eps_min_snr():
    s = jd.VPLinear()
    t = np.linspace(1e-3, 1.0, 40001)
    a, sg = np_schedule(s, t)
    # min-SNR on the eps error is min(SNR, 5)/SNR; the eps error is sqrt(SNR) x0 error: min(SNR, 5) Var(x0|x_t)
    f = np.minimum(a**2 / sg**2, 5.0) * posterior_variance(a, sg).mean(1)
    return np.trapezoid(f, t) / (1.0 - 1e-3)


def _expected_edm_v_edm_weight():
    log_sigma = np.linspace(-1.2 - 12 * 1.2, -1.2 + 12 * 1.2, 200001)
    sigma = np.clip(np.exp(log_sigma), 0.002, 80.0)  # LogNormalTime clips to the schedule's range
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2  # EDM's lambda(sigma), x0 space
    f = w * posterior_variance(np.ones_like(sigma), sigma).mean(1) * stats.norm.pdf(log_sigma, -1.2, 1.2)
    return np.trapezoid(f, log_sigma)


def _expected_flow_velocity_uniform():
    t = np.linspace(1e-3, 1.0, 40001)
    # alpha = 1 - t, sigma = t: d velocity / d x0 = -1 - (1 - t)/t = -1/t
    f = posterior_variance(1.0 - t, t).mean(1) / t**2
    return np.trapezoid(f, t) / (1.0 - 1e-3)


EXPECTED = {
    "table-x0-uniform": (TABLE, "x0", "x0", "uniform", None, _expected_table_x0_uniform),
    "vp_linear-eps-min_snr": (
        jd.VPLinear(), "epsilon", "epsilon", losses.MinSNR(5.0), None, _expected_vp_linear_eps_min_snr
    ),
    "edm-v-edm_weight": (jd.EDM(), "x0", "v", losses.EDMWeight(0.5), "lognormal", _expected_edm_v_edm_weight),
    "flow-velocity-uniform": (
        jd.RectifiedFlow(), "velocity", "velocity", "uniform", None, _expected_flow_velocity_uniform
    ),
}


@pytest.mark.parametrize("case", EXPECTED)
def test_exact_model_loss_is_the_irreducible_error(case):
    # For Gaussian data E||x0 - E[x0|x_t]||^2 is the posterior variance, known in closed form: the exact model's
    # loss is its weighted average over the time distribution (Monte Carlo over 200k samples).
    schedule, prediction, target, weighting, times, expected_fn = EXPECTED[case]
    den = exact(schedule, prediction)
    n = 200_000
    x0 = data(jax.random.key(1), n)
    per = jax.jit(
        lambda x, k: losses.per_sample_loss(den, GD, x, k, target=target, weighting=weighting, time_sampling=times).loss
    )(x0, jax.random.key(2))
    expected = expected_fn()
    mean, se = float(jnp.mean(per)), float(jnp.std(per)) / math.sqrt(n)
    assert se < 0.02 * expected  # the check below has power
    assert abs(mean - expected) < 4 * se, (mean, expected, se)


def _gaussian_x0_error_sq(alpha, sigma, m, s, m2, s2):
    """E over x_t of ||f2(x_t) - f(x_t)||^2 / d for the affine posterior means of N(m, s^2) and N(m2, s2^2)."""
    a, sg = np.asarray(alpha)[:, None], np.asarray(sigma)[:, None]
    c, c2 = a**2 * s**2 + sg**2, a**2 * s2**2 + sg**2
    # x_t = a m + sqrt(c) z under the true data; f2 - f = shift + slope z
    shift = (m2 - m) * (1.0 - a**2 * s2**2 / c2)
    slope = a * s2**2 * np.sqrt(c) / c2 - a * s**2 / np.sqrt(c)
    return (shift**2 + slope**2).mean(1)


def test_gradient_vanishes_at_the_exact_model_and_a_perturbation_costs_its_closed_form():
    s = jd.VPLinear()
    den = exact(s, "epsilon")
    n = 100_000
    x0, key = data(jax.random.key(3), n), jax.random.key(4)
    per = lambda p: losses.per_sample_loss(den, p, x0, key).loss  # eps target, uniform weighting, U[t_min, t_max]
    # per-sample gradients w.r.t. the model's parameters (the Gaussian's mean and scale), forward mode
    jac = jax.jit(jax.jacfwd(per))(GD)
    for leaf in (jac.mean, jac.scale):  # (n, 3) each
        g, se = np.asarray(leaf.mean(0)), np.asarray(leaf.std(0)) / math.sqrt(n)
        assert np.all(np.abs(g) < 4 * se), (g, se)
    jac_p = jax.jit(jax.jacfwd(per))(PERTURBED)  # the same statistic has power: z-scores up to 68 measured
    z = [np.abs(leaf.mean(0)) / (leaf.std(0) / math.sqrt(n)) for leaf in (jac_p.mean, jac_p.scale)]
    assert max(float(np.max(v)) for v in z) > 20
    # paired difference of losses = E_t[SNR * E||x0_hat' - x0_hat||^2 / d] (eps error = sqrt(SNR) x0 error)
    diff = jax.jit(lambda: per(PERTURBED) - per(GD))()
    t = np.linspace(1e-3, 1.0, 40001)
    a, sg = np_schedule(s, t)
    pert = np.asarray(PERTURBED.mean), np.asarray(PERTURBED.scale)
    f = a**2 / sg**2 * _gaussian_x0_error_sq(a, sg, MEAN, SCALE, *pert)
    expected = np.trapezoid(f, t) / (1.0 - 1e-3)
    mean, se = float(diff.mean()), float(diff.std()) / math.sqrt(n)
    assert mean > 10 * se and abs(mean - expected) < 4 * se, (mean, expected, se)


# ---------------------------------------------------------------------------------- target invariance


@dataclasses.dataclass(frozen=True)
class SigmoidWeight(losses.Weighting):
    """A user-defined weighting (sigmoid of the log-SNR, as in Kingma & Gao 2023), to test the protocol."""

    bias: float = 1.0

    def x0_weight(self, lam):
        return jnp.exp(2.0 * lam) * jax.nn.sigmoid(self.bias - 2.0 * lam)


INVARIANCE = [
    (jd.VPLinear(), "score"),
    (TABLE, "v"),
    (jd.EDM(), "x0"),
    (jd.RectifiedFlow(), "velocity"),
    (jd.VE(), "epsilon"),
]


@pytest.mark.parametrize(
    "schedule,prediction", INVARIANCE, ids=lambda v: v if isinstance(v, str) else type(v).__name__
)
def test_each_weighting_gives_the_same_loss_for_every_target(schedule, prediction):
    den = exact(schedule, prediction)  # with the perturbed Gaussian as args: an imperfect model
    x0 = data(jax.random.key(5), 256)
    weightings = (losses.MinSNR(5.0), losses.EDMWeight(0.5))
    if prediction == "v":  # a user-defined weighting, and min-SNR with gamma = inf (w_x0 = SNR: plain eps-MSE)
        weightings += (SigmoidWeight(), losses.MinSNR(math.inf))

    # times and noise drawn once and passed in (the PRNG would dominate the compile time of each loss)
    t = losses.UniformTime().sample(jax.random.key(6), schedule, 256)
    noise = jax.random.normal(jax.random.key(7), x0.shape)

    @jax.jit
    def all_losses(t, noise):
        def loss(target, w):
            return losses.denoising_loss(den, PERTURBED, x0, None, target=target, weighting=w, t=t, noise=noise)

        return jnp.array([[loss(tg, w) for tg in losses.TARGETS] for w in weightings]), loss("epsilon", "uniform")

    out, eps_mse = (np.asarray(v) for v in all_losses(t, noise))
    assert np.all(out > 0)
    np.testing.assert_allclose(out, out[:, :1] * np.ones((1, 4)), rtol=1e-12)
    if prediction == "v":
        np.testing.assert_allclose(out[3], eps_mse, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- weights


def test_min_snr_and_edm_weights_against_hand_computed_values():
    s = jd.VPLinear()
    t = np.array([0.01, 0.05, 0.2, 0.5, 0.9])
    a, sg = np_schedule(s, t)
    snr = a**2 / sg**2
    # VPLinear: d log alpha/dt = -(b1 - b0) t/2 - b0/2, sigma = sqrt(1 - alpha^2)
    da = a * (-(20.0 - 0.1) * t / 2 - 0.1 / 2)
    ds = -a * da / sg
    c_vel = da - ds * a / sg
    weight = jax.jit(losses.loss_weight, static_argnums=(0, 3))  # weightings are hashable static config
    w = lambda weighting, target: np.asarray(weight(weighting, s, jnp.asarray(t), target))
    m = np.minimum(snr, 5.0)
    np.testing.assert_allclose(w(losses.MinSNR(5.0), "epsilon"), m / snr, rtol=1e-12)
    np.testing.assert_allclose(w(losses.MinSNR(5.0), "v"), m / (snr + 1.0), rtol=1e-12)
    np.testing.assert_allclose(w(losses.MinSNR(5.0), "x0"), m, rtol=1e-12)
    np.testing.assert_allclose(w(losses.MinSNR(5.0), "velocity"), m / c_vel**2, rtol=1e-9)
    edm_sigma = sg / a
    lam_edm = (edm_sigma**2 + 0.5**2) / (edm_sigma * 0.5) ** 2
    np.testing.assert_allclose(w(losses.EDMWeight(0.5), "x0"), lam_edm, rtol=1e-12)
    np.testing.assert_allclose(w(losses.EDMWeight(0.5), "epsilon"), lam_edm / snr, rtol=1e-12)
    np.testing.assert_allclose(w(losses.EDMWeight(0.5), "v"), lam_edm * sg**2 / (a**2 + sg**2) ** 2, rtol=1e-12)
    np.testing.assert_allclose(w("uniform", "velocity"), 1.0)
    # min-SNR's 1 and 5 cross where SNR = 5: weight 1 on eps below that noise level
    np.testing.assert_allclose(w(losses.MinSNR(5.0), "epsilon")[snr <= 5.0], 1.0, rtol=1e-15)
    # zero terminal SNR at t = 1: the limits (diffusers sets min-SNR's eps weight to 1 where SNR = 0)
    z = jd.VPDiscrete.from_diffusers({"num_train_timesteps": 20, "rescale_betas_zero_snr": True})
    at_one = lambda weighting, target: float(weight(weighting, z, jnp.ones(1), target)[0])
    assert at_one(losses.MinSNR(5.0), "epsilon") == pytest.approx(1.0, rel=1e-12)
    assert at_one(losses.MinSNR(5.0), "v") < 1e-30 and at_one(losses.MinSNR(5.0), "x0") < 1e-30
    assert at_one(losses.EDMWeight(0.5), "x0") == pytest.approx(4.0, rel=1e-12)


def test_loss_assembles_model_output_target_and_weight_by_hand():
    # an imperfect v-model w * x on the cosine schedule, eps target with min-SNR, fixed t and noise
    s = jd.VPCosine()
    den = jd.Denoiser(lambda x, t_model, w: w * x, s, "v")
    x0 = np.asarray(data(jax.random.key(7), 6))
    eps = np.asarray(jax.random.normal(jax.random.key(8), (6, 3)))
    t = np.array([0.02, 0.1, 0.3, 0.5, 0.7, 0.9])
    out = losses.per_sample_loss(den, 0.7, x0, jax.random.key(0), target="epsilon", weighting=losses.MinSNR(2.0),
                                 t=jnp.asarray(t), noise=jnp.asarray(eps))
    a, sg = (c[:, None] for c in np_schedule(s, t))
    x_t = a * x0 + sg * eps
    v_hat = 0.7 * x_t
    eps_hat = sg * x_t + a * v_hat  # VP: alpha^2 + sigma^2 = 1
    snr = (a / sg)[:, 0] ** 2
    expected = np.minimum(snr, 2.0) / snr * ((eps_hat - eps) ** 2).mean(1)
    np.testing.assert_allclose(out.loss, expected, rtol=1e-12)
    np.testing.assert_array_equal(out.t, t)
    np.testing.assert_allclose(
        losses.denoising_loss(den, 0.7, x0, jax.random.key(0), target="epsilon", weighting=losses.MinSNR(2.0),
                              t=jnp.asarray(t), noise=jnp.asarray(eps)),
        expected.mean(), rtol=1e-12)


# ---------------------------------------------------------------------------------------- time sampling


def test_uniform_and_table_time_distributions():
    key = jax.random.key(9)
    n = 20_000
    t = np.asarray(losses.UniformTime().sample(key, jd.VPLinear(), n))
    assert t.min() >= 1e-3 and t.max() <= 1.0
    assert stats.kstest(t, stats.uniform(loc=1e-3, scale=1.0 - 1e-3).cdf).pvalue > 1e-3
    t = np.asarray(losses.UniformTime(0.2, 0.4).sample(key, TABLE, n))  # continuous on a table too
    assert stats.kstest(t, stats.uniform(loc=0.2, scale=0.2).cdf).pvalue > 1e-3
    assert abs(t.mean() - 0.3) < 4 * 0.2 / math.sqrt(12 * n)
    # TableTime: t = (n + 1)/N on the entries, every entry equally likely
    small = jd.VPDiscrete(np.full(10, 0.05))
    t = np.asarray(losses.TableTime().sample(key, small, n))
    idx = np.rint(t * 10).astype(int) - 1
    np.testing.assert_array_equal(t, (idx + 1) / 10.0)
    counts = np.bincount(idx, minlength=10)
    assert counts.size == 10 and stats.chisquare(counts).pvalue > 1e-3
    # the defaults: table entries for VPDiscrete, uniform otherwise; strings name the same samplers
    x0 = jnp.zeros((n, 1))
    den = jd.Denoiser(lambda x, tm, a: x, small, "epsilon")
    k_t = jax.random.split(key)[0]
    np.testing.assert_array_equal(
        losses.per_sample_loss(den, None, x0, key).t, losses.TableTime().sample(k_t, small, n)
    )
    np.testing.assert_array_equal(losses.per_sample_loss(den, None, x0, key, time_sampling="uniform").t,
                                  losses.UniformTime().sample(k_t, small, n))
    den = jd.Denoiser(lambda x, tm, a: x, jd.VPLinear(), "epsilon")
    np.testing.assert_array_equal(losses.per_sample_loss(den, None, x0, key).t,
                                  losses.UniformTime().sample(k_t, jd.VPLinear(), n))


def test_lognormal_time_is_edm_noise_distribution():
    key, n = jax.random.key(10), 20_000
    # EDM schedule: t = sigma; ln sigma ~ N(-1.2, 1.2^2) (clipping to [0.002, 80] has probability 2e-5)
    t = np.asarray(losses.LogNormalTime().sample(key, jd.EDM(), n))
    assert stats.kstest(np.log(t), stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3
    # VPLinear: sigma = sigma_t/alpha_t = exp(-lambda); the range [t_min, t_max] clips sigma to [0.01, 152]
    s = jd.VPLinear()
    t = jnp.asarray(losses.LogNormalTime(-1.2, 1.2).sample(key, s, n))
    log_sigma = -np.asarray(s.lambda_(t))
    lo, hi = -float(s.lambda_(s.t_min)), -float(s.lambda_(s.t_max))
    inside = (t > s.t_min) & (t < s.t_max)
    p_lo = stats.norm.cdf(lo, -1.2, 1.2)
    frac_lo = float(np.mean(np.asarray(t) == s.t_min))
    assert abs(frac_lo - p_lo) < 4 * math.sqrt(p_lo * (1 - p_lo) / n) and p_lo > 1e-3
    truncated = stats.truncnorm((lo + 1.2) / 1.2, (hi + 1.2) / 1.2, loc=-1.2, scale=1.2)
    assert stats.kstest(log_sigma[np.asarray(inside)], truncated.cdf).pvalue > 1e-3


# ---------------------------------------------------------------------------------------- conditioning


def test_per_sample_conditioning_in_one_batched_call():
    calls = []

    def model(x, t_model, args):
        w, labels = args  # labels: (B,), one per sample
        calls.append(jnp.shape(t_model))
        return w * x + 0.1 * labels[:, None] * t_model[:, None] / 1000.0

    den = jd.Denoiser(model, TABLE, "epsilon")
    labels = jnp.array([0.0, 1.0, 2.0, 1.0])
    x0 = jnp.tile(jnp.array([[0.3, -0.2]]), (4, 1))  # identical samples, times and noise ...
    t, noise = jnp.full(4, 0.5), jnp.tile(jnp.array([[1.0, -0.5]]), (4, 1))
    out = losses.per_sample_loss(den, (0.9, labels), x0, jax.random.key(0), t=t, noise=noise).loss
    assert calls == [(4,)]  # one model call for the batch, one model time per sample
    out = np.asarray(out)
    assert out[1] == out[3] and len(set(out[[0, 1, 2]].tolist())) == 3  # ... only the labels differ
    single = jax.jit(
        lambda y, x, tt, e: losses.per_sample_loss(den, (0.9, y), x, jax.random.key(0), t=tt, noise=e).loss
    )
    for i in range(4):  # a loop of single-sample losses gives the same numbers
        one = single(labels[i : i + 1], x0[i : i + 1], t[i : i + 1], noise[i : i + 1])
        np.testing.assert_allclose(one[0], out[i], rtol=1e-12)


def test_drop_labels_rate_and_values():
    n = 40_000
    labels = jnp.arange(n) % 10
    out = np.asarray(losses.drop_labels(jax.random.key(11), labels, 0.25, 10))
    dropped = out == 10
    assert abs(dropped.mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    assert out.dtype == labels.dtype
    # embeddings (B, D): whole rows are replaced by the null embedding
    emb = jax.random.normal(jax.random.key(12), (1000, 4))
    null = jnp.array([9.0, 9.0, 9.0, 9.0])
    out = np.asarray(jax.jit(losses.drop_labels)(jax.random.key(13), emb, 0.5, null))  # rate traced under jit
    rows = np.all(out == 9.0, axis=1)
    np.testing.assert_array_equal(out[~rows], np.asarray(emb)[~rows])
    assert np.all(np.any(out[rows] == 9.0, axis=1)) and 400 < rows.sum() < 600
    np.testing.assert_array_equal(losses.drop_labels(jax.random.key(0), labels, 0.0, 10), labels)
    assert bool(jnp.all(losses.drop_labels(jax.random.key(0), labels, 1.0, 10) == 10))


# ------------------------------------------------------------------------------------------------- EMA


def test_ema_matches_a_hand_written_loop_with_warmup():
    params = [np.float64(1.0), np.float64(-2.0)]
    steps = [np.array([0.3 * k, 1.0 / (k + 1)]) for k in range(20)]
    ema_hand = list(params)
    state = losses.ema_init({"a": jnp.array(params[0]), "b": jnp.array(params[1], jnp.float32)})
    update = jax.jit(losses.ema_update, static_argnames="warmup")
    for k, p in enumerate(steps):
        d = 0.0 if k == 0 else min(0.5, (1 + k) / (10 + k))  # diffusers: copy first, then the warm-up ramp
        ema_hand = [d * e + (1 - d) * q for e, q in zip(ema_hand, p)]
        state = update(state, {"a": jnp.array(p[0]), "b": jnp.array(p[1], jnp.float32)}, 0.5)
        np.testing.assert_allclose(state.params["a"], ema_hand[0], rtol=1e-14)
        np.testing.assert_allclose(state.params["b"], ema_hand[1], rtol=1e-6)
    assert int(state.count) == 20 and state.count.dtype == jnp.int32 and state.params["b"].dtype == jnp.float32
    # without warm-up the decay is constant from the first update
    state = losses.ema_init(jnp.array(1.0))
    for k in range(3):
        state = update(state, jnp.array(0.0), 0.9, warmup=False)
    np.testing.assert_allclose(state.params, 0.9**3, rtol=1e-14)


@pytest.mark.reference("torch", "diffusers")
def test_ema_matches_diffusers_ema_model():
    import torch
    from diffusers.training_utils import EMAModel

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 2)).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    ref = EMAModel([param], decay=0.999)
    state = losses.ema_init(jnp.asarray(w0))
    for _ in range(30):
        new = rng.normal(size=(3, 2)).astype(np.float32)
        with torch.no_grad():
            param.copy_(torch.from_numpy(new))
        ref.step([param])
        state = losses.ema_update(state, jnp.asarray(new), 0.999)
    np.testing.assert_allclose(state.params, ref.shadow_params[0].numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ transforms


def test_jit_grad_and_zero_snr_training_are_finite_and_right():
    s = jd.VPLinear()
    den = jd.Denoiser(lambda x, t, w: w[0] * x + w[1], s, "v")
    x0, key = data(jax.random.key(14), 64), jax.random.key(15)
    f = lambda w: losses.denoising_loss(den, w, x0, key, target="epsilon", weighting=losses.MinSNR(5.0))
    w = jnp.array([0.3, -0.1])
    val, grad = jax.jit(jax.value_and_grad(f))(w)
    f_jit = jax.jit(f)
    np.testing.assert_allclose(val, f_jit(w), rtol=1e-12)
    fd = [(f_jit(w + h) - f_jit(w - h)) / 2e-6 for h in jnp.eye(2) * 1e-6]
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
    # vmapped over keys (e.g. per-device batches): each key is its own loss
    keys = jax.random.split(key, 3)
    vals = jax.jit(jax.vmap(lambda k: f_key(den, w, x0, k)))(keys)
    np.testing.assert_allclose(vals[1], jax.jit(f_key)(den, w, x0, keys[1]), rtol=1e-12)
    assert len(set(np.asarray(vals).tolist())) == 3
    # a zero terminal SNR table, v-model, every entry including t = 1 (alpha = 0): finite losses and gradients
    z = jd.VPDiscrete.from_diffusers({"num_train_timesteps": 8, "rescale_betas_zero_snr": True})
    den_z = exact(z, "v")
    t = jnp.arange(1, 9) / 8.0
    x0 = data(jax.random.key(16), 8)
    noise = jax.random.normal(key, x0.shape)

    def total(p):  # every target and weighting at once
        return sum(
            losses.denoising_loss(den_z, p, x0, None, target=target, weighting=weighting, t=t, noise=noise)
            for target in losses.TARGETS
            for weighting in ("uniform", losses.MinSNR(5.0), losses.EDMWeight(0.5))
        )

    val, g = jax.jit(jax.value_and_grad(total))(PERTURBED)
    assert np.isfinite(float(val)) and all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))


def f_key(den, w, x0, key):
    return losses.denoising_loss(den, w, x0, key, target="epsilon", weighting=losses.MinSNR(5.0))


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_gives_clear_errors():
    den = jd.Denoiser(lambda x, t, a: x, jd.VPLinear(), "epsilon")
    x0, key = jnp.ones((4, 2)), jax.random.key(0)
    with pytest.raises(ValueError, match=r"Unknown `target='noise'`; expected one of \('epsilon', 'x0', 'v', "):
        losses.denoising_loss(den, None, x0, key, target="noise")
    with pytest.raises(ValueError, match=r"Unknown `weighting='min_snr'`; expected \"uniform\", `MinSNR\(gamma\)`"):
        losses.denoising_loss(den, None, x0, key, weighting="min_snr")
    with pytest.raises(
        ValueError, match=r"Unknown `time_sampling='normal'`; expected None .* \('uniform', 'table', 'lognormal'\)"
    ):
        losses.denoising_loss(den, None, x0, key, time_sampling="normal")
    with pytest.raises(ValueError, match=r"`TableTime\(\)` draws DDPM table entries and needs a `VPDiscrete` sched"):
        losses.denoising_loss(den, None, x0, key, time_sampling="table")
    with pytest.raises(ValueError, match=r"`x0` must be floating-point data with a batch axis first, .* shape \(\)"):
        losses.denoising_loss(den, None, jnp.ones(()), key)
    with pytest.raises(ValueError, match=r"got shape \(4, 2\) and dtype int32"):
        losses.denoising_loss(den, None, jnp.ones((4, 2), jnp.int32), key)
    with pytest.raises(ValueError, match=r"`t` must have shape \(4,\), one time per sample of `x0`; got shape \(\)"):
        losses.denoising_loss(den, None, x0, key, t=0.5)
    with pytest.raises(ValueError, match=r"`noise` must have the shape of `x0`, \(4, 2\); got \(4,\)"):
        losses.denoising_loss(den, None, x0, key, noise=jnp.ones(4))
    with pytest.raises(ValueError, match=r"Train the plain model: `denoiser` has guidance or thresholding"):
        losses.denoising_loss(dataclasses.replace(den, guidance=jd.CFG(3.0)), None, x0, key)
    with pytest.raises(ValueError, match=r"`MinSNR\(gamma=0\)`: `gamma` must be a number > 0"):
        losses.MinSNR(gamma=0)
    with pytest.raises(ValueError, match=r"`EDMWeight\(sigma_data=-1.0\)`: `sigma_data` must be a finite number > 0"):
        losses.EDMWeight(sigma_data=-1.0)
    with pytest.raises(ValueError, match=r"`UniformTime\(t_min=0.5, t_max=0.2\)`: need t_min < t_max"):
        losses.UniformTime(0.5, 0.2)
    with pytest.raises(ValueError, match=r"`UniformTime\(t_min=0.0\)`: `t_min` must be a finite number > 0 or None"):
        losses.UniformTime(t_min=0.0)
    with pytest.raises(ValueError, match=r"`LogNormalTime\(p_std=0.0\)`: `p_std` must be a finite number > 0"):
        losses.LogNormalTime(p_std=0.0)
    z = jd.VPDiscrete.from_diffusers({"num_train_timesteps": 8, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match=r"`target='x0'` is undefined for a model with `prediction='epsilon'` on a"):
        losses.denoising_loss(jd.Denoiser(lambda x, t, a: x, z, "epsilon"), None, x0, key, target="x0")
    with pytest.raises(ValueError, match=r"`rate` must be a probability in \[0, 1\], got 1.5"):
        losses.drop_labels(key, jnp.arange(3), 1.5, 0)
    with pytest.raises(ValueError, match=r"`labels` must have a batch axis first"):
        losses.drop_labels(key, jnp.array(3), 0.1, 0)
    with pytest.raises(ValueError, match=r"`null_label` must be a scalar or have shape \(4,\) \(one label\)"):
        losses.drop_labels(key, jnp.ones((2, 4)), 0.1, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`decay` must be in \[0, 1\] \(e.g. 0.9999\), got 1.5"):
        losses.ema_update(losses.ema_init(jnp.ones(2)), jnp.ones(2), 1.5)
