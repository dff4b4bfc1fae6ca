"""DoG, LDoG, DoWG and polynomial-decay averaging: parity with dog-optimizer and the DoWG paper."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from tests.optim import _problems as pp

STEPS = 200
TOL = 1e-6

DOG_OPTIONS = {
    "defaults": {},
    "nondefault": {"reps_rel": 1e-4, "weight_decay": 1e-3, "eps": 1e-6, "learning_rate": 0.8},
    "init_eta": {"init_eta": 1e-3},
}


def _torch_kwargs(kw):
    kw = dict(kw)
    if "learning_rate" in kw:
        kw["lr"] = kw.pop("learning_rate")
    return kw


@pytest.mark.reference("torch", "dog")
@pytest.mark.parametrize("option", sorted(DOG_OPTIONS))
@pytest.mark.parametrize("problem", sorted(pp.PROBLEMS))
@pytest.mark.parametrize("name", ["dog", "ldog"])
def test_dog_ldog_match_dog_optimizer(name, problem, option):
    import dog as dog_ref

    prob = pp.PROBLEMS[problem]()
    kw = DOG_OPTIONS[option]
    ref_cls = {"dog": dog_ref.DoG, "ldog": dog_ref.LDoG}[name]
    ref = pp.run_torch(prob, lambda ps: ref_cls(ps, **_torch_kwargs(kw)), STEPS)
    pp.assert_reference_valid(prob, ref)
    ours = pp.run_jax(prob, getattr(optim, name)(**kw), STEPS)
    diff = pp.rel_diffs(ours, ref)
    assert diff.max() <= TOL, f"max rel diff {diff.max():.3g} at step {diff.argmax()}"


def _dowg_numpy(prob, steps, reps_rel=1e-6, learning_rate=1.0, weight_decay=0.0, eps=1e-8,
                init_estim_sq_dist=None):
    """Algorithm 1 of Khaled, Mishchenko, Jin (2023) in float64 numpy, on the flattened parameters."""
    keys = sorted(prob.params0)
    sizes = [np.size(prob.params0[k]) for k in keys]
    shapes = [np.shape(prob.params0[k]) for k in keys]
    grad_fn = jax.jit(jax.grad(prob.loss_jax))

    def unflat(v):
        parts = np.split(v, np.cumsum(sizes)[:-1])
        return {k: p.reshape(s) for k, p, s in zip(keys, parts, shapes)}

    x0 = np.concatenate([np.ravel(prob.params0[k]) for k in keys])
    x = x0.copy()
    rbar = reps_rel * (1 + np.linalg.norm(x0)) if init_estim_sq_dist is None else np.sqrt(init_estim_sq_dist)
    v = 0.0
    out = []
    for _ in range(steps):
        g = grad_fn({k: jnp.asarray(a) for k, a in unflat(x).items()})
        g = np.concatenate([np.ravel(np.asarray(g[k])) for k in keys]) + weight_decay * x
        rbar = max(rbar, np.linalg.norm(x - x0))
        v = v + rbar**2 * (g @ g)
        x = x - learning_rate * rbar**2 / (np.sqrt(v) + eps) * g
        out.append(unflat(x))
    return out


DOWG_OPTIONS = {
    "defaults": {},
    "optax_preset_decay": {**optim.DOWG_PRESETS["optax"], "weight_decay": 1e-3, "learning_rate": 0.5},
}


@pytest.mark.parametrize("option", sorted(DOWG_OPTIONS))
@pytest.mark.parametrize("problem", sorted(pp.PROBLEMS))
def test_dowg_matches_numpy_transcription_of_paper(problem, option):
    prob = pp.PROBLEMS[problem]()
    kw = DOWG_OPTIONS[option]
    ref = _dowg_numpy(prob, STEPS, **kw)
    pp.assert_reference_valid(prob, ref)
    diff = pp.rel_diffs(pp.run_jax(prob, optim.dowg(**kw), STEPS), ref)
    assert diff.max() <= TOL, f"max rel diff {diff.max():.3g} at step {diff.argmax()}"


def test_dowg_optax_preset_reproduces_optax_contrib():
    prob = pp.logistic_regression()
    ours = pp.run_jax(prob, optim.dowg(**optim.DOWG_PRESETS["optax"]), STEPS)
    theirs = pp.run_jax(prob, optax.contrib.dowg(), STEPS)
    assert pp.rel_diffs(ours, theirs).max() <= 1e-12


@pytest.mark.reference("torch", "dog")
@pytest.mark.parametrize("gamma", [8.0, 2.5])
def test_polynomial_decay_averaging_matches_dog_averager(gamma):
    from dog import LDoG, PolynomialDecayAverager

    prob = pp.mlp()
    holder = {}

    def record(opt, module):
        if "avg" not in holder:  # its first step (t=1) overwrites the copy, so building it late is exact
            holder["avg"] = PolynomialDecayAverager(module, gamma=gamma)
        holder["avg"].step()
        return {k: v.detach().numpy().copy() for k, v in holder["avg"].averaged_model.state_dict().items()}

    ref = pp.run_torch(prob, lambda ps: LDoG(ps), STEPS, record=record)
    tx = optax.chain(optim.ldog(), optim.polynomial_decay_averaging(gamma))
    ours = pp.run_jax(prob, tx, STEPS, record=lambda s, p: optim.averaged_params(s))
    diff = pp.rel_diffs(ours, ref)
    assert diff.max() <= TOL, f"max rel diff {diff.max():.3g} at step {diff.argmax()}"


def test_first_step_by_hand():
    x0 = jnp.array([3.0, 4.0])  # ||x0|| = 5
    g = jnp.array([1.0, 2.0])  # ||g||^2 = 5
    updates, state = optim.dog().update(g, optim.dog().init(x0), x0)
    eta = 1e-6 * (1 + 5) / np.sqrt(5 + 1e-8)
    np.testing.assert_allclose(updates, -eta * np.array([1.0, 2.0]), rtol=1e-14)
    assert float(state.rbar) == pytest.approx(6e-6, rel=1e-14) and float(state.grad_sum) == 5 + 1e-8
    # LDoG: one scalar per leaf; the shape-() leaf keeps its shape
    params = {"a": x0, "s": jnp.asarray(2.0)}
    up, st = optim.ldog().update({"a": g, "s": jnp.asarray(0.5)}, optim.ldog().init(params), params)
    assert up["s"].shape == () and st.rbar["s"].shape == ()
    assert float(up["s"]) == pytest.approx(-1e-6 * 3 / np.sqrt(0.25 + 1e-8) * 0.5, rel=1e-14)
    # DoWG: eta = rbar^2 / (sqrt(rbar^2 ||g||^2) + eps) = rbar / ||g|| up to eps
    tx = optim.dowg(init_estim_sq_dist=0.01, eps=0.0)
    up, st = tx.update(g, tx.init(x0), x0)
    np.testing.assert_allclose(up, -0.1 / np.sqrt(5) * np.array([1.0, 2.0]), rtol=1e-14)


def test_scalar_accumulators_are_wide_whatever_the_param_dtype():
    params = {"w": jnp.ones((4,), jnp.bfloat16), "b": jnp.ones((), jnp.float32)}
    for tx in (optim.dog(), optim.ldog(), optim.dowg()):
        state = tx.init(params)
        updates, state = tx.update(params, state, params)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves((state.rbar, state.grad_sum)))
        assert updates["w"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32


@pytest.mark.parametrize("name", ["dog", "dowg"])
def test_nonfinite_gradient_skips_the_step_and_is_counted(name):
    tx = getattr(optim, name)()
    tx = optax.GradientTransformation(tx.init, jax.jit(tx.update))
    prob = pp.mlp()
    grad = jax.jit(jax.grad(prob.loss_jax))
    params = {k: jnp.asarray(v) for k, v in prob.params0.items()}

    def run(poison_at):
        p, s = params, tx.init(params)
        for i in range(6):
            g = grad(p)
            if i == poison_at:
                g = {**g, "w1": g["w1"].at[0, 0].set(jnp.nan)}
                u, s_new = tx.update(g, s, p)
                assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
                assert int(s_new.num_nonfinite) == int(s.num_nonfinite) + 1
                for a, b in zip(jax.tree.leaves(s_new._replace(num_nonfinite=0)),
                                jax.tree.leaves(s._replace(num_nonfinite=0))):
                    np.testing.assert_array_equal(a, b)  # rbar, G, count untouched
                s = s_new
                continue
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p, s

    clean_p, clean_s = run(poison_at=None)
    # a skipped step is exactly a step that never happened: 5 clean steps == 6 with one poisoned
    p5, s5 = params, tx.init(params)
    for _ in range(5):
        u, s5 = tx.update(grad(p5), s5, p5)
        p5 = optax.apply_updates(p5, u)
    poisoned_p, poisoned_s = run(poison_at=2)
    for a, b in zip(jax.tree.leaves(poisoned_p), jax.tree.leaves(p5)):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(jax.tree.leaves(poisoned_s.rbar))) and int(poisoned_s.num_nonfinite) == 1
    assert int(clean_s.count) == 6 and int(poisoned_s.count) == 5


def test_ldog_skips_only_the_tensor_with_a_nonfinite_gradient():
    tx = optim.ldog()
    update = jax.jit(tx.update)
    prob = pp.mlp()
    grad = jax.jit(jax.grad(prob.loss_jax))
    p = {k: jnp.asarray(v) for k, v in prob.params0.items()}
    s = tx.init(p)
    for _ in range(2):
        u, s = update(grad(p), s, p)
        p = optax.apply_updates(p, u)
    g = grad(p)
    clean_u, clean_s = update(g, s, p)
    for bad in (jnp.nan, jnp.inf):
        u, s_new = update({**g, "w1": g["w1"].at[0, 0].set(bad)}, s, p)
        np.testing.assert_array_equal(u["w1"], 0)
        assert float(s_new.rbar["w1"]) == float(s.rbar["w1"]) and float(s_new.grad_sum["w1"]) == float(s.grad_sum["w1"])
        for k in set(g) - {"w1"}:  # the other tensors take exactly the clean step
            np.testing.assert_array_equal(u[k], clean_u[k])
            assert float(s_new.grad_sum[k]) == float(clean_s.grad_sum[k]) != float(s.grad_sum[k])
        assert int(s_new.num_nonfinite) == 1 and int(s_new.count) == int(s.count) == 2
