"""Tests of optim.polar_cbo: the per-particle kernel consensus against a brute-force loop, and
that it keeps several minima populated where plain CBO collapses onto one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optim


def double_well(x):
    return jnp.sum((x**2 - 1.0) ** 2)


@pytest.mark.parametrize("kernel,factor", [("gaussian", "alpha"), ("laplace", "const")])
def test_zero_noise_step_moves_toward_the_brute_force_polar_consensus(kernel, factor):
    rng = np.random.default_rng(0)
    x, kappa, alpha = rng.normal(size=(12, 2)), 0.7, 3.0
    f = np.array([float(double_well(xi)) for xi in x])
    expect = np.zeros_like(x)
    for i in range(12):
        logits = []
        for j in range(12):
            dist = np.linalg.norm(x[i] - x[j])
            neglog = dist**2 / (2 * kappa**2) if kernel == "gaussian" else dist / kappa
            logits.append(-(alpha if factor == "alpha" else 1.0) * neglog - alpha * f[j])
        w = np.exp(np.array(logits) - max(logits))
        expect[i] = w @ x / w.sum()
    tx = optim.polar_cbo(kernel=kernel, kappa=kappa, kernel_factor=factor, sigma=0.0, alpha=alpha, dt=0.1)
    x = jnp.asarray(x)
    step, state = jax.jit(lambda x: tx.update(None, tx.init(x), x, value=jax.vmap(double_well)(x)))(x)
    np.testing.assert_allclose(step, -0.1 * (x - expect), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(state.consensus, optim.consensus_point(x, jnp.asarray(f), alpha), rtol=1e-12)


def test_polar_keeps_both_minima_where_cbo_collapses():
    x0 = jnp.asarray(np.random.default_rng(1).uniform(-2, 2, size=(100, 1)))
    kw = dict(sigma=0.5, alpha=30.0, dt=0.01)
    polar = optim.cbo_minimize(double_well, x0, jax.random.key(0), optim.polar_cbo(kappa=0.3, **kw), 800)
    plain = optim.cbo_minimize(double_well, x0, jax.random.key(0), optim.cbo(**kw), 800)

    def near(p, m):
        return float(jnp.mean(jnp.abs(p[:, 0] - m) < 0.25))

    assert near(polar.particles, 1.0) > 0.25 and near(polar.particles, -1.0) > 0.25
    assert max(near(plain.particles, 1.0), near(plain.particles, -1.0)) > 0.95


def test_infinite_kappa_is_plain_cbo_and_bad_options_raise():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(10, 3)))

    def step(tx):
        return jax.jit(lambda x: tx.update(None, tx.init(x, key=jax.random.key(5)), x,
                                           value=jax.vmap(double_well)(x))[0])(x)

    np.testing.assert_allclose(step(optim.polar_cbo(kappa=math.inf, sigma=1.0)), step(optim.cbo(sigma=1.0)),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="`axis_name` must be None for polar_cbo, got 'p'"):
        optim.polar_cbo(axis_name="p")
    with pytest.raises(ValueError, match="`kernel` must be one of 'gaussian', 'laplace', got 'box'"):
        optim.polar_cbo(kernel="box")
    with pytest.raises(ValueError, match=r"`kappa` must be a number > 0 \(math.inf gives plain CBO\), got 0"):
        optim.polar_cbo(kappa=0)
