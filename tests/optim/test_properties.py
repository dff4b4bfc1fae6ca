"""Property tests (hypothesis) over the optimizers x dtypes (float32, float64, bfloat16): valid
input never gives NaN/Inf or a skipped step, runs are deterministic, and dtypes are kept.

Each (transform, dtype) pair is one compiled ``lax.scan`` (shared with the dtype tests of
``test_bad_input.py``); hypothesis draws the start, the target and the curvature (1e-3 to
1e3) it runs on. Derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import optim
from tests.optim._runs import ALL, QUAD_STEPS, counters, quadratic_run

DTYPES = ["float32", "float64", "bfloat16"]
vectors = st.lists(st.floats(-10.0, 10.0, allow_nan=False, width=32), min_size=4, max_size=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ALL))
@settings(max_examples=4, deadline=None, derandomize=True, database=None)
@given(p0=vectors, target=vectors, log_scale=st.floats(-3.0, 3.0))
def test_lr_free_transforms_stay_finite_and_are_deterministic(name, dtype, p0, target, log_scale):
    run = quadratic_run(name, dtype, QUAD_STEPS)
    if name == "schedule_free_sgd":  # a plain SGD step with lr = 0.1 diverges (valid, but not ours) above curvature 20
        log_scale = min(log_scale, 1.0)
    args = (jnp.asarray(p0, jnp.float32), jnp.asarray(target, jnp.float32), jnp.float32(10.0**log_scale))
    traj, state = run(*args)
    assert traj.dtype == jnp.dtype(dtype)
    for leaf in jax.tree.leaves((traj, state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(leaf))), f"{name} {dtype}: non-finite values"
    again = run(*args)
    for a, b in zip(jax.tree.leaves((traj, state)), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    if counters(state) is not None:
        assert counters(state) == (QUAD_STEPS, 0), f"{name} {dtype}: skipped a valid step {counters(state)}"


def _sphere(x):
    return jnp.sum(jnp.square(x.astype(jnp.float32)))


@functools.lru_cache(maxsize=None)
def _consensus_steps(kind, dtype):
    """Jitted: 5 steps of the transform, alpha injected (traced), from ``x`` cast to ``dtype``."""
    factory = {"cbo": optim.cbo, "cbs": optim.cbs, "polar_cbo": optim.polar_cbo}[kind]
    static = () if kind == "polar_cbo" else ("alpha_schedule",)
    tx = optax.inject_hyperparams(factory, static_args=static)(alpha=1.0, alpha_max=1e30, alpha_growth=1.0)

    @jax.jit
    def run(x, alpha):
        x = x.astype(dtype)
        state = tx.init(x)
        state.hyperparams["alpha"] = alpha.astype(state.hyperparams["alpha"].dtype)

        def body(carry, _):
            x, state = carry
            step, state = tx.update(None, state, x, value=jax.vmap(_sphere)(x))
            return (x + step, state), None

        x, state = jax.lax.scan(body, (x, state), None, length=5)[0]
        return x, state.inner_state.consensus

    return run


@pytest.mark.parametrize("kind", ["cbo", "cbs", "polar_cbo"])
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=4, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**16), log_spread=st.floats(-3.0, 3.0), log_alpha=st.floats(-2.0, 30.0))
def test_consensus_transforms_stay_finite_and_are_deterministic(kind, dtype, seed, log_spread, log_alpha):
    """alpha from 0.01 to 1e30 (past float32's exp range many times over), spreads 1e-3 to 1e3."""
    x = jnp.asarray(10.0**log_spread * np.random.default_rng(seed).standard_normal((16, 3)), jnp.float32)
    run = _consensus_steps(kind, dtype)
    out = run(x, jnp.float32(10.0**log_alpha))
    assert out[0].dtype == jnp.dtype(dtype)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in out), f"{kind} {dtype}: non-finite values"
    for a, b in zip(out, run(x, jnp.float32(10.0**log_alpha))):
        np.testing.assert_array_equal(a, b)
