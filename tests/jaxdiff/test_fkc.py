"""FKC: weight formula vs the FK PDE, closed-form Gaussian targets, annealed mixtures, sharding, bad input.

The full acceptance sizes (16 replicate runs of 8192 particles) run in ``benchmarks/fkc_accuracy.py``;
these tests use fewer particles and keep enough power (the negative controls still miss by > 10 SE).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxdiff as jd
from benchmarks.fkc_accuracy import gauss_product, mode_stats
from jaxdiff.smc import fkc

S = jd.VPLinear()
TS = jd.timesteps(S, 200, "time")


def _moments(res):
    w = jnp.exp(res.log_weights)[:, None]
    m = jnp.sum(w * res.x, 0, keepdims=True)
    return m[0], jnp.sum(w * (res.x - m) ** 2, 0)


def _replicates(target, gds, betas, num_runs, n, weighted, seed=0):
    """Replicate runs from the exact initial law prod_i q_{i,T}^beta_i; z-scores of mean and variance."""
    mean0, var0 = gauss_product([S.alpha(TS[0]) * g.mean for g in gds], [g.variance(S, TS[0]) for g in gds], betas)
    mean_t, var_t = gauss_product([S.alpha(TS[-1]) * g.mean for g in gds], [g.variance(S, TS[-1]) for g in gds], betas)
    args = gds[0] if len(gds) == 1 else tuple(gds)

    def run(key):
        k1, k2 = jax.random.split(key)
        x = mean0 + jnp.sqrt(var0) * jax.random.normal(k1, (n, 1))
        return _moments(fkc.sample(target, x, TS, k2, args=args, weighted=weighted))

    m, v = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(seed), num_runs))
    se = lambda a: np.asarray(a.std(0, ddof=1)) / np.sqrt(num_runs)  # noqa: E731
    mean_t, var_t = jnp.reshape(mean_t, (-1,)), jnp.reshape(var_t, (-1,))
    return np.abs(np.asarray(m.mean(0) - mean_t)) / se(m), np.abs(np.asarray(v.mean(0) - var_t)) / se(v)


GD1 = jd.testing.GaussianData(jnp.array([[-1.0]]), jnp.array([[np.sqrt(0.5)]]))
GD2 = jd.testing.GaussianData(jnp.array([[2.0]]), jnp.array([[1.0]]))
GDA = jd.testing.GaussianData(jnp.array([[1.0]]), jnp.array([[1.0]]))
GDU = jd.testing.GaussianData(jnp.array([[0.0]]), jnp.array([[np.sqrt(2.0)]]))
CASES = {
    "product": (lambda: fkc.Product(GD1.denoiser(S), GD2.denoiser(S)), (GD1, GD2), (1.0, 1.0)),
    "anneal2": (lambda: fkc.Anneal(GDA.denoiser(S), 2.0), (GDA,), (2.0,)),
    "anneal3": (lambda: fkc.Anneal(GDA.denoiser(S), 3.0), (GDA,), (3.0,)),
    "cfg3": (lambda: fkc.Guidance(GDU.denoiser(S), GDA.denoiser(S), 3.0), (GDU, GDA), (-2.0, 3.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gaussian_targets_match_closed_form_and_control_misses(case):
    make, gds, betas = CASES[case]
    zm, zv = _replicates(make(), gds, betas, num_runs=8, n=2048, weighted=True)
    assert zm.max() < 4 and zv.max() < 4, (zm, zv)
    zm0, zv0 = _replicates(make(), gds, betas, num_runs=8, n=2048, weighted=False)
    assert max(zm0.max(), zv0.max()) > 10, (zm0, zv0)


def _fk_residual(target, mixtures, noise_ratio, x, t):
    """d_tau log p - L*p / p for p = prod q_i^beta_i, with the sampler's drift; equals G when G is right."""
    betas = [float(b) for b in target.betas]
    log_p = lambda y, tt: sum(b * m.log_prob(S, y[None], tt)[0] for b, m in zip(betas, mixtures))  # noqa: E731
    f, g2s2 = fkc.sde_coefficients(S, t)
    sigma = S.sigma(t)

    def drift(y):
        combined = sum(b * m.x0_eps(S, y[None], t)[1][0] for b, m in zip(betas, mixtures))
        return -f * y - 0.5 * (noise_ratio + 1.0) * g2s2 * sigma * combined

    grad = jax.grad(log_p)(x, t)
    lap = jnp.trace(jax.hessian(log_p)(x, t))
    div_v = jnp.trace(jax.jacfwd(drift)(x))
    generator = -div_v - drift(x) @ grad + 0.5 * noise_ratio * g2s2 * sigma**2 * (lap + grad @ grad)
    d_tau = -jax.grad(log_p, argnums=1)(x, t)
    return d_tau - generator


@pytest.mark.parametrize(
    "name, noise",
    [("anneal", "target_score"), ("anneal", "tempered_noise"), ("product", "target_score"), ("guidance", "target_score"),
     ("annealed_product", "tempered_noise")],
)
def test_weight_rate_solves_the_feynman_kac_pde(name, noise):
    # 2-D mixtures with exact log-densities: no Monte-Carlo noise, any sign or factor error shows.
    m1 = jd.testing.GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [1.5, -0.2]]), jnp.array([0.4, 0.8]))
    m2 = jd.testing.GaussianMixture(jnp.array([0.6, 0.4]), jnp.array([[0.2, 1.0], [-0.7, -1.1]]), jnp.array([0.6, 0.5]))
    d1, d2 = m1.denoiser(S), m2.denoiser(S)
    target = {
        "anneal": lambda: fkc.Anneal(d1, 2.5, noise=noise),
        "product": lambda: fkc.Product(d1, d2, noise=noise),
        "guidance": lambda: fkc.Guidance(d1, d2, 2.0),
        "annealed_product": lambda: fkc.AnnealedProduct(d1, d2, 1.5, noise=noise),
    }[name]()
    mixtures = (m1,) if name == "anneal" else (m1, m2)
    ratio = 1.0 if target.noise == "target_score" else 1.0 / float(sum(target.betas))
    args = mixtures[0] if name == "anneal" else mixtures
    xs = jax.random.normal(jax.random.key(0), (5, 2))

    @jax.jit
    def both(t):
        eps = [d.eps(xs, t, a) for d, a in zip(target.denoisers, target.split_args(args))]
        want = jax.vmap(lambda x: _fk_residual(target, mixtures, ratio, x, t))(xs)
        return fkc.log_weight_rate(S, t, eps, target.betas)[0], want

    for t in (0.05, 0.3, 0.8):
        # The rate is exact, including the constant (sum beta - 1) D f that only log_Z sees.
        rate, want = both(t)
        np.testing.assert_allclose(rate, want, rtol=1e-8, atol=1e-8)


def test_annealed_mixture_mass_and_width():
    # Unequal widths, so an unweighted sampler cannot get the mass right by accident. Resampling makes the
    # per-run mode mass noisy (std ~0.05 at 2048 particles), so replicate runs give the error bar; the full
    # 16 x 8192 acceptance numbers are in benchmarks/fkc_accuracy.py.
    mix = jd.testing.GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[-2.0], [2.0]]), jnp.array([0.4, 0.8]))
    den, beta, n, runs = mix.denoiser(S), 2.0, 2048, 16
    grid = jnp.linspace(-8.0, 8.0, 20001)
    logp = beta * mix.log_prob(S, grid[:, None], TS[-1])

    exact = np.asarray(mode_stats(jnp.exp(logp - logp.max()), grid))

    def run(key, weighted):
        k1, k2 = jax.random.split(key)
        x = jax.random.normal(k1, (n, 1)) / np.sqrt(beta)  # q_1^beta ≈ N(0, 1/beta) for VP
        res = fkc.sample(fkc.Anneal(den, beta), x, TS, k2, args=mix, weighted=weighted)
        return mode_stats(jnp.exp(res.log_weights), res.x[:, 0])

    keys = jax.random.split(jax.random.key(2), runs)
    got = np.asarray(jax.jit(jax.vmap(lambda k: run(k, True)))(keys))
    control = np.asarray(jax.jit(jax.vmap(lambda k: run(k, False)))(keys)).mean(0)
    se = got[:, 0].std(ddof=1) / np.sqrt(runs)
    assert abs(got[:, 0].mean() - exact[0]) < max(0.02, 4 * se), (got.mean(0), exact, se)
    np.testing.assert_allclose(got.mean(0)[1:], exact[1:], rtol=0.10)
    # The uncorrected sampler misses the mass (0.16 vs 0.27) and the narrow mode's width.
    assert abs(control[0] - exact[0]) > 0.08, (control, exact)


def test_tilt_linear_reward_matches_closed_form():
    # p = N(mu, s^2), r(x) = h x: the weighted target is N(a mu + a s^2 h / alpha, C) at ts[-1] (a = alpha_t).
    gd = jd.testing.GaussianData(jnp.array([[0.5]]), jnp.array([[0.8]]))
    h, alpha, n, runs = 1.0, 2.0, 2048, 8
    ts = jd.timesteps(S, 100, "time")
    target = fkc.Tilt(gd.denoiser(S), lambda x0: h * x0[:, 0], alpha, num_candidates=4)
    a = S.alpha(ts[-1])
    want_mean = float(a * gd.mean[0, 0] + a * gd.scale[0, 0] ** 2 * h / alpha)

    def run(key, weighted):
        k1, k2 = jax.random.split(key)
        x = gd.sample_marginal(k1, S, ts[0], (n, 1))
        return _moments(fkc.sample(target, x, ts, k2, args=gd, weighted=weighted))[0][0]

    keys = jax.random.split(jax.random.key(3), runs)
    m = np.asarray(jax.jit(jax.vmap(lambda k: run(k, True)))(keys))
    m0 = np.asarray(jax.jit(jax.vmap(lambda k: run(k, False)))(keys))
    se, se0 = m.std(ddof=1) / np.sqrt(runs), m0.std(ddof=1) / np.sqrt(runs)
    assert abs(m.mean() - want_mean) < 4 * se, (m.mean(), want_mean, se)
    assert abs(m0.mean() - want_mean) > 10 * se0, (m0.mean(), want_mean, se0)


def _shard_setup():
    gd = jd.testing.GaussianData(jnp.array([[1.0, -0.5]]), jnp.array([[1.0, 0.7]]))
    target = fkc.Anneal(gd.denoiser(S), 2.0)
    ts = jd.timesteps(S, 20, "time")
    x = jax.random.normal(jax.random.key(5), (8 * 64, 2)) / np.sqrt(2.0)
    return gd, target, ts, x


@pytest.mark.parametrize("global_resampling", [False, True])
def test_sharded_run_equals_single_device(global_resampling):
    gd, target, ts, x = _shard_setup()
    key = jax.random.key(6)
    mesh = jax.make_mesh((8,), ("p",))
    P = jax.sharding.PartitionSpec

    def local(xb, k):
        res = fkc.sample(target, xb, ts, k, args=gd, ess_threshold=0.7, axis_name="p", global_resampling=global_resampling)
        return res.x, res.log_weights, res.ess[None], res.log_Z[None]

    specs = (P("p"), P("p"), P("p"), P("p"))
    x_sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("p")))
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("p"), P()), out_specs=specs))(x_sharded, key)
    sharded = [np.asarray(a) for a in sharded]
    # Single device: the same program with the shard axis as a vmapped axis.
    single = jax.jit(jax.vmap(local, in_axes=(0, None), axis_name="p"))(x.reshape(8, 64, 2), key)
    for a, b in zip(sharded, single):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b).reshape(a.shape), rtol=1e-12, atol=1e-12)
    if not global_resampling:
        # Per-shard resampling: shard j is a plain run with key fold_in(key, j).
        for j in (0, 5):
            res = fkc.sample(target, x[64 * j : 64 * (j + 1)], ts, jax.random.fold_in(key, j), args=gd, ess_threshold=0.7)
            np.testing.assert_allclose(sharded[0][64 * j : 64 * (j + 1)], np.asarray(res.x), rtol=1e-12, atol=1e-12)
    else:
        # Global weights are normalized over all shards.
        assert float(jax.scipy.special.logsumexp(sharded[1])) == pytest.approx(0.0, abs=1e-12)


def _nan_model(bad_region):
    gd = jd.testing.GaussianData(jnp.array(0.0), jnp.array(1.0))
    base = gd.denoiser(S)

    def fn(x, t_model, args):
        out = base.fn(x, t_model, args)
        return jnp.where(bad_region(x), jnp.nan, out)

    return gd, jd.Denoiser(fn, S, "epsilon")


def test_all_nan_weights_are_flagged_never_silent():
    gd, den = _nan_model(lambda x: jnp.ones_like(x, bool))
    ts = jd.timesteps(S, 10, "time")
    x = jax.random.normal(jax.random.key(0), (64, 1))
    res = jax.jit(lambda x, k: fkc.sample(fkc.Anneal(den, 2.0), x, ts, k, args=gd))(x, jax.random.key(1))
    assert int(res.num_degenerate) == 10 and np.isnan(float(res.log_Z))
    np.testing.assert_allclose(jnp.exp(res.log_weights), 1 / 64)  # documented recovery: uniform weights
    with pytest.raises(FloatingPointError, match="every particle weight was -inf or NaN at 10 step"):
        res.raise_if_degenerate()
    checked = checkify.checkify(jax.jit(lambda x, k: fkc.sample(fkc.Anneal(den, 2.0), x, ts, k, args=gd, checks=True)))
    err, _ = checked(x, jax.random.key(1))
    with pytest.raises(Exception, match="every particle weight was -inf or NaN"):
        err.throw()


def test_nan_particles_get_zero_weight_and_are_removed():
    # The model fails (NaN) in a region; those particles must die at the next resampling, not spread NaN.
    gd, den = _nan_model(lambda x: x > 1.5)
    ts = jd.timesteps(S, 100, "time")
    x = jax.random.normal(jax.random.key(0), (256, 1))
    res = fkc.sample(fkc.Anneal(den, 2.0), x, ts, jax.random.key(1), args=gd)
    assert int(res.num_degenerate) == 0 and np.isfinite(float(res.log_Z))
    finite = np.isfinite(np.asarray(res.x[:, 0]))
    # Particles are moved after resampling, so a few may step into the bad region at the last step:
    # they carry weight zero only if they were NaN before; all resampled ancestors were finite.
    assert finite.mean() > 0.9
    assert np.all(np.isfinite(np.asarray(res.log_weights)[finite]))


def test_result_fields_trigger_window_and_vmap():
    gd, target, ts, x = _shard_setup()
    f = jax.jit(jax.vmap(lambda k: fkc.sample(target, x, ts, k, args=gd, resample_window=(0.5, 1.0), resample="stratified")))
    res = f(jax.random.split(jax.random.key(0), 3))
    assert res.x.shape == (3,) + x.shape and res.ess.shape == (3, 20) and res.resampled.shape == (3, 20)
    np.testing.assert_array_equal(np.asarray(res.resampled[0]), np.asarray(ts[:-1] >= 0.5))
    np.testing.assert_allclose(jax.scipy.special.logsumexp(res.log_weights, axis=1), 0.0, atol=1e-12)
    assert not np.allclose(res.x[0], res.x[1])  # independent runs
    never = fkc.sample(target, x, ts, jax.random.key(0), args=gd, resample=None)
    assert not np.any(np.asarray(never.resampled)) and float(never.ess[-1]) < x.shape[0]


def test_bad_arguments():
    gd, target, ts, x = _shard_setup()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="`num_particles=100` but `x_T` has 512 particles"):
        fkc.sample(target, x, ts, key, args=gd, num_particles=100)
    with pytest.raises(ValueError, match="`ts` must be strictly decreasing"):
        fkc.sample(target, x, ts[::-1], key, args=gd)
    with pytest.raises(ValueError, match=r"`ess_threshold` must be a real number in \[0, 1\], got 2.0"):
        fkc.sample(target, x, ts, key, args=gd, ess_threshold=2.0)
    with pytest.raises(ValueError, match="`global_resampling=True` needs `axis_name`"):
        fkc.sample(target, x, ts, key, args=gd, global_resampling=True)
    with pytest.raises(ValueError, match="Unknown `resample='sys'`"):
        fkc.sample(target, x, ts, key, args=gd, resample="sys")
    with pytest.raises(ValueError, match=r"`beta` must be a finite inverse temperature > 0, got -1.0"):
        fkc.Anneal(target.denoisers[0], -1.0)
    with pytest.raises(ValueError, match="must be a tuple of 2 model args"):
        fkc.sample(fkc.Product(target.denoisers[0], target.denoisers[0]), x, ts, key, args=gd)
    with pytest.raises(ValueError, match="All denoisers must share one forward process"):
        fkc.sample(fkc.Product(target.denoisers[0], gd.denoiser(jd.VPLinear(beta_max=10.0))), x, ts, key, args=(gd, gd))
    with pytest.raises(ValueError, match="Unknown `noise='hot'`"):
        fkc.Anneal(target.denoisers[0], 2.0, noise="hot")
