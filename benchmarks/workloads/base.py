"""The workload type and the one training driver of the optimizer benchmarks.

A :class:`Workload` is a training problem in the AlgoPerf sense: a model and its initialisation, a
training loss on minibatches, a validation metric (lower is better), a target value of that metric
and a step budget. *Steps to target* is the first evaluated step at which the validation metric is at
or below the target (evaluations every ``eval_every`` steps); a run that never gets there has
``inf``. Everything is a pure function of PRNG keys: a run's initialisation and its minibatches come
from its key, so two optimizers given the same key see the same data in the same order.

:func:`train_many` runs many optimizers, configurations and seeds of one workload in one compiled
program (the model is traced once for all of them): hyperparameters are traced arrays, runs are
``vmap``-ed for the dense workloads and ``lax.map``-ped for the convolutional ones; :func:`train` is
the one-optimizer case.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Workload(NamedTuple):
    """A training problem with a validation target (see the module docstring).

    Attributes:
      name: the registry name.
      init: ``key -> params`` (a float32 pytree).
      loss: ``(params, batch) -> scalar`` training loss.
      batch: ``(key, step) -> batch`` the minibatch of ``step`` for a run with data key ``key``.
      evaluate: ``params -> scalar`` the validation metric (lower is better).
      metric: what ``evaluate`` computes, in words.
      target: the validation target.
      steps: the step budget.
      eval_every: steps between evaluations.
      vectorize: ``vmap`` runs (dense models) or ``lax.map`` them (convolutions).
      notes: the model, the data and where the target comes from.
    """

    name: str
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, Any], jax.Array]
    batch: Callable[[jax.Array, jax.Array], Any]
    evaluate: Callable[[Any], jax.Array]
    metric: str
    target: float
    steps: int
    eval_every: int
    vectorize: bool
    notes: str


def _cast_like(tree, like):
    return jax.tree.map(lambda a, b: a.astype(b.dtype), tree, like)


class Group(NamedTuple):
    """Runs of one optimizer in :func:`train_many`: ``make_tx(**hparams_i)`` from key ``keys[i]``.

    Attributes:
      make_tx: ``**hparams -> GradientTransformation``; its arguments are traced scalars.
      hparams: name -> array of shape (R,), run i's hyperparameters.
      keys: (R,) PRNG keys, run i's initialisation and minibatches.
      eval_fn: ``(opt_state, params) -> params`` the point to evaluate (schedule-free's ``x``, an
        average), or None for the parameters.
    """

    make_tx: Callable[..., optax.GradientTransformation]
    hparams: dict
    keys: jax.Array
    eval_fn: Callable | None = None


def _concat(trees):
    return jax.tree.map(lambda *a: jnp.concatenate(a), *trees)


def _split(tree, sizes):
    ends = np.cumsum(sizes)
    return [jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], tree) for lo, hi in zip(ends - sizes, ends)]


def train_many(workload: Workload, groups: list[Group], steps: int | None = None) -> dict:
    """Train every run of every :class:`Group` on ``workload`` in one compiled program.

    All runs share the model, so the loss and its gradient are traced once for all of them (the
    parameters of all groups stacked along a run axis, ``vmap``-ed for dense workloads, ``lax.map``-ped
    for convolutions: a vmapped convolution over parameters becomes a grouped convolution, slower than
    a loop on XLA:CPU); each group's optimizer is ``vmap``-ed over its own runs. Compiling a large
    model once instead of once per optimizer is what makes a calibration affordable on a CPU.

    Args:
      workload: the :class:`Workload`.
      groups: the optimizers and their runs.
      steps: the number of steps (default: the budget), a multiple of ``eval_every``.

    Returns:
      ``groups``: per group a dict of NumPy arrays, ``val`` (R, E) the validation metric after each block
      of ``eval_every`` steps, ``train`` (R, E) the mean training loss over each block, ``val0`` (R,)
      before training and ``skipped`` (R,) the steps the optimizer skipped (its ``num_nonfinite``);
      ``seconds`` (the wall time of the compiled program) and ``compile_seconds``.

    Raises:
      ValueError: if ``steps`` is not a multiple of the workload's ``eval_every``.
    """
    steps = workload.steps if steps is None else steps
    every = workload.eval_every
    if steps % every:
        raise ValueError(f"`steps`={steps} must be a multiple of the workload's eval_every={every}.")
    sizes = [len(g.keys) for g in groups]
    grad = jax.value_and_grad(workload.loss)
    over_runs = jax.vmap if workload.vectorize else (lambda f: lambda *a: jax.lax.map(lambda x: f(*x), a))

    def program(hparams, keys):
        both = jax.vmap(jax.random.split)(_concat(keys))  # a run's (init, data) keys, as train() always had
        k_init, k_data = both[:, 0], both[:, 1]
        params = _split(jax.vmap(workload.init)(k_init), sizes)
        txs = [lambda hp, g=g: g.make_tx(**hp) for g in groups]
        states = [jax.vmap(lambda hp, p, t=t: t(hp).init(p))(hp, p) for t, hp, p in zip(txs, hparams, params)]

        def step(carry, k):
            ps, ss = carry
            value, g = over_runs(lambda p, kd: grad(p, workload.batch(kd, k)))(_concat(ps), k_data)
            new_ps, new_ss = [], []
            for t, hp, p, s, gi in zip(txs, hparams, ps, ss, _split(g, sizes)):
                u, s = jax.vmap(lambda hp, g_, s_, p_, t=t: t(hp).update(g_, s_, p_))(hp, gi, s, p)
                new_ps.append(_cast_like(optax.apply_updates(p, u), p))
                new_ss.append(s)
            return (new_ps, new_ss), value

        def evaluate(ps, ss):
            points = [p if gr.eval_fn is None else jax.vmap(gr.eval_fn)(s, p) for gr, p, s in zip(groups, ps, ss)]
            return over_runs(workload.evaluate)(_concat(points))

        def block(carry, b):
            carry, losses = jax.lax.scan(step, carry, b * every + jnp.arange(every))
            return carry, (jnp.mean(losses, axis=0), evaluate(*carry))

        val0 = evaluate(params, states)
        (ps, ss), (tr, va) = jax.lax.scan(block, (params, states), jnp.arange(steps // every))
        out = []
        for s, t_, v_, v0 in zip(ss, _split(tr.T, sizes), _split(va.T, sizes), _split(val0, sizes)):
            skipped = sum(jnp.sum(v, axis=tuple(range(1, v.ndim)))
                          for _, v in optax.tree_utils.tree_get_all_with_path(s, "num_nonfinite"))
            out.append({"train": t_, "val": v_, "val0": v0,
                        "skipped": jnp.broadcast_to(jnp.asarray(skipped, jnp.float32), v0.shape)})
        return out

    args = ([g.hparams for g in groups], [g.keys for g in groups])
    t = time.perf_counter()
    compiled = jax.jit(program).lower(*args).compile()
    t_run = time.perf_counter()
    out = jax.tree.map(np.asarray, jax.block_until_ready(compiled(*args)))
    return {"groups": out, "compile_seconds": t_run - t, "seconds": time.perf_counter() - t_run}


def train(workload: Workload, make_tx: Callable[..., optax.GradientTransformation], hparams: dict, keys: jax.Array,
          eval_fn: Callable | None = None, steps: int | None = None) -> dict:
    """Train ``len(keys)`` runs of ``make_tx(**hparams_i)`` on ``workload``: :func:`train_many` with one group.

    Returns:
      The group's arrays (``val``, ``train``, ``val0``, ``skipped``), ``seconds`` and ``compile_seconds``.
    """
    res = train_many(workload, [Group(make_tx, hparams, keys, eval_fn)], steps)
    return dict(res["groups"][0], seconds=res["seconds"], compile_seconds=res["compile_seconds"])


def steps_to_target(val: np.ndarray, target: float, eval_every: int) -> np.ndarray:
    """The first evaluated step with ``val <= target`` per run (``inf`` if never): ``val`` is (..., E)."""
    hit = np.asarray(val) <= target  # NaN compares False
    first = np.argmax(hit, axis=-1)
    return np.where(hit.any(axis=-1), (first + 1) * eval_every, np.inf)


def step_time(workload: Workload, make_tx: Callable[[], optax.GradientTransformation], steps: int = 50) -> Callable:
    """A blocking callable that trains one run for ``steps`` steps (no evaluation), compiled on first call.

    For wall-time-to-target: time it with ``benchmarks.common.interleaved`` against the other methods.
    """
    grad = jax.grad(workload.loss)
    tx = make_tx()

    @jax.jit
    def run(key):
        k_init, k_data = jax.random.split(key)
        params = workload.init(k_init)

        def step(carry, k):
            p, s = carry
            u, s = tx.update(grad(p, workload.batch(k_data, k)), s, p)
            return (_cast_like(optax.apply_updates(p, u), p), s), None

        return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))[0][0]

    key = jax.random.key(0)
    jax.block_until_ready(run(key))
    return lambda: jax.block_until_ready(run(key))
