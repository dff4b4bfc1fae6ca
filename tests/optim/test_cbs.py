"""Tests of optim.cbs: sampling mode reproduces a Gaussian target's moments (a fixed point of the
mean-field dynamics for any alpha), optimization mode finds the global minimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optim


def test_sampling_mode_matches_gaussian_target_moments():
    m = jnp.array([1.0, -2.0])
    precision = jnp.array([[2.0, 0.6], [0.6, 1.0]])

    def potential(x):
        return 0.5 * (x - m) @ precision @ (x - m)

    tx = optim.cbs("sampling", dt=0.1, alpha=1.0)
    x0 = jnp.asarray(3.0 * np.random.default_rng(1).normal(size=(200, 2)))

    @jax.jit
    def moments(x):
        state = tx.init(x, key=jax.random.key(0))

        def step(carry, _):
            x, state = carry
            upd, state = tx.update(None, state, x, value=jax.vmap(potential)(x))
            x = x + upd
            return (x, state), (x.mean(0), jnp.cov(x.T))

        means, covs = jax.lax.scan(step, (x, state), None, length=300)[1]
        return means[100:].mean(0), covs[100:].mean(0)

    mean, cov = moments(x0)
    np.testing.assert_allclose(mean, m, atol=0.1)
    np.testing.assert_allclose(cov, jnp.linalg.inv(precision), rtol=0.12, atol=0.03)
    # not a degenerate pass: optimization mode (lambda = 1) contracts the same ensemble onto m
    opt = optim.cbs("optimization", dt=0.1, alpha=1.0, alpha_growth=1.05)
    res = optim.cbo_minimize(potential, x0, jax.random.key(0), opt, 300)
    assert float(jnp.max(jnp.std(res.particles, axis=0))) < 0.05
    np.testing.assert_allclose(res.consensus, m, atol=0.05)


def test_optimization_mode_finds_rastrigin_minimum():
    def rastrigin(x):
        return 10.0 * x.size + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x))

    tx = optim.cbs("optimization", dt=0.1, alpha=1.0, alpha_growth=1.05)
    x0 = jnp.asarray(np.random.default_rng(2).uniform(-3, 3, size=(100, 2)))
    keys = jax.random.split(jax.random.key(0), 4)
    c = jax.jit(jax.vmap(lambda k: optim.cbo_minimize(rastrigin, x0, k, tx, 400).consensus))(keys)
    assert float(jnp.max(jnp.abs(c))) < 0.05


def test_bad_mode():
    with pytest.raises(ValueError, match="`mode` must be one of 'sampling', 'optimization', got 'sample'"):
        optim.cbs("sample")
