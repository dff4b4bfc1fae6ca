"""The optimizer workload library (``benchmarks.workloads``) and the calibration's scoring.

The training driver is checked against the closed form of gradient descent on the quadratic
workload (its Hessian taken from the loss itself), two learning rates in one vmapped program; the
scoring (steps to target, run costs, failure labels, leave-one-out choice) against hand-computed
values; the calibrated presets against the committed calibration table.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from benchmarks import optim_calibration as C
from benchmarks import workloads as W

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "optim_calibration.json")


def test_steps_to_target_first_evaluation_at_or_below():
    val = np.array([[3.0, 2.0, 1.0, 0.5], [3.0, np.nan, 0.9, 2.0], [3.0, 2.5, 2.0, 1.5]])
    np.testing.assert_array_equal(W.steps_to_target(val, 1.0, 10), [30.0, 30.0, np.inf])


def test_train_matches_gradient_descent_closed_form():
    w = W.make("quadratic")
    steps, every, lrs = 40, 10, (2.0, 8.0)  # the Hessian (loss / f(0)) has eigenvalues in [1.9e-5, 0.19]
    w = w._replace(steps=steps, eval_every=every)
    keys = jax.random.split(jax.random.key(3), 2)
    out = W.train(w, lambda learning_rate: optax.sgd(learning_rate), {"learning_rate": jnp.asarray(lrs)}, keys)
    x = {"x": jnp.zeros(100, jnp.float32)}
    hess = np.asarray(jax.hessian(lambda v: w.loss({"x": v}, None))(x["x"]), np.float64)
    grad0 = np.asarray(jax.grad(lambda v: w.loss({"x": v}, None))(x["x"]), np.float64)
    xstar = np.linalg.solve(hess, -grad0)  # f = 0.5 (x - x*)^T H (x - x*): grad(0) = -H x*
    for r, (lr, key) in enumerate(zip(lrs, keys)):
        e = np.asarray(w.init(jax.random.split(key)[0])["x"], np.float64) - xstar
        step = np.eye(100) - lr * hess
        expect = []
        for _ in range(steps // every):
            e = np.linalg.matrix_power(step, every) @ e
            expect.append(np.log10(0.5 * e @ hess @ e))
        np.testing.assert_allclose(out["val"][r], expect, atol=2e-3)
        assert out["val"][r, -1] < out["val0"][r] - 0.05  # it moved: the comparison is not vacuous
    assert out["val"][1, -1] < out["val"][0, -1]  # the larger stable step is further along


@pytest.mark.parametrize("name", sorted(W.WORKLOADS))
def test_every_workload_traces_in_float32_under_x64(name):
    # the suite runs with float64 on: data and parameters must stay float32 (a float64 digit batch made
    # the convolution reject mixed dtypes); traced only (eval_shape), the U-Net costs minutes eagerly
    w = W.make(name)
    p = jax.eval_shape(w.init, jax.random.key(0))
    loss = jax.eval_shape(lambda p: w.loss(p, w.batch(jax.random.key(1), jnp.asarray(0))), p)
    val = jax.eval_shape(w.evaluate, p)
    assert loss.shape == val.shape == () and loss.dtype == val.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p))
    assert w.steps % w.eval_every == 0


@pytest.mark.parametrize("name", ["quadratic", "digits_logreg"])
def test_small_workloads_start_above_their_target(name):
    w = W.make(name)
    p = w.init(jax.random.key(0))
    val0 = float(jax.jit(w.evaluate)(p))
    assert np.isfinite(val0) and val0 > w.target + 0.5, (name, val0, w.target)


def test_bad_input():
    with pytest.raises(ValueError, match="Unknown workload `mnist`"):
        W.make("mnist")
    with pytest.raises(ValueError, match="`scale` must be 'cpu' or 'gpu', got 'tpu'"):
        W.make("quadratic", scale="tpu")
    w = W.make("quadratic")
    with pytest.raises(ValueError, match="`steps`=15 must be a multiple of the workload's eval_every=10"):
        W.train(w, lambda: optax.sgd(0.1), {}, jax.random.split(jax.random.key(0), 1), steps=15)


def test_run_costs_and_failure_labels():
    # target 1, start 5, budget 40 (4 evaluations of 10 steps)
    val = np.array([[4.0, 2.0, 0.8, 0.5],  # reaches at step 30: cost 0.75
                    [4.0, 3.0, 3.0, 3.0],  # best 3: gap (3 - 1) / (5 - 1) = 0.5, plateau
                    [4.0, 3.5, 3.0, 2.0],  # best 2: gap 0.25, still improving: slow
                    [4.8, 4.7, 4.9, 4.7],  # closed < 10 %: stalled
                    [4.0, np.nan, 3.0, 2.0],  # non-finite: cost 2, diverged
                    [4.0, 3.0, 5.0, 6.0]])  # ends above its start: diverged
    val0 = np.full(6, 5.0)
    np.testing.assert_allclose(C.run_costs(val, val0, 1.0, 10, 40), [0.75, 1.5, 1.25, 1.0 + 3.7 / 4, 2.0, 1.5])
    labels = [C.failure(v, 5.0, 1.0) for v in val]
    assert labels == ["ok", "plateau", "slow", "stalled", "diverged", "diverged"]


def test_choose_is_across_workloads_not_per_workload():
    costs = {"a": np.array([0.2, 0.5, 2.0]), "b": np.array([2.0, 0.6, 0.1]), "c": np.array([0.3, 0.4, 0.3])}
    assert C.choose(costs, ["a", "b", "c"]) == 1  # means 0.83, 0.5, 0.8: no per-workload winner
    assert C.choose(costs, ["a", "c"]) == 0
    assert C.choose(costs, ["b"]) == 2


def test_calibration_grids_start_at_the_factory_defaults():
    # grid[0] is what the table calls "default": it must be the factory's own behaviour
    for name, m in C.methods().items():
        kw = m.kwargs(m.grid[0])
        params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
        grads = {"w": jnp.cos(jnp.arange(6.0)).reshape(2, 3)}
        ref = optim.mechanize(optax.adam(1.0)) if name == "mechanize" else getattr(optim, name)()
        tx = m.make(**m.grid[0])
        u1, _ = tx.update(grads, tx.init(params), params)
        u2, _ = ref.update(grads, ref.init(params), params)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6, atol=0, err_msg=f"{name} {kw}")


def test_calibrated_presets_are_the_table_choice():
    with open(RESULTS) as f:
        record = json.load(f)
    cal = C.calibrate(record)
    ms = C.methods()
    for name, c in cal.items():
        expect = ms[name].kwargs({k: float(v) for k, v in c["setting"].items()})
        assert optim.PRESETS[name]["calibrated"] == expect, name
        assert c["score"] <= c["default_score"]
    params = {"w": jnp.ones((3,))}
    for name, preset in optim.PRESETS.items():
        if "calibrated" not in preset:
            continue
        tx = optim.mechanize(optax.adam(1.0), **preset["calibrated"]) if name == "mechanize" else \
            getattr(optim, name)(**preset["calibrated"])
        state = tx.init(params)
        for _ in range(8):  # RAdam's first steps are silent (zero) until its variance is rectifiable
            u, state = tx.update({"w": jnp.full((3,), 0.5)}, state, params)
        assert np.all(np.isfinite(u["w"])) and np.any(u["w"] != 0), name
