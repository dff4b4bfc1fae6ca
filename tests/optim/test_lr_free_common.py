"""One table for every learning-rate-free transform: optimum, compilation, dtypes,
checkpoints, composition, the API contract (structure checks, extra arguments, optax tree
utilities) and sharding.

Each ``Entry`` builds its transform with ``make(axis_name=None)``. To add a transform,
append an ``Entry`` to ``TRANSFORMS`` (schedule-free/averaging methods pass
``eval_params`` so convergence is judged at the point they are meant to be evaluated).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import optim
from optim import _tree


class Entry(NamedTuple):
    name: str
    make: Callable[..., optax.GradientTransformation]  # make(axis_name=None, **shard_kwargs)
    factory: Callable[..., optax.GradientTransformation]  # for optax.inject_hyperparams(factory)
    hparams: dict  # factory(**hparams) must build the same transform as make(); numeric ones get injected
    # a missing axis_name visibly changes the 10-step sharded run (False for per-coordinate
    # methods, and for D-Adapted Lion, whose d does not leave d0 within 10 steps)
    diverges_without_axis_name: bool = True
    eval_params: Callable[[Any, Any], Any] | None = None  # (state, params) -> point to evaluate
    solves: tuple[str, ...] = ("parabola", "rosenbrock")  # targets it must reach (see the notes below)
    shard_kwargs: dict = {}  # for the 10-step sharding test: a larger initial d so the run moves


TRANSFORMS: list[Entry] = [
    Entry("prodigy", lambda axis_name=None, **kw: optim.prodigy(axis_name=axis_name, **kw), optim.prodigy,
          {"weight_decay": 0.0, "d0": 1e-6}),
    Entry("dadapt_adam", lambda axis_name=None, **kw: optim.dadapt_adam(axis_name=axis_name, **kw),
          optim.dadapt_adam, {"weight_decay": 0.0}),
    # D-Adapted SGD has no curvature safeguard: on Rosenbrock d grows past 2/L and it blows up
    # (to 1e35 in 30k steps, with or without momentum, as the dual-averaging reference would)
    Entry("dadapt_sgd", lambda axis_name=None, **kw: optim.dadapt_sgd(momentum=0.9, axis_name=axis_name, **kw),
          optim.dadapt_sgd, {"momentum": 0.9}, solves=("parabola",), shard_kwargs={"d0": 1e-2}),
    Entry("dadapt_adagrad", lambda axis_name=None, **kw: optim.dadapt_adagrad(axis_name=axis_name, **kw),
          optim.dadapt_adagrad, {"eps": 1e-6}, shard_kwargs={"d0": 1e-2}),
    # D-Adapted Lion, faithful to the reference, reaches neither target (its momentum mixes
    # dlr-scaled and raw gradients; users report the same: dadaptation#35)
    Entry("dadapt_lion", lambda axis_name=None, **kw: optim.dadapt_lion(learning_rate=0.1, axis_name=axis_name, **kw),
          optim.dadapt_lion, {"learning_rate": 0.1}, solves=(), shard_kwargs={"d0": 1e-2},
          diverges_without_axis_name=False),
    Entry("mechanize", lambda axis_name=None, **kw: optim.mechanize(optax.adam(1.0), axis_name=axis_name, **kw),
          optim.mechanize, {"base_optimizer": optax.adam(1.0), "weight_decay": 0.01}, shard_kwargs={"s_init": 1e-4}),
    Entry("cocob", lambda axis_name=None, **kw: optim.cocob(axis_name=axis_name, **kw), optim.cocob,
          {"alpha": 100.0}, diverges_without_axis_name=False),
    Entry("dog", lambda axis_name=None, **kw: optim.dog(axis_name=axis_name, **kw), optim.dog,
          {"reps_rel": 1e-6, "eps": 1e-8}, shard_kwargs={"reps_rel": 1e-2}),
    Entry("ldog", lambda axis_name=None, **kw: optim.ldog(axis_name=axis_name, **kw), optim.ldog,
          {"reps_rel": 1e-6}, shard_kwargs={"reps_rel": 1e-2}),
    Entry("dowg", lambda axis_name=None, **kw: optim.dowg(axis_name=axis_name, **kw), optim.dowg,
          {"reps_rel": 1e-6}, shard_kwargs={"reps_rel": 1e-2}),
    Entry("dog+polynomial_decay_averaging",
          lambda axis_name=None, **kw: optax.chain(optim.dog(axis_name=axis_name, **kw),
                                                   optim.polynomial_decay_averaging()),
          lambda gamma: optax.chain(optim.dog(), optim.polynomial_decay_averaging(gamma)), {"gamma": 8.0},
          eval_params=lambda s, p: optim.averaged_params(s), shard_kwargs={"reps_rel": 1e-2}),
    # schedule-free: the only global reduction is the non-finite check, so finite runs also
    # agree sharded without axis_name; judged at the eval iterate x
    Entry("schedule_free_sgd", lambda axis_name=None, **kw: optim.schedule_free_sgd(0.1, axis_name=axis_name, **kw),
          optim.schedule_free_sgd, {"learning_rate": 0.1, "warmup_steps": 0, "r": 0.0},
          diverges_without_axis_name=False, eval_params=optim.schedule_free_eval_params, solves=("parabola",)),
    Entry("schedule_free_adamw", lambda axis_name=None, **kw: optim.schedule_free_adamw(axis_name=axis_name, **kw),
          optim.schedule_free_adamw, {"learning_rate": 0.0025, "warmup_steps": 0, "weight_decay": 0.0},
          diverges_without_axis_name=False, eval_params=optim.schedule_free_eval_params),
    Entry("schedule_free_radam", lambda axis_name=None, **kw: optim.schedule_free_radam(axis_name=axis_name, **kw),
          optim.schedule_free_radam, {"learning_rate": 0.0025, "r": 0.0}, diverges_without_axis_name=False,
          eval_params=optim.schedule_free_eval_params, shard_kwargs={"learning_rate": 0.05}),  # 4 silent steps
    Entry("schedule_free(adam)",
          lambda axis_name=None, **kw: optim.schedule_free(optax.adam(1e-2, b1=0.0), 1e-2, axis_name=axis_name, **kw),
          optim.schedule_free, {"base_optimizer": optax.adam(1e-2, b1=0.0), "learning_rate": 1e-2},
          diverges_without_axis_name=False, eval_params=optim.schedule_free_eval_params),
]
IDS = [e.name for e in TRANSFORMS]


def _point(entry, state, params):
    return params if entry.eval_params is None else entry.eval_params(state, params)


def _run(tx, loss, params, steps):
    """``steps`` updates under one ``lax.scan``; returns (params, state)."""
    grad = jax.grad(loss)

    def body(carry, _):
        p, s = carry
        u, s = tx.update(grad(p), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, s), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return p, s


def _parabola(p):
    return jnp.sum(jnp.square(p["x"] - jnp.array([1.0, -1.0, 1.0], p["x"].dtype)))


def _rosenbrock(p):
    x, y = p["xy"][0], p["xy"][1]
    return jnp.square(1.0 - x) + 100.0 * jnp.square(y - x * x)


# the targets and starting points of optax's contrib/_common_test.py, 30k steps in float32
TARGETS = {
    "parabola": (_parabola, {"x": jnp.array([-1.0, 10.0, 1.0], jnp.float32)}, np.array([1.0, -1.0, 1.0])),
    "rosenbrock": (_rosenbrock, {"xy": jnp.zeros(2, jnp.float32)}, np.array([1.0, 1.0])),
}
SOLVES = [(e, t) for e in TRANSFORMS for t in e.solves]


@pytest.mark.parametrize("entry,target", SOLVES, ids=[f"{e.name}-{t}" for e, t in SOLVES])
def test_reaches_the_optimum(entry, target):
    loss, params, opt = TARGETS[target]
    tx = entry.make()
    p, s = jax.jit(lambda q: _run(tx, loss, q, 30_000))(params)
    got = np.asarray(jax.tree.leaves(_point(entry, s, p))[0])
    np.testing.assert_allclose(got, opt, rtol=3e-2, atol=3e-2, err_msg=f"{entry.name} on {target}")


@pytest.mark.parametrize("entry", TRANSFORMS, ids=IDS)
def test_no_recompilation_bf16_params_and_float_accumulators(entry):
    """Second update reuses the compiled program; updates stay bf16; scalar state is float32+."""
    tx = entry.make()
    params = {"b": jnp.full((7,), 0.5, jnp.bfloat16), "w": jnp.ones((5, 3), jnp.bfloat16)}
    grads = jax.tree.map(lambda x: (0.1 * x).astype(x.dtype), params)
    traces = []  # a retrace is what a recompilation needs (counted in Python: independent of jit's C++ cache)
    update = jax.jit(lambda g, s, p: (traces.append(1), tx.update(g, s, p))[1])
    state = tx.init(params)
    u, state = update(grads, state, params)
    params = optax.apply_updates(params, u)
    u, state2 = update(grads, state, params)
    assert len(traces) == 1, f"{entry.name} recompiled on the second update"
    assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state2) == jax.tree.map(lambda x: (x.shape, x.dtype), state)
    param_shapes = {x.shape for x in jax.tree.leaves(params)}
    for leaf in jax.tree.leaves(state2):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.shape not in param_shapes:
            assert leaf.dtype == _tree.accumulation_dtype(), f"{entry.name}: scalar accumulator in {leaf.dtype}"


def _mlp_problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 4)))
    y = jnp.asarray(rng.normal(size=(32, 2)))
    params = {"w1": jnp.asarray(rng.normal(size=(4, 8)) / 2), "w2": jnp.asarray(rng.normal(size=(8, 2)) / 3)}

    def loss(p):
        return jnp.mean(jnp.square(jnp.tanh(x @ p["w1"]) @ p["w2"] - y))

    return loss, params


@pytest.mark.parametrize("entry", TRANSFORMS, ids=IDS)
def test_checkpoint_resume_chain_and_inject_hyperparams(entry):
    loss, params = _mlp_problem()
    tx = entry.make()
    run = jax.jit(lambda p, s, n: _resume(tx, loss, p, s, n), static_argnums=2)

    full_p, full_s = run(params, tx.init(params), 10)
    half_p, half_s = run(params, tx.init(params), 5)
    blob = flax.serialization.to_bytes(half_s)  # msgpack, as a checkpoint on disk
    restored = flax.serialization.from_bytes(tx.init(params), blob)
    assert jax.tree.structure(restored) == jax.tree.structure(half_s)
    res_p, res_s = run(half_p, restored, 5)
    for a, b in zip(jax.tree.leaves((res_p, res_s)), jax.tree.leaves((full_p, full_s))):
        np.testing.assert_array_equal(a, b)

    chained = optax.chain(optax.identity(), tx)
    ch_p, _ = jax.jit(lambda p: _run(chained, loss, p, 10))(params)
    for a, b in zip(jax.tree.leaves(ch_p), jax.tree.leaves(full_p)):
        np.testing.assert_array_equal(a, b)

    injected = optax.inject_hyperparams(entry.factory)(**entry.hparams)
    in_p, _ = jax.jit(lambda p: _run(injected, loss, p, 10))(params)
    for a, b in zip(jax.tree.leaves(in_p), jax.tree.leaves(full_p)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)
    traces = []  # injected hyperparameters are arrays: no retrace (hence no recompile) on the second step
    update = jax.jit(lambda g, s, p: (traces.append(1), injected.update(g, s, p))[1])
    u, s = update(jax.grad(loss)(params), injected.init(params), params)
    update(jax.grad(loss)(params), s, optax.apply_updates(params, u))
    assert len(traces) == 1, f"{entry.name} under inject_hyperparams recompiled"


@pytest.mark.parametrize("entry", TRANSFORMS, ids=IDS)
def test_api_contract_structure_checks_extra_args_and_tree_utilities(entry):
    """The contract every transform keeps (optax.contrib's tests call it this way): ``update`` needs
    ``params`` with the structure given to ``init`` and ignores extra keyword arguments (optax's
    ``value=``); ``optax.tree.map_params`` reaches the parameter-shaped state leaves."""
    tx = entry.make()
    params = {"a": jnp.ones(2), "b": jnp.full(3, 0.5)}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"`updates` has tree structure .* but `params` has"):
        tx.update({"a": jnp.ones(2)}, state, params)
    with pytest.raises(ValueError, match=r"needs `params`"):
        tx.update(params, state)
    extra = {"value": jnp.asarray(1.0), "unexpected_extra_args_your_optimizer_doesnt_expect": 1}
    with_extra = tx.update(params, state, params, **extra)
    for a, b in zip(jax.tree.leaves(with_extra), jax.tree.leaves(tx.update(params, state, params))):
        np.testing.assert_array_equal(a, b)
    # the state's subtrees shaped like the params (x0, z, moments; LDoG's per-tensor scalars) are mapped,
    # the counters are not
    mapped = optax.tree.map_params(tx, lambda v: v + 1.0, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(state))]
    counters = [jnp.issubdtype(x.dtype, jnp.integer) for x in jax.tree.leaves(state)]
    assert any(changed) and not any(c and k for c, k in zip(changed, counters)), (entry.name, changed)


def _resume(tx, loss, params, state, steps):
    grad = jax.grad(loss)

    def body(carry, _):
        p, s = carry
        u, s = tx.update(grad(p), s, p)
        return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(body, (params, state), None, length=steps)[0]


# ---------------------------------------------------------------- 8 host CPU devices

# Over 10 steps a 1-ulp change of x0 moves every trajectory by < 3e-7 here; past ~12 steps
# Prodigy/D-Adapt Adam amplify it to 1e-4 (Adam's m/sqrt(v) on coordinates near their
# target), and no comparison at 1e-6 would mean anything. The test checks this control too.
SHARD_STEPS = 10


def _sharded_problem():
    """A separable quadratic with per-coordinate curvature: each device's gradient shard is local."""
    rng = np.random.default_rng(1)
    shapes = {"a": (16, 3), "b": (8,), "c": (24, 2)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    curv = {k: jnp.asarray(rng.uniform(0.5, 3.0, size=s), jnp.float32) for k, s in shapes.items()}
    target = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    return params, curv, target


def _grad(p, curv, target):
    return jax.tree.map(lambda x, a, t: a * (x - t), p, curv, target)


def _steps(tx, params, curv, target):
    def body(carry, _):
        p, s = carry
        u, s = tx.update(_grad(p, curv, target), s, p)
        return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(body, (params, tx.init(params)), None, length=SHARD_STEPS)[0][0]


def _run_sharded(tx, params, curv, target):
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("d",))
    spec = jax.tree.map(lambda _: P("d"), params)
    fn = jax.shard_map(
        lambda p, a, t: _steps(tx, p, a, t), mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
    )
    return jax.jit(fn)(params, curv, target)


def _rel(a, b):
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return num / max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))


@pytest.mark.parametrize("entry", TRANSFORMS, ids=IDS)
def test_sharded_with_axis_name_equals_single_device(entry):
    """Params and state sharded over 8 CPU devices under shard_map; float32; 30 steps."""
    assert len(jax.devices()) >= 8
    params, curv, target = _sharded_problem()
    single = jax.jit(lambda p: _steps(entry.make(**entry.shard_kwargs), p, curv, target))(params)
    sharded = _run_sharded(entry.make(axis_name="d", **entry.shard_kwargs), params, curv, target)
    moved = _rel(single, params)
    assert moved > 1e-3, f"{entry.name} barely moved ({moved:.2g}): the comparison would be vacuous"
    ulp = jax.tree.map(lambda x: x * (1 + 2**-23), params)
    control = _rel(jax.jit(lambda p: _steps(entry.make(**entry.shard_kwargs), p, curv, target))(ulp), single)
    assert control <= 1e-6, f"invalid case: {entry.name} amplifies one ulp to {control:.2g}"
    assert _rel(sharded, single) <= 1e-6, f"{entry.name}: sharded differs by {_rel(sharded, single):.3g}"


DIVERGING = [e for e in TRANSFORMS if e.diverges_without_axis_name]


@pytest.mark.parametrize("entry", DIVERGING, ids=[e.name for e in DIVERGING])
def test_sharded_without_axis_name_diverges(entry):
    """The same run with axis_name=None: each device adapts to its own shard only."""
    params, curv, target = _sharded_problem()
    single = jax.jit(lambda p: _steps(entry.make(**entry.shard_kwargs), p, curv, target))(params)
    local = _run_sharded(entry.make(**entry.shard_kwargs), params, curv, target)
    # > 1e-5, against <= 6e-7 with axis_name and a 1-ulp control <= 5e-7 (measured)
    assert _rel(local, single) > 1e-5, f"{entry.name}: no divergence without axis_name ({_rel(local, single):.2g})"
