"""Resampling: unbiased offspring counts, variance ordering, edge cases in float32 and with bad log-weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.smc import resampling as rs

SCHEMES = tuple(rs.RESAMPLERS)
# Asymmetric weights with an exact zero, so a sign flip or an off-by-one in the CDF search shows up.
WEIGHTS = np.array([0.05, 0.0, 0.3, 0.02, 0.13, 0.25, 0.0, 0.25])


def _offspring(scheme, log_weights, num_samples, num_keys, seed=0):
    keys = jax.random.split(jax.random.key(seed), num_keys)
    n = log_weights.shape[0]
    fn = jax.jit(jax.vmap(lambda k: jnp.bincount(rs.RESAMPLERS[scheme](k, log_weights, num_samples), length=n)))
    return np.asarray(fn(keys))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_samples", [13])
def test_offspring_counts_are_unbiased(scheme, num_samples):
    counts = _offspring(scheme, jnp.log(jnp.asarray(WEIGHTS)), num_samples, 20000)
    assert counts.sum(1).min() == counts.sum(1).max() == num_samples
    expected = num_samples * WEIGHTS
    mean = counts.mean(0)
    # Monte-Carlo standard error from the measured spread; the floor covers schemes whose count of a
    # particle is almost deterministic (variance ~ 0).
    se = counts.std(0) / np.sqrt(counts.shape[0]) + 1e-3
    assert np.all(np.abs(mean - expected) < 5 * se), (mean, expected, se)
    assert np.all(counts[:, WEIGHTS == 0] == 0)


def test_systematic_and_stratified_have_lower_offspring_variance():
    lw = jnp.log(jnp.asarray(WEIGHTS))
    var = {s: _offspring(s, lw, 16, 20000, seed=1).var(0).sum() for s in SCHEMES}
    assert var["systematic"] < 0.5 * var["multinomial"], var
    assert var["stratified"] < 0.8 * var["multinomial"], var
    assert var["residual"] < var["multinomial"], var
    # Multinomial variance is N w (1 - w) per particle: pins the baseline itself.
    np.testing.assert_allclose(var["multinomial"], (16 * WEIGHTS * (1 - WEIGHTS)).sum(), rtol=0.05)


def test_systematic_counts_are_floor_or_ceil():
    counts = _offspring("systematic", jnp.log(jnp.asarray(WEIGHTS)), 13, 2000)
    lo, hi = np.floor(13 * WEIGHTS), np.ceil(13 * WEIGHTS)
    assert np.all((counts >= lo) & (counts <= hi))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_huge_nan_and_inf_log_weights(scheme):
    key = jax.random.key(3)
    f = jax.jit(rs.RESAMPLERS[scheme], static_argnums=2)
    huge = jnp.array([1e30, jnp.nan, 1e30, -jnp.inf], dtype=jnp.float32)
    idx = np.asarray(f(key, huge, 64))
    assert set(idx.tolist()) <= {0, 2} and idx.dtype == np.int32
    # +inf entries share the mass; finite ones get none.
    idx = np.asarray(f(key, jnp.array([0.0, jnp.inf, 5.0, jnp.inf]), 64))
    assert set(idx.tolist()) <= {1, 3}
    # Nothing to resample from: identity ancestors (documented), and ESS 0 to detect it.
    bad = jnp.array([-jnp.inf, jnp.nan, -jnp.inf])
    np.testing.assert_array_equal(f(key, bad, 5), [0, 1, 2, 0, 1])
    assert float(jax.jit(rs.ess)(bad)) == 0.0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float32_never_selects_zero_weight_last_particle(scheme):
    # 1000 tiny float32 weights whose cumsum ends below its exact value; the last particle has weight 0.
    lw = jnp.concatenate([jnp.full((1000,), -3.0, jnp.float32), jnp.array([-jnp.inf], jnp.float32)])
    keys = jax.random.split(jax.random.key(4), 200)
    idx = jax.jit(jax.vmap(lambda k: rs.RESAMPLERS[scheme](k, lw, 1001)))(keys)
    assert int(idx.max()) < 1000


def test_inverse_cdf_largest_uniform_float32():
    # The largest float32 below 1, with a cumulative sum whose last step is a zero weight.
    cdf = jnp.cumsum(jnp.array([0.1, 0.2, 0.7, 0.0], jnp.float32))
    u = jnp.array([0.0, np.nextafter(np.float32(1), np.float32(0))], jnp.float32)
    np.testing.assert_array_equal(rs._inverse_cdf(cdf, u), [0, 2])


def test_ess_values_and_log_normalize():
    assert float(rs.ess(jnp.array([0.0, -jnp.inf, -jnp.inf]))) == pytest.approx(1.0)
    assert float(rs.ess(jnp.full((7,), 123.0))) == pytest.approx(7.0)
    w = WEIGHTS / WEIGHTS.sum()
    assert float(rs.ess(jnp.log(jnp.asarray(WEIGHTS)) + 1e4)) == pytest.approx(1 / np.sum(w**2), rel=1e-12)
    lw, total = rs.log_normalize(jnp.log(jnp.asarray(WEIGHTS)) + 700.0)
    np.testing.assert_allclose(np.exp(lw), w, rtol=1e-12)
    assert float(total) == pytest.approx(700.0 + np.log(WEIGHTS.sum()), rel=1e-14)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`num_samples` must be a positive Python int, got 0"):
        rs.systematic(jax.random.key(0), jnp.zeros(3), 0)
    with pytest.raises(ValueError, match="Unknown `resample='sys'`"):
        rs.get_resampler("sys")
