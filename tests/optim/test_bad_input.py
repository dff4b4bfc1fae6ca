"""Bad input to ``optim``, table-driven: every case gets a clear error (message pinned) or a
documented recovery (asserted numerically).

Errors: ``ERRORS`` (construction) and the init/update tables below. Recoveries of the
learning-rate-free transforms are measured against a clean run of the same transform: the
skip rule of ``optim._lrfree`` makes a skipped step the identity, so a run with one bad step
among ``N`` must equal the clean run of ``N - 1`` steps exactly (float32, one compile per
transform). CBO cases follow at the end.
"""

from __future__ import annotations

import functools
import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim

from tests.optim._runs import QUAD_STEPS, ALL, LR, LR_BASE, counters as _counters, injected_run, quadratic_run

TARGET = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
_runner = injected_run


STEPS = 40


def _inject(**at):
    out = np.zeros((STEPS, 4), np.float32)
    for k, v in at.items():
        out[int(k[1:])] = v
    return jnp.asarray(out)


@pytest.mark.parametrize("name", sorted(ALL))
def test_one_bad_gradient_is_skipped_and_the_run_equals_the_clean_one(name):
    """A NaN first gradient (an Inf one through clip_by_global_norm), a finite 1e30 gradient
    (whose square overflows float32 second moments / norms) and NaN later: each is one skipped
    step, counted in num_nonfinite, and the run continues exactly as the clean run."""
    run = _runner(name, STEPS)
    clean, s_clean = run(_inject())
    clip = name.endswith("+clip")
    one = np.array([0, 1, 0, 0], np.float32) if name != "cocob" else np.ones(4, np.float32)  # cocob: per coordinate
    cases = [_inject(k0=np.where(one > 0, np.inf if clip else np.nan, 0).astype(np.float32)),
             _inject(k7=np.where(one > 0, np.nan, 0).astype(np.float32))]
    if not clip:  # clip_by_global_norm zeroes a 1e30 gradient (its float32 norm is inf): a real step
        cases.append(_inject(k3=np.full(4, 1e30, np.float32)))
    for bad in cases:
        traj, s = run(bad)
        np.testing.assert_array_equal(traj[-1], clean[-2], err_msg=name)  # one step behind, bit for bit
        if _counters(s) is not None:
            assert _counters(s) == (STEPS - 1, 1), _counters(s)
    moved = float(np.max(np.abs(np.asarray(clean[-1]))))
    assert moved > 1e-4, f"{name} barely moved ({moved:.3g}): the comparison would be vacuous"


@pytest.mark.parametrize("name", sorted(LR))
def test_schedule_returning_nan_or_negative_skips_that_step_and_moves_on(name):
    """lr(5) = NaN and lr(9) = -1: both steps are skipped (num_nonfinite = 2), the schedule is
    asked about every later step (it is evaluated at the number of update calls), and the run
    equals the clean one two steps behind."""
    base = LR_BASE.get(name, 1.0)

    def schedule(k):
        return jnp.where(k == 5, jnp.nan, jnp.where(k == 9, -1.0, base))

    clean, _ = _runner(name, STEPS)(_inject())
    traj, s = _runner(name, STEPS, learning_rate=schedule)(_inject())
    np.testing.assert_array_equal(traj[-1], clean[-3])
    assert _counters(s) == (STEPS - 2, 2)


def test_cocob_single_huge_entry_is_skipped_per_coordinate_and_recovers():
    clean, _ = _runner("cocob", STEPS)(_inject())
    traj, _ = _runner("cocob", STEPS)(_inject(k2=np.array([1e30, 0, 0, 0], np.float32)))
    dist = lambda t: float(np.max(np.abs(np.asarray(t[-1]) - TARGET)))  # noqa: E731
    assert np.all(np.isfinite(traj)) and dist(traj) <= 1.5 * dist(clean) + 1e-6, (dist(traj), dist(clean))
    np.testing.assert_array_equal(traj[-1, 1:], clean[-1, 1:])  # the other coordinates never saw it


def _dtype_run(name, dtype, steps=QUAD_STEPS):
    """``steps`` updates on 0.5||p - TARGET||^2 from 0 with params and gradients in ``dtype``."""
    traj, state = quadratic_run(name, dtype, steps)(jnp.zeros(4, jnp.float32), jnp.asarray(TARGET), 1.0)
    p = traj[-1]
    return p, state, float(jnp.max(jnp.abs(p.astype(jnp.float32) - TARGET)))


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_params_converge_with_float32_state(name, dtype):
    """float16/bfloat16 parameters: state buffers are float32, so the run gets as close to the
    optimum as the float32 run, up to the resolution of the parameter dtype near 3 (float16:
    0.002, bfloat16: 0.016, times the few ulps an update below half an ulp leaves). Before:
    prodigy jumped to |p| = 1.7e3 in float16, dadapt_sgd/dadapt_adam never moved."""
    p, state, err = _dtype_run(name, dtype)
    *_, err32 = _dtype_run(name, "float32")
    assert p.dtype == jnp.dtype(dtype) and math.isfinite(err)
    tol = 0.15 if dtype == "bfloat16" else 0.02
    assert err <= err32 + tol, f"{name} {dtype}: max error {err:.3g} against {err32:.3g} in float32"
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.shape == (4,):
            base_state = name == "mechanize" and leaf.dtype == p.dtype  # optax.adam's own moments
            assert leaf.dtype in (jnp.float32, jnp.float64) or base_state, f"{name}: state buffer in {leaf.dtype}"


def test_mechanize_float16_params_with_float32_grads_keeps_the_base_state_types():
    """optax.adam's state widens to float32 from float32 grads; the skip branch must agree."""
    tx = optim.mechanize(optax.adam(1.0))
    p = jnp.ones(3, jnp.float16)
    state = tx.init(p)
    u, new = jax.jit(tx.update)(jnp.full(3, 0.5, jnp.float32), state, p)
    assert u.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(u))) and float(jnp.max(jnp.abs(u))) > 0
    assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, state)


@pytest.mark.parametrize("name", sorted(ALL))
def test_empty_pytree_is_a_no_op(name):
    tx = ALL[name]()
    for empty in ({}, ()):
        u, s = tx.update(empty, tx.init(empty), empty)
        assert u == empty
        if _counters(s) is not None:
            assert _counters(s) == (1, 0)


# ------------------------------------------------------------------------------------------ errors

INT_PARAMS = jnp.arange(4, dtype=jnp.int32)


@pytest.mark.parametrize("name", sorted(ALL))
def test_integer_and_complex_params_are_a_type_error(name):
    tx = ALL[name]()
    with pytest.raises(TypeError, match=r"`params` has dtype int32 \(an integer dtype: the update would be "
                                        r"truncated\), but optim\.\w+ supports floating-point parameters of dtype "
                                        r"float16, bfloat16, float32, float64\. Cast them"):
        tx.init(INT_PARAMS)
    with pytest.raises(TypeError, match=r"`params\['w'\]` has dtype complex64 \(complex: "):
        tx.init({"w": jnp.ones(2, jnp.complex64)})
    p = jnp.ones(4, jnp.float32)
    if not name.endswith("+clip"):  # clip_by_global_norm turns int updates into floats first
        with pytest.raises(TypeError, match=r"`updates` has dtype int32"):
            tx.update(INT_PARAMS, tx.init(p), p)


@pytest.mark.parametrize("name", sorted(ALL))
def test_nan_initial_params_are_rejected_at_init(name):
    tx = ALL[name]()
    with pytest.raises(ValueError, match=r"`params\['b'\]` holds NaN or Inf at `optim\.\w+\(\.\.\.\)\.init`"):
        tx.init({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])})


@pytest.mark.parametrize("name", ["dog", "ldog", "dowg", "prodigy"])
def test_nan_initial_params_under_jit_are_counted(name):
    """Under jit init cannot look at the values; the statistics that read the parameters
    (||x - x0||, <g, x0 - x>) make every step a counted skip."""
    tx = ALL[name]()
    p = jnp.array([1.0, jnp.nan, 0.0])

    @jax.jit
    def two(p):
        s = tx.init(p)
        u, s = tx.update(jnp.ones(3), s, p)
        u, s = tx.update(jnp.ones(3), s, p)
        return u, s

    u, s = two(p)
    assert np.all(np.asarray(u) == 0) and _counters(s) == (0, 2)


@pytest.mark.parametrize("name", sorted(LR))
def test_invalid_learning_rates_raise(name):
    with pytest.raises(ValueError, match=r"`learning_rate` must be a finite number > 0, got -0.1"):
        LR[name](learning_rate=-0.1)
    with pytest.raises(ValueError, match=r"`learning_rate` must be a finite number > 0, got nan"):
        LR[name](learning_rate=float("nan"))
    with pytest.raises(ValueError, match=r"`learning_rate\(0\)` must be a finite number >= 0, got -1.0\. "
                                         r".*The schedule is evaluated at every step count"):
        LR[name](learning_rate=optax.constant_schedule(-1.0))
    LR[name](learning_rate=optax.linear_schedule(0.0, 1.0, 10))  # 0 at step 0 is a valid warmup start


# One table for every construction-time check of the learning-rate-free transforms (message pinned).
_MECH = functools.partial(optim.mechanize, optax.sgd(1.0))
_SFW = functools.partial(optim.schedule_free, optax.sgd(0.1))


@pytest.mark.parametrize("factory,kwargs,error,match", [
    (optim.prodigy, {"d0": -1.0}, ValueError, r"`d0` must be a finite number > 0, got -1.0"),
    (optim.prodigy, {"d0": 0.0}, ValueError, r"`d0` must be a finite number > 0, got 0.0"),
    (optim.prodigy, {"d0": "1e-6"}, TypeError, r"`d0` must be a finite number > 0, got '1e-6'"),
    (optim.prodigy, {"eps": jnp.ones(2)}, TypeError, r"`eps` must be a finite number > 0 \(a scalar\), got an array"),
    (optim.prodigy, {"slice_p": 2.0}, TypeError, r"`slice_p` must be a static Python int >= 1, got 2.0"),
    (optim.prodigy, {"slice_p": 0}, ValueError, r"`slice_p` must be a static Python int >= 1"),
    (optim.prodigy, {"growth_rate": float("nan")}, ValueError, r"`growth_rate` must be >= 1, got nan"),
    (optim.prodigy, {"growth_rate": 0.5}, ValueError, r"`growth_rate` must be >= 1, got 0.5"),
    (optim.prodigy, {"betas": (1.0, 0.999)}, ValueError, r"`betas\[0\]` must be in \[0, 1\), got 1.0"),
    (optim.prodigy, {"betas": (0.9, 0.0)}, ValueError, r"`betas\[1\]` must be in the open interval \(0, 1\), got 0.0"),
    (optim.prodigy, {"betas": (0.9,)}, ValueError, r"`betas` must be a pair"),
    (optim.prodigy, {"beta3": 1.5}, ValueError, r"`beta3` must be in the open interval"),
    (optim.prodigy, {"weight_decay": -0.1}, ValueError, r"`weight_decay` must be a finite number >= 0"),
    (optim.prodigy, {"d0": 1e-4, "estim_lr0": 1e-5}, TypeError,
     r"`estim_lr0` must be left out when `d0` is given \(got d0=0.0001\), got 1e-05\. `estim_lr0` is optax"),
    (optim.dadapt_adam, {"betas": (0.9, float("nan"))}, ValueError, r"`betas\[1\]` must be in the open interval"),
    (optim.dadapt_adam, {"betas": (-0.1, 0.9)}, ValueError, r"`betas\[0\]` must be in \[0, 1\), got -0.1"),
    (optim.dadapt_adam, {"eps": 0.0}, ValueError, r"`eps` must be a finite number > 0"),
    (optim.dadapt_adam, {"growth_rate": 0.9}, ValueError, r"`growth_rate` must be >= 1, got 0.9"),
    (optim.dadapt_adam, {"d0": 0.0}, ValueError,
     r"`d0` must be a finite number > 0, got 0.0. It is the initial distance"),
    (optim.dadapt_adamw, {"estim_lr0": -1.0}, ValueError, r"`d0` must be a finite number > 0, got -1.0"),
    (optim.dadapt_lion, {"betas": (0.9, 1.5)}, ValueError, r"`betas\[1\]` must be in the open interval"),
    (optim.dadapt_lion, {"weight_decay": -1.0}, ValueError, r"`weight_decay` must be a finite number >= 0"),
    (optim.dadapt_sgd, {"momentum": True}, TypeError, r"`momentum` must be in \[0, 1\), got True"),
    (optim.dadapt_sgd, {"momentum": 1.0}, ValueError, r"`momentum` must be in \[0, 1\), got 1.0"),
    (optim.dadapt_sgd, {"d0": -1.0}, ValueError, r"`d0` must be a finite number > 0, got -1.0"),
    (optim.dadapt_adagrad, {"momentum": -0.5}, ValueError, r"`momentum` must be in \[0, 1\), got -0.5"),
    (optim.dog, {"reps_rel": 0.0}, ValueError, r"`reps_rel` must be a finite number > 0, got 0.0"),
    (optim.dog, {"init_step": ("guess", 1.0)}, TypeError, r"`init_step` must be None or a pair \(kind, value\)"),
    (optim.dog, {"init_step": ("heuristic", 1e-4), "reps_rel": 1e-3}, TypeError,
     r"`init_step` must be left out when `reps_rel` is given"),
    (optim.dog, {"mask": {"a": 1}}, TypeError, r"`mask` must be None, a pytree of Python bools"),
    (optim.ldog, {"init_eta": -1.0}, ValueError, r"`init_eta` must be a finite number > 0, got -1.0"),
    (optim.dowg, {"init_estim_sq_dist": 0.0}, ValueError, r"`init_estim_sq_dist` must be a finite number > 0"),
    (optim.dowg, {"weight_decay": -0.1}, ValueError, r"`weight_decay` must be a finite number >= 0"),
    (optim.polynomial_decay_averaging, {"gamma": -1.0}, ValueError, r"`gamma` must be a finite number >= 0"),
    (optim.cocob, {"alpha": -1.0}, ValueError, r"`alpha` must be a finite number > 0, got -1.0"),
    (optim.cocob, {"eps": -1.0}, ValueError, r"`eps` must be a finite number > 0"),
    (optim.cocob, {"weight_decay": -1.0}, ValueError, r"`weight_decay` must be a finite number >= 0"),
    (optim.schedule_free_sgd, {"warmup_steps": 2.5}, TypeError, r"`warmup_steps` must be an int >= 0, got 2.5"),
    (optim.schedule_free_sgd, {"b1": 0.0}, ValueError, r"`b1` must be in the open interval \(0, 1\), got 0.0"),
    (optim.schedule_free_sgd, {"r": -0.5}, ValueError, r"`r` must be a finite number >= 0"),
    (optim.schedule_free_adamw, {"state_dtype": jnp.int32}, TypeError, r"`state_dtype` must be None or one of"),
    (optim.schedule_free_adamw, {"b2": 1.5}, ValueError, r"`b2` must be in the open interval \(0, 1\), got 1.5"),
    (optim.schedule_free_adamw, {"warmup_steps": -1}, ValueError, r"`warmup_steps` must be an int >= 0, got -1"),
    (optim.schedule_free_adamw, {"weight_decay": -1.0}, ValueError, r"`weight_decay` must be a finite number >= 0"),
    (optim.schedule_free_radam, {"b2": -0.1}, ValueError, r"`b2` must be in the open interval \(0, 1\)"),
    (_SFW, {"b1": 1.0}, ValueError, r"`b1` must be in the open"),
    (optim.schedule_free, {"base_optimizer": "adam"}, TypeError,
     r"`base_optimizer` must be an optax.GradientTransformation"),
    (_MECH, {"betas": (0.9, 0.0)}, ValueError, r"`betas\[1\]` must be in \(0, 1\], got 0.0"),
    (_MECH, {"betas": ()}, ValueError, r"`betas` must be a non-empty tuple"),
    (_MECH, {"s_init": 0.0}, ValueError, r"`s_init` must be a finite number > 0, got 0.0"),
    (_MECH, {"eps": -1.0}, ValueError, r"`eps` must be a finite number > 0"),
    (_MECH, {"num_betas": 0}, ValueError, r"`num_betas` must be a static Python int >= 1, got 0"),
    (optim.mechanize, {"base_optimizer": 1.0}, TypeError, r"`base_optimizer` must be an optax.GradientTransformation"),
])
def test_invalid_hyperparameters_raise(factory, kwargs, error, match):
    with pytest.raises(error, match=match):
        factory(**kwargs)


@pytest.mark.parametrize("factory,name,bad", [
    (optim.prodigy, "d0", -1.0), (optim.dadapt_adam, "d0", -1.0), (optim.dog, "reps_rel", -1.0),
    (optim.prodigy, "learning_rate", -1.0), (optim.cocob, "alpha", 0.0),
])
def test_injected_hyperparameter_checked_when_concrete_and_skipped_when_traced(factory, name, bad):
    tx = optax.inject_hyperparams(factory)()
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    state.hyperparams[name] = jnp.asarray(bad, state.hyperparams[name].dtype)
    with pytest.raises(ValueError, match=rf"`{name}` must be a finite number > 0, got {bad}"):
        tx.update(p, state, p)
    u, s = jax.jit(tx.update)(p, state, p)  # traced: the step is a counted skip (no raise possible)
    if factory is optim.cocob:  # per coordinate, no counter: the update is zero
        assert np.all(np.asarray(u) == 0)
    else:
        assert np.all(np.asarray(u) == 0) and _counters(s.inner_state) == (0, 1)


# ------------------------------------------------------------------------------------------ CBO


def sphere(x):
    return jnp.sum(x**2)


X = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, size=(40, 3)), jnp.float32)


@pytest.mark.parametrize("call,error,match", [
    (lambda: optim.cbo(dt=10.0), ValueError,
     r"`dt` must be < 2 / lambda_ = 2 with scheme='euler_maruyama' .* got 10.0\. Use a smaller `dt`"),
    (lambda: optim.cbo(alpha=float("nan")), ValueError, r"`alpha` must be a number > 0 \(math.inf gives the argmin\)"),
    (lambda: optim.cbo(alpha=-1.0), ValueError,
     r"`alpha` must be a number > 0 \(math.inf gives the argmin\), got -1.0"),
    (lambda: optim.cbo(sigma=float("inf")), ValueError, r"`sigma` must be a finite number >= 0, got inf"),
    (lambda: optim.cbo(alpha_schedule=lambda k: jnp.nan), ValueError, r"`alpha_schedule\(0\)` must be a number > 0"),
    (lambda: optim.cbo(alpha_schedule=lambda k: -1.0 + 0 * k), ValueError, r"`alpha_schedule\(0\)`"),
    (lambda: optim.cbo(alpha_schedule=3.0), ValueError, r"`alpha_schedule` must be 'multiply', 'ess' or a callable"),
    (lambda: optim.cbo(batch_size=2.0), TypeError, r"`batch_size` must be a static Python int >= 1, got 2.0"),
    (lambda: optim.cbo(key=1.5), TypeError, r"`key` must be an int seed or a PRNG key, got 1.5"),
    (lambda: optim.cbo(sigma="1"), TypeError, r"`sigma` must be a finite number >= 0, got '1'"),
    (lambda: optim.polar_cbo(kappa=-1.0), ValueError, r"`kappa` must be a number > 0"),
    (lambda: optim.polar_cbo(nosie="isotropic"), TypeError, r"`options` must be keyword options of optim.cbo"),
    (lambda: optim.consensus_point(X, jax.vmap(sphere)(X), -1.0), ValueError,
     r"`alpha` must be a number > 0 \(math.inf gives the argmin\), got -1.0"),
    (lambda: optim.consensus_point(X, jax.vmap(sphere)(X), float("nan")), ValueError, r"`alpha` must be a number > 0"),
    (lambda: optim.consensus_point(X, jnp.ones(3), 1.0), ValueError, r"`value` must be of shape \(40,\)"),
    (lambda: optim.cbo().init(X.astype(jnp.int32)), TypeError, r"`params` has dtype int32"),
    (lambda: optim.cbo_minimize(sphere, X, jax.random.key(0), optim.cbo(), 10, max_evaluations=10), ValueError,
     r"`max_evaluations` must be >= 40, the evaluations of one step \(40 particles\), got 10"),
    (lambda: optim.cbo_minimize(sphere, X, jax.random.key(0), optim.cbo(correction="heaviside"), 10,
                                max_evaluations=40), ValueError,
     r"`max_evaluations` must be >= 41, the evaluations of one step \(40 particles \+ 1 by the correction\)"),
    (lambda: optim.cbo_minimize(sphere, X, jax.random.key(0), optim.cbo(), 10, energy_tol=float("nan")), ValueError,
     r"`energy_tol` must be a finite real number, got nan"),
    (lambda: optim.cbo_minimize(sphere, X, jax.random.key(0), optim.cbo(), 10, diff_tol=-1.0), ValueError,
     r"`diff_tol` must be a finite number > 0"),
    (lambda: optim.cbo_minimize(lambda x: jnp.sum(x**2, axis=1), X, jax.random.key(0), optim.cbo(), 10), ValueError,
     r"`f` failed on one particle: .*axis 1 is out of bounds.*`f` must map ONE particle .* shape \(3,\).* "
     r"`lambda x: f_batched\(x\[None\]\)\[0\]`"),
    (lambda: optim.cbo_minimize(lambda x: x > 0, X, jax.random.key(0), optim.cbo(), 10), ValueError,
     r"`f` must map one particle to a scalar loss; it returned shape \(3,\)"),
    (lambda: optim.cbo_minimize(lambda x: jnp.sum(x > 0), X, jax.random.key(0), optim.cbo(), 10), TypeError,
     r"`f` returned dtype int"),
    (lambda: optim.cbo_minimize(sphere, X, jax.random.split(jax.random.key(0), 2), optim.cbo(), 10), ValueError,
     r"`key` must be one PRNG key"),
])
def test_cbo_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cbo_negative_energy_tol_is_allowed_and_stops_the_run():
    res = optim.cbo_minimize(lambda x: sphere(x) - 10.0, X, jax.random.key(0), optim.cbo(sigma=0.5), 500,
                             energy_tol=-9.9)
    assert float(res.best_value) < -9.9 and 1 < int(res.num_steps) < 500


def test_cbo_max_evaluations_is_never_exceeded_and_partial_steps_are_not_taken():
    for tx, per_step in ((optim.cbo(), 40), (optim.cbo(batch_size=8, correction="heaviside"), 80)):
        res = optim.cbo_minimize(sphere, X, jax.random.key(0), tx, 50, max_evaluations=199)
        steps = 199 // per_step
        assert int(res.num_steps) == steps and int(res.num_evaluations) == steps * per_step <= 199


def _steps(tx, x, steps=5):
    """``steps`` jitted updates of ``tx`` on the sphere; returns (x, state)."""

    @jax.jit
    def run(x):
        def body(carry, _):
            x, s = carry
            step, s = tx.update(None, s, x, value=jax.vmap(sphere)(x))
            return (x + step, s), None

        return jax.lax.scan(body, (x, tx.init(x)), None, length=steps)[0]

    return run(x)


def test_cbo_inject_hyperparams_runs_like_the_plain_transform():
    injected = optax.inject_hyperparams(optim.cbo)(sigma=1.0)
    plain = optim.cbo(sigma=1.0)
    x1, s1 = _steps(injected, X)
    x2, s2 = _steps(plain, X)
    assert float(jnp.max(jnp.abs(x2 - X))) > 1e-2  # the runs move
    np.testing.assert_allclose(x1, x2, rtol=1e-5, atol=1e-6)  # float32 hyperparameters against Python floats
    np.testing.assert_allclose(s1.inner_state.consensus, s2.consensus, rtol=1e-5, atol=1e-6)
    res = optim.cbo_minimize(sphere, X, jax.random.key(3), injected, 5)  # the driver finds the inner state
    np.testing.assert_array_equal(res.state.inner_state.count, 5)
    value = jax.vmap(sphere)(X)
    state = injected.init(X)
    state.hyperparams["sigma"] = jnp.asarray(-1.0, jnp.float32)
    with pytest.raises(ValueError, match=r"`sigma` must be a finite number >= 0, got -1.0"):
        injected.update(None, state, X, value=value)


@pytest.mark.parametrize("make", [lambda: optim.cbo(memory=True), lambda: optim.cbs(),
                                  lambda: optim.cbo(key=jax.random.key(5, impl="rbg"))])
def test_cbo_state_round_trips_through_flax_serialization(make):
    tx = make()
    update = jax.jit(lambda x, s: tx.update(None, s, x, value=jax.vmap(sphere)(x)))
    x, state = X, tx.init(X)
    for _ in range(3):
        step, state = update(x, state)
        x = x + step
    restored = flax.serialization.from_bytes(tx.init(X), flax.serialization.to_bytes(state))
    a, b = update(x, state), update(x, restored)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)


def test_identical_transform_does_not_recompile_cbo_minimize():
    traces = []  # the objective is traced when (and only when) the loop compiles

    def f(x):
        traces.append(1)
        return sphere(x)

    optim.cbo_minimize(f, X, jax.random.key(0), optim.cbo(sigma=0.7), 20)
    before = len(traces)
    again = optim.cbo(sigma=0.7)
    assert again == optim.cbo(sigma=0.7) and hash(again) == hash(optim.cbo(sigma=0.7))
    optim.cbo_minimize(f, X, jax.random.key(1), again, 20)
    assert before > 0 and len(traces) == before
    optim.cbo_minimize(f, X, jax.random.key(1), optim.cbo(sigma=0.8), 20)  # a different config compiles
    assert len(traces) > before


@pytest.mark.parametrize("alpha,alpha_max", [(1e39, 1e40), (30.0, 1e39)])
def test_alpha_beyond_float32_is_the_argmin_limit_not_nan(alpha, alpha_max):
    tx = optim.cbo(sigma=0.0, alpha=alpha, alpha_growth=1e10, alpha_max=alpha_max)
    value = jax.vmap(sphere)(X)
    before, _ = _steps(tx, X, 5)  # growth reaches the cap after a few steps
    x, state = _steps(tx, X, 6)
    assert float(state.alpha) == float(np.finfo(np.float32).max)
    # at the largest float32 alpha every other weight underflows: the consensus is the argmin particle
    np.testing.assert_array_equal(state.consensus, before[jnp.argmin(jax.vmap(sphere)(before))])
    assert bool(jnp.all(jnp.isfinite(x)))
    c = optim.consensus_point(X, value, math.inf)
    np.testing.assert_array_equal(c, X[jnp.argmin(value)])
    assert bool(jnp.all(jnp.isfinite(optim.consensus_point(X, value, 1e39))))


@pytest.mark.parametrize("make", [optim.cbo, optim.cbs, lambda: optim.polar_cbo(kappa=1.0),
                                  lambda: optim.cbo(batch_size=8)])
def test_all_losses_nonfinite_and_one_nan_position_keep_the_others_finite(make):
    tx = make()
    x = X.at[3].set(jnp.nan)
    value = jnp.full(40, jnp.inf).at[7].set(jnp.nan)
    step, state = jax.jit(lambda x, v: tx.update(None, tx.init(x), x, value=v))(x, value)
    new = x + step
    finite = np.asarray(jnp.all(jnp.isfinite(new), axis=1))
    assert finite.sum() == 39 and not finite[3]
    keep = np.arange(40) != 3
    np.testing.assert_allclose(state.consensus, np.asarray(X)[keep].mean(0), rtol=1e-5)  # uniform, finite only


def test_cbo_minimize_restarts_nonfinite_particles_and_min_value_ignores_nan():
    def f(x):  # NaN on a slab, finite elsewhere
        return jnp.where(x[0] > 1.5, jnp.nan, sphere(x))

    x0 = X.at[0].set(jnp.nan)
    res = optim.cbo_minimize(f, x0, jax.random.key(0), optim.cbo(sigma=0.5), 50)
    assert bool(jnp.all(jnp.isfinite(res.particles))) and bool(jnp.all(jnp.isfinite(res.consensus)))
    v0 = np.asarray(jax.vmap(f)(x0))
    assert np.isnan(v0).sum() > 1 and float(res.history.min_value[0]) == np.nanmin(v0)
    assert np.all(np.isfinite(np.asarray(res.history.min_value)))
    assert float(res.best_value) == float(np.min(res.history.min_value)) < np.nanmin(v0)


def test_alpha_schedule_nan_later_keeps_the_previous_alpha():
    tx = optim.cbo(alpha_schedule=lambda k: jnp.where(k == 2, jnp.nan, 10.0 + k))
    res = optim.cbo_minimize(sphere, X, jax.random.key(0), tx, 4)
    assert res.history.alpha.tolist() == [10.0, 11.0, 11.0, 13.0] and bool(jnp.all(jnp.isfinite(res.particles)))


def test_exact_drift_with_large_dt_stays_finite():
    res = optim.cbo_minimize(sphere, X, jax.random.key(0), optim.cbo(dt=10.0, sigma=0.1, scheme="exact_drift"), 30)
    assert bool(jnp.all(jnp.isfinite(res.particles))) and float(res.best_value) < float(jnp.min(jax.vmap(sphere)(X)))
