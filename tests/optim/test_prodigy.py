"""optim.prodigy: parity with prodigyopt.Prodigy in float64, first step by hand, bad input, NaN."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from tests.optim._problems import GUARDED as PROBLEMS
from tests.optim._problems import STEPS, max_rel_diff, reference_trajectory, rel_diffs, run_jax, run_torch

# (name, kwargs for both sides): the defaults, then every non-default option in some case
CASES = [
    ("defaults", {}),
    ("bias_correction_decoupled_wd_safeguard_growth",
     {"use_bias_correction": True, "weight_decay": 0.05, "safeguard_warmup": True, "growth_rate": 1.05}),
    ("coupled_wd_d_coef_betas_beta3_d0", {"weight_decay": 0.01, "decouple": False, "d_coef": 2.0,
                                          "betas": (0.8, 0.99), "beta3": 0.98, "d0": 1e-4}),
    ("no_momentum_slice_p", {"betas": (0.0, 0.999), "slice_p": 3}),
]


@pytest.mark.reference("torch", "prodigyopt")
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_parity_with_prodigyopt(problem, name, kwargs):
    import prodigyopt

    prob = PROBLEMS[problem]()
    ref = reference_trajectory(prob, lambda pr, n: run_torch(pr, lambda ps: prodigyopt.Prodigy(ps, **kwargs), n))
    worst, at = max_rel_diff(prob, optim.prodigy(**kwargs), ref)
    assert worst <= 1e-6, f"{name}/{problem}: max rel diff {worst:.3g} at step {at}"


@pytest.mark.reference("torch", "prodigyopt")
def test_optax_contrib_prodigy_deviates_and_our_optax_preset_explains_most_of_it():
    """optax.contrib.prodigy always bias-corrects: far from prodigyopt's defaults."""
    import prodigyopt

    prob = PROBLEMS["mlp"]()
    ref = run_torch(prob, lambda ps: prodigyopt.Prodigy(ps), STEPS)
    contrib = rel_diffs(run_jax(prob, optax.contrib.prodigy(), STEPS), ref).max()
    assert contrib > 1e-2, contrib
    ref_bc = run_torch(prob, lambda ps: prodigyopt.Prodigy(ps, use_bias_correction=True), STEPS)
    ours_bc = rel_diffs(run_jax(prob, optim.prodigy(**optim.PRODIGY_PRESETS["optax"]), STEPS), ref_bc).max()
    assert ours_bc <= 1e-6


def test_first_step_by_hand():
    """Step 1: x = x0 so r = 0 and d stays d0; the update is d0 * Adam's first step."""
    p = jnp.array([1.0, -2.0, 0.5])
    g = jnp.array([2.0, -4.0, 0.0])
    tx = optim.prodigy()
    u, s = tx.update(g, tx.init(p), p)
    d0, b1, b2, eps = 1e-6, 0.9, 0.999, 1e-8
    m = d0 * (1 - b1) * np.asarray(g)
    v = d0**2 * (1 - b2) * np.asarray(g) ** 2
    np.testing.assert_allclose(u, -d0 * m / (np.sqrt(v) + d0 * eps), rtol=1e-14)
    assert float(s.d) == d0 and float(s.d_numerator) == 0.0 and int(s.count) == 1
    np.testing.assert_allclose(s.grad_sum, d0 * np.asarray(g), rtol=1e-14)  # (d/d0) * dlr * g


def test_nonfinite_gradient_skips_the_step_and_keeps_d():
    p = jnp.array([1.0, -2.0])
    tx = optim.prodigy()
    state = tx.init(p)
    for _ in range(3):
        u, state = tx.update(2 * p, state, p)
        p = p + u
    for bad in (jnp.nan, jnp.inf):
        u, new = tx.update(jnp.array([bad, 1.0]), state, p)
        assert np.all(np.asarray(u) == 0)
        assert int(new.num_nonfinite) == int(state.num_nonfinite) + 1
        assert float(new.d) == float(state.d) and int(new.count) == int(state.count)
        np.testing.assert_array_equal(new.exp_avg_sq, state.exp_avg_sq)
        state = new


def test_zero_learning_rate_step_changes_nothing_but_the_count():
    tx = optim.prodigy(learning_rate=lambda k: jnp.where(k == 0, 0.0, 1.0))
    p = jnp.array([1.0, -2.0])
    u, s = tx.update(2 * p, tx.init(p), p)
    assert np.all(np.asarray(u) == 0) and int(s.count) == 1 and float(s.d) == 1e-6
    assert np.all(np.asarray(s.exp_avg) == 0)


def test_growth_rate_bounds_d():
    p = jnp.linspace(-1.0, 1.0, 7)
    tx = optim.prodigy(growth_rate=1.1)
    state = tx.init(p)
    ds = [float(state.d)]
    for _ in range(30):
        u, state = tx.update(p - 3.0, state, p)  # gradient of 0.5||p - 3||^2
        p = p + u
        ds.append(float(state.d))
    ds = np.asarray(ds)
    # the first move away from d0 is max(d0, d_hat), unbounded as in the reference; then growth_rate binds
    ratios = (ds[1:] / ds[:-1])[ds[:-1] != 1e-6]
    assert len(ratios) > 20 and ratios.max() <= 1.1 * (1 + 1e-12) and ds[-1] > 10 * ds[1]
    assert math.isclose(ratios.max(), 1.1, rel_tol=1e-9)  # the bound is active
