"""Tests of optim.cbo: consensus numerics, the step against closed forms, the CBXpy anchor,
schedulers, variants (random batch, memory, gradient, Heaviside, truncation), the driver's
termination, sharding over 8 host devices, and bad input."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from optim import consensus_point as _consensus_point, ess_alpha as _ess_alpha

consensus_point = jax.jit(_consensus_point)
ess_alpha = jax.jit(_ess_alpha, static_argnums=(1, 2, 3))


def rastrigin(x, shift=0.0):
    y = x - shift
    return 10.0 * y.size + jnp.sum(y**2 - 10.0 * jnp.cos(2 * jnp.pi * y))


def sphere(x):
    return jnp.sum(x**2)


def normal(seed, shape, scale=1.0):
    """Test data from NumPy: eager jax.random calls would each compile a PRNG kernel."""
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape))


@functools.lru_cache(maxsize=None)
def _stepper(kw, f, with_value_fn):
    tx = optim.cbo(**dict(kw))

    @jax.jit
    def go(x, updates, key):
        state = tx.init(x, key=key)
        return tx.update(updates, state, x, value=jax.vmap(f)(x), value_fn=f if with_value_fn else None)

    return go


def one_step(x, f=sphere, key=0, updates=None, value_fn=False, **kw):
    """One jitted update of optim.cbo(**kw) from a fresh state; compiled once per config and shape."""
    return _stepper(tuple(sorted(kw.items())), f, value_fn)(x, updates, jax.random.key(key))


# ----------------------------------------------------------------------------------------------
# consensus numerics


def test_consensus_matches_brute_force_loop():
    rng = np.random.default_rng(0)
    x, f = rng.normal(size=(30, 4)), rng.uniform(0, 5, size=30)
    alpha = 3.7
    num, den = np.zeros(4), 0.0
    for i in range(30):
        w = math.exp(-alpha * f[i])
        num += w * x[i]
        den += w
    np.testing.assert_allclose(consensus_point(jnp.asarray(x), jnp.asarray(f), alpha), num / den, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_consensus_huge_alpha_times_f_is_finite_and_picks_argmin(dtype):
    x = normal(0, (64, 3)).astype(dtype)
    f = (1e4 + 1e3 * jnp.sum(x**2, axis=1)).astype(dtype)  # alpha * f ~ 1e12 .. 1e13
    c = consensus_point(x, f, 1e8)
    assert bool(jnp.all(jnp.isfinite(c)))
    np.testing.assert_array_equal(c, x[jnp.argmin(f)])


def test_nonfinite_losses_get_zero_weight():
    x = normal(1, (10, 2))
    f = jnp.arange(10.0)
    bad = f.at[0].set(jnp.inf).at[3].set(jnp.nan).at[5].set(-jnp.inf)
    x_bad = x.at[3].set(jnp.nan).at[5].set(jnp.inf)  # their positions must not poison c either
    keep = np.array([i not in (0, 3, 5) for i in range(10)])
    np.testing.assert_allclose(consensus_point(x_bad, bad, 0.5), consensus_point(x[keep], f[keep], 0.5), rtol=1e-12)
    # every loss non-finite: uniform weights over the positions
    np.testing.assert_allclose(consensus_point(x, jnp.full(10, jnp.nan), 0.5), x.mean(0), rtol=1e-12)


def test_transform_with_nonfinite_losses_never_gives_nan():
    x = normal(2, (8, 3))
    value = jnp.array([jnp.nan, 1.0, jnp.inf, 2.0, 0.5, jnp.nan, 3.0, 1e30])
    tx = optim.cbo(sigma=1.0, alpha=1e5)
    step, state = jax.jit(lambda x, v: tx.update(None, tx.init(x), x, value=v))(x, value)
    assert bool(jnp.all(jnp.isfinite(step))) and bool(jnp.all(jnp.isfinite(state.consensus)))
    np.testing.assert_allclose(state.consensus, x[4], rtol=1e-12)


def test_ess_alpha_hits_target_in_log_space():
    value = jnp.asarray(np.random.default_rng(3).uniform(0.0, 50.0, size=40))
    for eta in (0.1, 0.5, 0.9):
        a = ess_alpha(value, eta, 1e-5, 1e5)
        w = jnp.exp(-a * (value - value.min()))
        ess = jnp.sum(w) ** 2 / jnp.sum(w**2) / 40
        assert abs(float(ess) - eta) < 1e-3, (eta, float(a), float(ess))
    # alpha below CBXpy's linear-bisection resolution (~1.5) is resolved
    assert 0.01 < float(ess_alpha(value, 0.5, 1e-5, 1e5)) < 1.0
    # all-equal losses keep ESS = N at any alpha -> the upper bracket end
    assert float(ess_alpha(jnp.ones(40), 0.5, 1e-5, 1e5)) == pytest.approx(1e5)


# ----------------------------------------------------------------------------------------------
# the step against closed forms


def test_zero_noise_step_is_the_drift_for_both_schemes():
    x = normal(4, (16, 3))
    c = consensus_point(x, jax.vmap(sphere)(x), 30.0)
    step, _ = one_step(x, sigma=0.0, lambda_=2.0, dt=0.1)
    np.testing.assert_allclose(step, -0.2 * (x - c[None]), rtol=1e-12)
    step, _ = one_step(x, sigma=0.0, lambda_=2.0, dt=0.1, scheme="exact_drift")
    np.testing.assert_allclose(step, math.expm1(-0.2) * (x - c[None]), rtol=1e-12)


@pytest.mark.parametrize("noise", ["anisotropic", "isotropic"])
def test_noise_is_sigma_sqrt_dt_D_xi_with_documented_keys(noise):
    n, d, lam, dt, sigma = 40, 5, 1.0, 0.01, 3.0
    x = normal(5, (n, d))
    c = consensus_point(x, jax.vmap(sphere)(x), 30.0)
    step, _ = one_step(x, key=7, noise=noise, sigma=sigma, lambda_=lam, dt=dt)
    y = x - c[None]
    scale = y if noise == "anisotropic" else jnp.linalg.norm(y, axis=1, keepdims=True)
    moved = jnp.min(jnp.abs(scale), axis=1) > 0  # the argmin particle sits on c and gets no noise
    xi = ((step + lam * dt * y) / (sigma * math.sqrt(dt) * scale))[moved]
    # xi of particle i comes from fold_in(fold_in(key, step=0), i): standard normals, by construction
    step_key = jax.random.fold_in(jax.random.key(7), 0)
    expect = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(step_key, i), (1, d)))(
        jnp.arange(n, dtype=jnp.uint32))[:, 0]
    np.testing.assert_allclose(xi, expect[moved], rtol=1e-7, atol=1e-9)
    assert abs(float(xi.mean())) < 0.2 and abs(float(xi.std()) - 1.0) < 0.2


def test_noise_truncation_caps_the_noise_scale():
    x = normal(5, (40, 5), scale=100.0)
    c = consensus_point(x, jax.vmap(sphere)(x), 30.0)
    y = x - c[None]
    norm = jnp.linalg.norm(y, axis=1, keepdims=True)
    moved = norm[:, 0] > 0
    plain, _ = one_step(x, key=7, noise="isotropic", sigma=3.0, lambda_=1.0, dt=0.01)
    capped, _ = one_step(x, key=7, noise="isotropic", sigma=3.0, lambda_=1.0, dt=0.01, noise_truncation=0.5)
    xi = (plain + 0.01 * y)[moved] / (0.3 * norm[moved])
    np.testing.assert_allclose((capped + 0.01 * y)[moved], 0.3 * 0.5 * xi, rtol=1e-9, atol=1e-12)


def test_gradient_drift_uses_updates():
    x = normal(8, (16, 3))
    g = jax.vmap(jax.grad(sphere))(x)
    step, _ = one_step(x, updates=g, sigma=0.0, lambda_=0.0, dt=0.1, gradient_weight=3.0)
    np.testing.assert_allclose(step, -0.3 * g, rtol=1e-12)


@pytest.mark.parametrize("correction", ["heaviside", "heaviside_reg"])
def test_heaviside_correction_freezes_particles_better_than_consensus(correction):
    x = normal(9, (30, 2))
    f = jax.vmap(rastrigin)(x)
    c = consensus_point(x, f, 1.0)
    step, _ = one_step(x, f=rastrigin, value_fn=True, sigma=0.0, alpha=1.0, dt=0.1, correction=correction)
    better = np.asarray(f < rastrigin(c))
    assert 0 < int(better.sum()) < 30
    np.testing.assert_allclose(step[better], 0.0, atol=1e-12)
    np.testing.assert_allclose(step[~better], -0.1 * (x - c[None])[~better], rtol=1e-9)


def test_random_batch_method_moves_each_particle_toward_its_batch_consensus():
    n, b = 16, 4
    x = normal(10, (n, 3))
    f = jax.vmap(sphere)(x)
    step, _ = one_step(x, sigma=0.0, alpha=2.0, dt=0.1, batch_size=b)
    implied = np.asarray(x + step / 0.1)  # x - (x - c_i) = c_i
    groups = {}
    for i, ci in enumerate(np.round(implied, 9)):
        groups.setdefault(tuple(ci), []).append(i)
    assert sorted(len(g) for g in groups.values()) == [b] * (n // b)
    for ci, members in groups.items():
        np.testing.assert_allclose(ci, consensus_point(x[np.array(members)], f[np.array(members)], 2.0), atol=1e-8)
    # one batch of all particles is plain CBO, noise included
    full, _ = one_step(x, sigma=1.0, batch_size=n)
    plain, _ = one_step(x, sigma=1.0)
    np.testing.assert_allclose(full, plain, rtol=1e-10, atol=1e-12)


def test_memory_keeps_personal_best_and_takes_consensus_over_it():
    x = normal(11, (10, 2))
    tx = optim.cbo(sigma=0.5, alpha=5.0, memory=True)
    update = jax.jit(lambda x, state: tx.update(None, state, x, value=jax.vmap(sphere)(x)))
    state = tx.init(x, key=jax.random.key(0))
    best_x, best_f = np.array(x), np.full(10, np.inf)
    for _ in range(4):
        f = np.asarray(jax.vmap(sphere)(x))
        step, state = update(x, state)
        better = f < best_f
        best_x[better], best_f[better] = np.asarray(x)[better], f[better]
        np.testing.assert_allclose(state.memory, best_x, rtol=1e-12)
        np.testing.assert_allclose(state.consensus, consensus_point(best_x, best_f, state.alpha), rtol=1e-10)
        x = x + step
    assert np.isfinite(best_f).all()


def test_callable_and_ess_alpha_schedules():
    x = normal(12, (16, 3))
    _, state = one_step(x, alpha_schedule=lambda k: 2.0 + k, alpha=2.0)
    assert float(state.alpha) == 2.0
    _, state = one_step(x, alpha_schedule="ess", ess_target=0.3)
    w = jnp.exp(-state.alpha * (jax.vmap(sphere)(x) - jax.vmap(sphere)(x).min()))
    assert abs(float(jnp.sum(w) ** 2 / jnp.sum(w**2) / 16) - 0.3) < 1e-3


# ----------------------------------------------------------------------------------------------
# the CBXpy anchor (reduced: 12 runs per shift instead of 100)


def test_cbxpy_rastrigin_anchor_reduced():
    """Rastrigin d=20, N=40, U(-3,3), anisotropic sigma=10.1, dt=0.01, alpha 30 x1.05 <= 1e5,
    5000 steps; success = consensus within 0.25 (sup-norm) of x*, for x* = 0 and x* = 1.
    The full 100-run anchor is benchmarks/cbo_speed.py. (sigma*dt in place of sigma*sqrt(dt), or
    no noise, succeed in a few percent of runs only.)"""
    runs = 12
    tx = optim.cbo(noise="anisotropic", sigma=10.1, lambda_=1.0, dt=0.01, alpha=30.0, alpha_growth=1.05, alpha_max=1e5)
    shifts = jnp.repeat(jnp.array([0.0, 1.0], jnp.float32), runs)
    keys = jax.random.split(jax.random.key(42), 2 * runs)
    x0 = jnp.asarray(np.random.default_rng(43).uniform(-3, 3, size=(2 * runs, 40, 20)), jnp.float32)

    def run(key, x0, shift):
        return optim.cbo_minimize(lambda x: rastrigin(x, shift), x0, key, tx, num_steps=5000).consensus

    c = jax.jit(jax.vmap(run))(keys, x0, shifts)
    ok = jnp.max(jnp.abs(c - shifts[:, None]), axis=1) < 0.25
    assert int(ok[:runs].sum()) >= runs - 1 and int(ok[runs:].sum()) >= runs - 1, ok


# ----------------------------------------------------------------------------------------------
# driver


def test_driver_vmap_over_runs_equals_single_runs_and_follows_the_alpha_schedule():
    x0 = jnp.asarray(np.random.default_rng(13).uniform(-2, 2, size=(16, 4)))
    keys = jax.random.split(jax.random.key(1), 2)
    tx = optim.cbo(sigma=2.0, alpha=30.0, alpha_growth=1.05, alpha_max=1e3)
    batched = jax.vmap(lambda k: optim.cbo_minimize(rastrigin, x0, k, tx, num_steps=100))(keys)
    single = optim.cbo_minimize(rastrigin, x0, keys[1], tx, num_steps=100, progress=False)
    np.testing.assert_allclose(batched.consensus[1], single.consensus, rtol=1e-10)
    assert float(batched.best_value[1]) == pytest.approx(float(single.best_value), rel=1e-12)
    assert not np.allclose(batched.consensus[0], batched.consensus[1])  # the key matters
    np.testing.assert_allclose(single.history.alpha, np.minimum(30.0 * 1.05 ** np.arange(100), 1e3), rtol=1e-10)
    assert float(single.best_value) == pytest.approx(float(rastrigin(single.best_particle)), rel=1e-12)
    assert float(single.best_value) == pytest.approx(float(jnp.min(single.history.min_value)), rel=1e-12)


def shifted_sphere(p, s):
    return jnp.sum((p - s) ** 2)


def test_termination_criteria_stop_each_run_on_its_own():
    n = 10
    x0 = jnp.asarray(np.random.default_rng(15).uniform(-1, 1, size=(n, 2)))
    tx = optim.cbo(sigma=0.5, alpha=10.0)
    key = jax.random.key(0)
    res = optim.cbo_minimize(sphere, x0, key, tx, 400, max_evaluations=5 * n + 3)
    assert int(res.num_steps) == 5 and int(res.num_evaluations) == 5 * n
    assert np.isnan(res.history.min_value[5:]).all() and np.isfinite(res.history.min_value[:5]).all()
    res = optim.cbo_minimize(sphere, x0, key, tx, 400, diff_tol=1e-4)
    assert 1 < int(res.num_steps) < 400
    assert float(res.history.consensus_shift[int(res.num_steps) - 1]) < 1e-4
    # energy_tol under vmap: runs with different minimizers stop at different steps, each as if alone
    shifts = jnp.array([0.3, 0.0])
    run = jax.jit(jax.vmap(lambda s: optim.cbo_minimize(lambda p: shifted_sphere(p, s), x0, key, tx, 400,
                                                        energy_tol=1e-2)))
    runs = run(shifts)
    alone = jax.jit(lambda s: optim.cbo_minimize(lambda p: shifted_sphere(p, s), x0, key, tx, 400,
                                                 energy_tol=1e-2))
    for r in range(2):
        single = alone(shifts[r])
        assert int(runs.num_steps[r]) == int(single.num_steps) < 400
        assert float(single.best_value) < 1e-2
        np.testing.assert_allclose(runs.consensus[r], single.consensus, rtol=1e-10)
    assert int(runs.num_steps[0]) != int(runs.num_steps[1])


def test_cbo_with_gradient_beats_plain_cbo_on_a_stiff_quadratic():
    def valley(x):
        return jnp.sum(jnp.array([1.0, 30.0, 1.0, 30.0]) * (x - 0.5) ** 2)

    x0 = jnp.asarray(np.random.default_rng(16).uniform(-3, 3, size=(8, 4)))
    plain = optim.cbo_minimize(valley, x0, jax.random.key(0), optim.cbo(sigma=0.3, dt=0.01), 300)
    grad = optim.cbo_minimize(valley, x0, jax.random.key(0), optim.cbo(sigma=0.3, dt=0.01, gradient_weight=2.0),
                              300, with_gradient=True)
    assert float(valley(grad.consensus)) < 1e-6
    assert float(valley(grad.consensus)) < 1e-3 * float(valley(plain.consensus))


# ----------------------------------------------------------------------------------------------
# devices


def test_sharded_particles_give_the_single_device_trajectory():
    assert jax.device_count() >= 8
    mesh = jax.make_mesh((8,), ("p",))
    P = jax.sharding.PartitionSpec
    n, steps = 64, 25
    x0 = jnp.asarray(np.random.default_rng(17).uniform(-3, 3, size=(n, 6)))
    key = jax.random.key(3)
    kw = dict(noise="anisotropic", sigma=5.0, dt=0.01, alpha=1e4, alpha_schedule="ess", ess_target=0.2)

    def trajectory(tx, x):
        state = tx.init(x, key=key)

        def step(carry, _):
            x, state = carry
            upd, state = tx.update(None, state, x, value=jax.vmap(rastrigin)(x))
            return (x + upd, state), (state.consensus, state.alpha)

        return jax.lax.scan(step, (x, state), None, length=steps)[1]

    single = jax.jit(lambda x: trajectory(optim.cbo(**kw), x))(x0)
    sharded_fn = jax.shard_map(lambda x: trajectory(optim.cbo(axis_name="p", **kw), x), mesh=mesh,
                               in_specs=P("p"), out_specs=P(), check_vma=False)
    x_sharded = jax.device_put(x0, jax.sharding.NamedSharding(mesh, P("p")))
    sharded = jax.jit(sharded_fn)(x_sharded)
    assert float(jnp.std(single[0][-1] - single[0][0])) > 0.1  # the consensus really moves
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sharded[1], single[1], rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_clear_errors():
    tx = optim.cbo()
    x = jnp.ones((5, 2))
    with pytest.raises(ValueError, match=r"has shape \(\) but consensus transforms need a leading particle axis"):
        tx.update(None, tx.init({"a": jnp.ones(()), "b": x}), {"a": jnp.ones(()), "b": x}, value=jnp.ones(5))
    with pytest.raises(ValueError, match=r"`value` has shape \(4,\) but `params` holds 5 particles"):
        tx.update(None, tx.init(x), x, value=jnp.ones(4))
    with pytest.raises(ValueError, match=r"`value` has shape \(\) but `params` holds 5 particles"):
        tx.update(None, tx.init(x), x, value=jnp.float32(1.0))
    with pytest.raises(ValueError, match="need the losses"):
        tx.update(None, tx.init(x), x)
    with pytest.raises(ValueError, match="different leading"):
        y = {"a": x, "b": jnp.ones((4, 2))}
        tx.update(None, tx.init(y), y, value=jnp.ones(5))
    with pytest.raises(ValueError, match="`batch_size`=2 does not divide the 5 particles"):
        optim.cbo(batch_size=2).update(None, tx.init(x), x, value=jnp.ones(5))
    with pytest.raises(ValueError, match="needs the objective"):
        optim.cbo(correction="heaviside").update(None, tx.init(x), x, value=jnp.ones(5))
    with pytest.raises(ValueError, match="per-particle gradients in `updates`"):
        optim.cbo(gradient_weight=1.0).update(None, tx.init(x), x, value=jnp.ones(5))
    with pytest.raises(ValueError, match=r"`noise` must be one of 'anisotropic', 'isotropic', got 'gaussian'"):
        optim.cbo(noise="gaussian")
    with pytest.raises(ValueError, match=r"`dt` must be a finite number > 0, got 0.0"):
        optim.cbo(dt=0.0)
    with pytest.raises(ValueError,
                       match=r"`alpha` must be between alpha_min=1e-05 and alpha_max=100000.0, got 1000000.0"):
        optim.cbo(alpha=1e6)
    with pytest.raises(ValueError, match="`batch_size` must be None when `axis_name` is set, got 4"):
        optim.cbo(batch_size=4, axis_name="p")
    with pytest.raises(ValueError, match="`particles0` needs a leading particle axis"):
        optim.cbo_minimize(sphere, jnp.ones(()), jax.random.key(0), tx, 10)
    with pytest.raises(ValueError, match=r"`f` must map one particle to a scalar loss; it returned shape \(2,\)"):
        optim.cbo_minimize(lambda p: p, x, jax.random.key(0), tx, 10)
    with pytest.raises(ValueError, match="exactly one consensus transform"):
        optim.cbo_minimize(sphere, x, jax.random.key(0), optax.sgd(0.1), 10)


# ----------------------------------------------------------------------------------------------
# parity with CBXpy (one cheap cell; the d = 20 grid is benchmarks/cbo_parity.py)


@pytest.mark.reference("cbx")
def test_success_rate_matches_cbx_on_an_intermediate_cell():
    """Ackley d=5, N=10, isotropic sigma=0.5, dt=0.01, alpha 30 x1.05 <= 1e5, 500 steps, 100 runs
    from the same U(-3,3) ensembles: a cell with a success rate near 0.4, where a wrong noise
    scale, drift or alpha schedule moves the rate. Binomial s.e. of the difference ~0.07."""
    from cbx.dynamics import CBO
    from cbx.objectives import Ackley
    from cbx.scheduler import multiply, scheduler

    runs, n, d, steps = 100, 10, 5, 500
    x0 = np.random.default_rng(0).uniform(-3, 3, size=(runs, n, d))
    dyn = CBO(Ackley(), f_dim="3D", x=x0.copy(), noise="isotropic", sigma=0.5, lamda=1.0, dt=0.01, alpha=30.0,
              max_it=steps, verbosity=0, seed=0)
    dyn.optimize(sched=scheduler([multiply(name="alpha", factor=1.05, maximum=1e5)]))
    cbx_rate = float(np.mean(np.max(np.abs(dyn.consensus[:, 0, :]), axis=1) < 0.25))

    def ackley(x):
        return (-20.0 * jnp.exp(-0.2 * jnp.sqrt(jnp.mean(x**2))) - jnp.exp(jnp.mean(jnp.cos(2 * jnp.pi * x)))
                + 20 + jnp.e)

    tx = optim.cbo(noise="isotropic", sigma=0.5, lambda_=1.0, dt=0.01, alpha=30.0, alpha_growth=1.05, alpha_max=1e5)
    keys = jax.random.split(jax.random.key(0), runs)
    c = jax.jit(jax.vmap(lambda k, x: optim.cbo_minimize(ackley, x, k, tx, steps).consensus))(keys, jnp.asarray(x0))
    jax_rate = float(jnp.mean(jnp.max(jnp.abs(c), axis=1) < 0.25))
    assert 0.15 < cbx_rate < 0.85  # the cell is informative
    assert abs(jax_rate - cbx_rate) <= 0.2, (jax_rate, cbx_rate)
