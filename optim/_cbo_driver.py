"""The consensus driver: :func:`cbo_minimize` runs a consensus transform in one ``lax.while_loop``.

Works with every transform of ``optim.cbo`` and ``optim.cbs`` (found inside a chain by its
:class:`CBOState`). Keeps the ensemble on one device; for sharded particles call ``tx.update``
inside ``shard_map`` yourself.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _cbo_base as B
from optim import _consensus as C
from optim import _validate as V
from optim._cbo_base import CBOState


class CBOHistory(NamedTuple):
    """Per-step records of :func:`cbo_minimize`; entries after termination are NaN.

    Attributes:
      min_value: shape=(num_steps,), the smallest loss over the particles evaluated at each
        step; NaN losses are ignored (inf when every loss of the step was NaN).
      alpha: shape=(num_steps,), the alpha used at each step.
      consensus_shift: shape=(num_steps,), sup-norm of the consensus movement (inf at step 0).
      consensus: pytree like one particle with a leading (num_steps,) axis, or None unless
        ``save_consensus=True``.
    """

    min_value: jax.Array
    alpha: jax.Array
    consensus_shift: jax.Array
    consensus: Any


class CBOResult(NamedTuple):
    """Result of :func:`cbo_minimize`.

    Attributes:
      consensus: the consensus point of the last step (pytree like one particle).
      best_value: shape=(), the smallest finite loss evaluated over the whole run (inf if none).
      best_particle: the particle that had ``best_value``.
      particles: the final ensemble (after the last update; not evaluated).
      state: the final transform state.
      num_steps: shape=(), int32, steps taken (fewer than ``num_steps`` if a criterion fired).
      num_evaluations: shape=(), int32, evaluations of ``f``: N per step at the particles, plus
        the evaluations a Heaviside correction makes (1 per step at the consensus, N with
        ``batch_size`` or ``polar_cbo``). Never more than ``max_evaluations``.
      history: :class:`CBOHistory`.
    """

    consensus: Any
    best_value: jax.Array
    best_particle: Any
    particles: Any
    state: Any
    num_steps: jax.Array
    num_evaluations: jax.Array
    history: CBOHistory


def _is_cbo_state(s):
    return isinstance(s, CBOState)


def _find_cbo_state(state):
    return V.find_state(state, CBOState, "`tx` must contain exactly one consensus transform (cbo, polar_cbo or "
                        "cbs); its state holds {found} CBOState(s). Build `tx` with `optim.cbo(...)`, optionally "
                        "chained.")


def _sup_norm(a, b):
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))


class _CountingObjective:
    """``f`` as the transforms' ``value_fn``; they report (at trace time) how often they call it per step."""

    def __init__(self, f):
        self.f = f
        self.extra = 0

    def __call__(self, x):
        return self.f(x)

    def note_evaluations(self, k: int) -> None:
        self.extra += k


def _typed_key(key):
    if B.is_typed(key):
        if jnp.ndim(key) != 0:
            V.fail("key", V.Text(f"a key array of shape {key.shape}"), "one PRNG key (shape ())",
                   "Split outside and vmap `cbo_minimize` over the keys.")
        return key
    data = B.key_data(key, None)
    return jax.random.wrap_key_data(data, impl=B.default_impl_for(data.shape))


def _check_objective(f, one):
    """``f`` maps one particle to a scalar; a clear message for a batched objective."""
    hint = ("`f` must map ONE particle (a pytree like `particles0` without the leading particle axis, e.g. shape "
            f"{jax.tree.map(jnp.shape, one)}) to a scalar loss; cbo_minimize vmaps it over the particles. An "
            "objective written for a batch, f(X) -> (N,), fits the expected signature as "
            "`lambda x: f_batched(x[None])[0]` (jax.vmap makes that as fast).")
    if not callable(f):
        V.fail("f", f, "a callable", hint, TypeError)
    try:
        out = jax.eval_shape(f, one)
    except Exception as e:  # any failure on one particle: most often an objective written for a batch
        raise ValueError(f"`f` failed on one particle: {type(e).__name__}: {str(e).splitlines()[0]}. {hint}") from e
    if getattr(out, "shape", None) != ():
        raise ValueError(f"`f` must map one particle to a scalar loss; it returned shape "
                         f"{getattr(out, 'shape', type(out))}. {hint}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"`f` returned dtype {out.dtype}; the loss must be floating point. {hint}")
    return out


def cbo_minimize(
    f: Callable[[Any], jax.Array],
    particles0: Any,
    key: jax.Array,
    tx: optax.GradientTransformationExtraArgs,
    num_steps: int,
    *,
    energy_tol: float | None = None,
    diff_tol: float | None = None,
    max_evaluations: int | None = None,
    with_gradient: bool = False,
    save_consensus: bool = False,
    progress: bool | None = None,
) -> CBOResult:
    """Minimizes ``f`` with a consensus transform in one ``lax.while_loop``.

    Each step evaluates ``f`` at every particle (``jax.vmap``), calls ``tx.update`` with
    ``value=losses``, ``value_fn=f`` and ``key`` (and the per-particle gradients when
    ``with_gradient``), and applies the step; a particle whose new position is NaN/Inf (from a
    NaN start or an overflowing step) is put back at the consensus. The run stops after
    ``num_steps`` steps or when a criterion fires: ``best_value < energy_tol``, consensus
    movement (sup-norm) ``< diff_tol``, or the next step would exceed ``max_evaluations``
    evaluations. Under ``jax.vmap`` over independent runs (keys and/or initial ensembles) each
    run stops on its own: finished runs are frozen while the others continue. For particles
    sharded over devices, call ``tx.update`` inside ``shard_map`` yourself (see :func:`cbo`'s
    ``axis_name``); this driver keeps the ensemble on one device.

    **Evaluation budget.** A step costs N evaluations at the particles plus the evaluations a
    Heaviside correction makes (1 at the consensus, or N with ``batch_size``/``polar_cbo``).
    Only whole steps are taken: the run stops before a step that would exceed
    ``max_evaluations``, so a remainder smaller than one step is left unspent (the driver never
    evaluates part of the ensemble); a budget below one step raises ``ValueError``.

    **Compilation.** The loop is jitted with ``f`` and ``tx`` as static arguments: calling again
    with the same ``f`` object and an equal transform (a new but identical ``optim.cbo(...)``
    is equal) reuses the compiled program; a new lambda each call recompiles.

    A progress bar (tqdm) is shown only when called eagerly (not under ``jit``/``vmap``) with
    ``progress=True``, or with ``progress=None`` and ``num_steps >= 2000``. The loop then runs
    in jitted chunks with the same result.

    Args:
      f: loss of ONE particle (a pytree without the particle axis, e.g. shape (d,)) -> scalar.
        An objective written for a batch ``f(X) -> (N,)`` fits as ``lambda x: f(x[None])[0]``.
      particles0: initial ensemble, a pytree whose leaves have a leading particle axis N.
      key: PRNG key of the run (a typed key, raw key data or an int seed); it replaces the
        key of ``tx``'s state, and its implementation (``jax.random.key(seed, impl=...)``) is
        kept.
      tx: a transform from :func:`cbo`, :func:`polar_cbo` or :func:`cbs`, possibly chained.
      num_steps: maximum number of steps (static Python int >= 1).
      energy_tol: stop once the best loss is below it (any finite number: losses may be
        negative).
      diff_tol: stop once the consensus moves less than this (> 0) in one step.
      max_evaluations: the evaluation budget (static Python int), see above.
      with_gradient: pass ``jax.vmap(jax.grad(f))`` of the particles as ``updates`` (for
        ``cbo(gradient_weight=...)``).
      save_consensus: also record the consensus after every step in ``history.consensus``.
      progress: progress bar switch (see above).

    Returns:
      A :class:`CBOResult`.

    Raises:
      ValueError: for an invalid criterion or budget, particles without a particle axis, or
        an ``f`` that does not map one particle to a scalar (the message shows how to wrap a
        batched objective).

    Example:
      >>> import jax, jax.numpy as jnp, optim
      >>> f = lambda x: jnp.sum(x**2 - 10 * jnp.cos(2 * jnp.pi * x)) + 10 * x.size
      >>> x0 = jax.random.uniform(jax.random.key(1), (40, 5), minval=-3, maxval=3)
      >>> res = optim.cbo_minimize(f, x0, jax.random.key(0), optim.cbo(), num_steps=1000)
      >>> bool(jnp.max(jnp.abs(res.consensus)) < 0.25)
      True
    """
    V.static_int("num_steps", num_steps, 1, "Pass the maximum number of steps as a Python int.")
    if energy_tol is not None:
        V.finite("energy_tol", energy_tol, "The run stops once the best loss is below it; it may be negative.")
        energy_tol = V.static_float("energy_tol", energy_tol)
    if diff_tol is not None:
        V.positive("diff_tol", diff_tol, "The run stops once the consensus moves less than this per step.")
        diff_tol = V.static_float("diff_tol", diff_tol)
    if max_evaluations is not None:
        max_evaluations = V.static_int("max_evaluations", max_evaluations, 1,
                                       "It is the budget of evaluations of `f` (N per step).")
    leaves = jax.tree.leaves(particles0)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError("`particles0` needs a leading particle axis on every leaf: pass the ensemble as "
                         "(num_particles, ...), e.g. `jax.random.uniform(key, (N, d))`.")
    V.float_tree("cbo_minimize", "particles0", particles0)
    n = jnp.shape(leaves[0])[0]
    if max_evaluations is not None and max_evaluations < n:
        V.fail("max_evaluations", max_evaluations, f">= {n}, the evaluations of one step ({n} particles)",
               "Only whole steps are taken; raise the budget or use fewer particles.")
    one = jax.tree.map(lambda x: x[0], particles0)
    out = _check_objective(f, one)
    vdtype = jnp.promote_types(out.dtype, jnp.float32)
    if not callable(getattr(tx, "init", None)) or not callable(getattr(tx, "update", None)):
        V.fail("tx", tx, "a consensus transform (optim.cbo, optim.polar_cbo or optim.cbs)",
               "Build it with e.g. `optim.cbo(sigma=1.0)`.", TypeError)
    typed = _typed_key(key)

    state0 = tx.init(particles0)
    _find_cbo_state(state0)
    state0 = jax.tree.map(lambda s: s._replace(key=jax.random.key_data(typed)) if _is_cbo_state(s) else s, state0,
                          is_leaf=_is_cbo_state)

    def empty(shape, dtype):
        return jnp.full(shape, jnp.nan, dtype)

    cstate0 = _find_cbo_state(state0)
    history0 = CBOHistory(
        min_value=empty((num_steps,), vdtype), alpha=empty((num_steps,), cstate0.alpha.dtype),
        consensus_shift=empty((num_steps,), vdtype),
        consensus=jax.tree.map(lambda c: empty((num_steps,) + c.shape, c.dtype), cstate0.consensus)
        if save_consensus else None)
    carry = dict(params=particles0, state=state0, key=typed, best_value=jnp.asarray(jnp.inf, vdtype),
                 best_particle=one, count=jnp.zeros((), jnp.int32), evaluations=jnp.zeros((), jnp.int32),
                 done=jnp.zeros((), bool), history=history0)
    static = dict(f=f, tx=tx, num_steps=num_steps, criteria=(energy_tol, diff_tol, max_evaluations),
                  with_gradient=with_gradient)

    traced = any(isinstance(x, jax.core.Tracer) for x in leaves + [typed])
    if traced:
        carry = _loop(carry, num_steps, **static)
    elif progress if progress is not None else num_steps >= 2000:
        carry = _run_with_progress(functools.partial(_loop_jit, **static), carry, num_steps)
    else:
        carry = _loop_jit(carry, num_steps, **static)
    final = _find_cbo_state(carry["state"])
    return CBOResult(consensus=final.consensus, best_value=carry["best_value"], best_particle=carry["best_particle"],
                     particles=carry["params"], state=carry["state"], num_steps=carry["count"],
                     num_evaluations=carry["evaluations"], history=carry["history"])


def _loop(carry, stop, *, f, tx, num_steps, criteria, with_gradient):
    """The driver's while_loop from ``carry`` until a criterion fires or ``count == stop``."""
    energy_tol, diff_tol, max_evaluations = criteria
    n = jnp.shape(jax.tree.leaves(carry["params"])[0])[0]
    vdtype = carry["best_value"].dtype
    evaluate = jax.vmap(jax.value_and_grad(f)) if with_gradient else (lambda p: (jax.vmap(f)(p), None))

    def body(c):
        params, state, k = c["params"], c["state"], c["count"]
        value, grads = evaluate(params)
        value = value.astype(vdtype)
        old_consensus = _find_cbo_state(state).consensus
        counted = _CountingObjective(f)
        step, state = tx.update(grads, state, params, value=value, value_fn=counted, key=c["key"])
        cost = n + counted.extra  # known once the update is traced: the evaluations of one step
        if max_evaluations is not None and cost > max_evaluations:
            V.fail("max_evaluations", max_evaluations,
                   f">= {cost}, the evaluations of one step ({n} particles + {counted.extra} by the correction)",
                   "Only whole steps are taken; raise the budget.")
        cstate = _find_cbo_state(state)
        new_params = optax.apply_updates(params, step)
        # a particle that is (or became) non-finite cannot be moved by an update: restart it at the consensus
        lost = ~C.finite_positions(new_params)
        new_params = jax.tree.map(lambda x, cc: jnp.where(C._bcast(lost, x), cc[None].astype(x.dtype), x),
                                  new_params, cstate.consensus)
        finite = jnp.isfinite(value)
        i = jnp.argmin(jnp.where(finite, value, jnp.inf))
        better = finite[i] & (value[i] < c["best_value"])
        best_value = jnp.where(better, value[i], c["best_value"])
        best_particle = jax.tree.map(lambda b, x: jnp.where(better, x[i], b), c["best_particle"], params)
        shift = jnp.where(k == 0, jnp.inf, _sup_norm(cstate.consensus, old_consensus)).astype(vdtype)
        h = c["history"]
        history = CBOHistory(
            min_value=h.min_value.at[k].set(jnp.min(jnp.where(jnp.isnan(value), jnp.inf, value))),
            alpha=h.alpha.at[k].set(cstate.alpha),
            consensus_shift=h.consensus_shift.at[k].set(shift),
            consensus=None if h.consensus is None else jax.tree.map(lambda a, v: a.at[k].set(v), h.consensus,
                                                                    cstate.consensus))
        evaluations = c["evaluations"] + cost
        done = k + 1 >= num_steps
        if energy_tol is not None:
            done = done | (best_value < energy_tol)
        if diff_tol is not None:
            done = done | (shift < diff_tol)
        if max_evaluations is not None:
            done = done | (evaluations + cost > max_evaluations)
        return dict(params=new_params, state=state, key=c["key"], best_value=best_value, best_particle=best_particle,
                    count=k + 1, evaluations=evaluations, done=done, history=history)

    return jax.lax.while_loop(lambda c: ~c["done"] & (c["count"] < stop), body, carry)


# f and tx are static so repeated eager calls with the same objective and an equal transform reuse the compile
_loop_jit = jax.jit(_loop, static_argnames=("f", "tx", "num_steps", "criteria", "with_gradient"))


def _run_with_progress(run_jit, carry, num_steps):
    """Runs the jitted loop in chunks of ~1% of the steps, updating a tqdm bar in between."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience; run without it
        return run_jit(carry, num_steps)
    chunk = max(1, num_steps // 100)
    with tqdm(total=num_steps, desc="cbo", file=sys.stderr) as bar:
        done_steps = 0
        while done_steps < num_steps and not bool(carry["done"]):
            carry = run_jit(carry, min(done_steps + chunk, num_steps))
            now = int(carry["count"])
            bar.update(now - done_steps)
            done_steps = now
    return carry
