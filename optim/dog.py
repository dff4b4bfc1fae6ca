"""DoG, LDoG and DoWG (distance-over-gradients step sizes) and polynomial-decay averaging.

All three are plain gradient descent ``x_{t+1} = x_t - eta_t g_t`` whose step size is a
distance travelled from the start divided by an accumulated gradient norm:

* DoG (Ivgi, Hinder, Carmon 2023): ``rbar_t = max(rbar_{t-1}, ||x_t - x_0||)``,
  ``G_t = G_{t-1} + ||g_t||^2`` with ``G_{-1} = eps``, ``eta_t = lr * rbar_t / sqrt(G_t)``.
* LDoG: the same rule with one ``rbar``/``G`` per parameter tensor (pytree leaf).
* DoWG (Khaled, Mishchenko, Jin 2023): ``v_t = v_{t-1} + rbar_t^2 ||g_t||^2``,
  ``eta_t = lr * rbar_t^2 / (sqrt(v_t) + eps)``.

The DoG authors insist that DoG/LDoG be combined with iterate averaging; chain
`polynomial_decay_averaging` last and evaluate at `averaged_params`.

Non-finite gradients: a step whose gradient has a NaN/Inf entry, or an entry whose square
overflows the state dtype (``|g| > 1.8e19`` for float32; ``G`` would absorb it and every later
step would be ~0), is skipped: the updates are zero, the state is left as it was, and
``num_nonfinite`` counts the skipped steps, so ``rbar`` and ``G`` never absorb a NaN. Both
are detected through the squared norms the step needs anyway; so are NaN parameters (through
``||x - x_0||``), and a learning rate (a schedule's value) that is NaN, infinite or negative
skips the step too. The schedule is evaluated at the number of ``update`` calls, so it moves
past a bad value (``optim._lrfree`` has the whole rule). LDoG, one DoG per tensor, skips
per tensor: a tensor with a non-finite gradient gets a zero update and keeps its
``rbar``/``G`` while the others step; ``count`` advances only when every tensor stepped.
(A whole-step skip would have to finish every tensor's norm before the first update, which
loses the cache reuse between a tensor's norm and its update: 1.17x
``optax.scale_by_distance_over_gradients`` on a 10M-parameter CPU step, against 1.01x per
tensor.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _tree
from optim import _validate as V
from optim.presets import PRESETS
from optim._lrfree import (
    Gate,
    ScalarOrSchedule,
    check_init,
    check_learning_rate,
    check_mask,
    check_update_args,
    commit,
    copy_to_state,
    coupled_decay,
    learning_rate_at,
    fits,
    schedule_step,
)

#: Named settings for `dog`, `ldog` and `dowg` (sources in ``optim.presets``):
#: ``"paper"`` (``reps_rel=1e-6``), ``"batchnorm"`` (DoG, LDoG: ``reps_rel=1e-4``), ``"optax"`` (DoWG:
#: optax.contrib's ``eps=1e-4``, also its initial squared distance) and ``"calibrated"``.
DOG_PRESETS = PRESETS["dog"]
LDOG_PRESETS = PRESETS["ldog"]
DOWG_PRESETS = PRESETS["dowg"]

_INIT_STEPS = ("heuristic", "distance", "learning_rate")


def _init_step(init_step, reps_rel: float) -> tuple[float, float | None, float | None]:
    """optax.contrib's ``init_step=(kind, value)`` as ``(reps_rel, init_distance, init_eta)``."""
    if init_step is None:
        return reps_rel, None, None
    if not isinstance(init_step, (tuple, list)) or len(init_step) != 2 or init_step[0] not in _INIT_STEPS:
        V.fail("init_step", init_step, "None or a pair (kind, value) with kind in " + ", ".join(map(repr, _INIT_STEPS)),
               "As in optax.contrib.dog: ('heuristic', 1e-6) is reps_rel=1e-6, ('distance', r) the initial distance r, "
               "('learning_rate', eta) the first step size eta.", TypeError)
    if V.concrete(reps_rel) not in (None, 1e-6):
        V.fail("init_step", init_step, f"left out when `reps_rel` is given (got reps_rel={reps_rel!r})",
               "Pass one of them.", TypeError)
    kind, value = init_step
    return (value, None, None) if kind == "heuristic" else (
        (reps_rel, value, None) if kind == "distance" else (reps_rel, None, value))


class DoGState(NamedTuple):
    """State of `dog`, `ldog` and `dowg`."""

    count: jax.Array  # shape=(), int32: steps applied.
    num_nonfinite: jax.Array  # shape=(), int32: steps skipped for a non-finite gradient.
    init_params: Any  # x_0: same tree and shapes as params, float32 at least.
    rbar: Any  # max distance from x_0: shape=() (dog, dowg) or a shape=() leaf per tensor (ldog).
    grad_sum: Any  # G_t (dog, ldog) or v_t (dowg); same layout and dtype as rbar.


def _build(
    kind: str,
    *,
    reps_rel: float,
    learning_rate: ScalarOrSchedule,
    weight_decay: float,
    eps: float,
    init_eta: float | None,
    init_distance: float | None,
    init_sq_distance: float | None = None,
    mask: Any = None,
    axis_name: _tree.AxisName,
) -> optax.GradientTransformationExtraArgs:
    weight_decay = 0.0 if weight_decay is None else weight_decay  # optax.contrib's "no decay"
    check_mask(mask)
    checks = [
        check_learning_rate(learning_rate, "The authors recommend 1.0."),
        V.nonnegative("weight_decay", weight_decay, "0 is the reference default."),
        V.nonnegative("eps", eps, "The reference default is 1e-8."),
    ]
    if init_eta is not None:
        checks.append(V.positive("init_eta", init_eta, "It is the first step size; pass None to use `reps_rel`."))
    elif init_distance is not None:
        checks.append(V.positive("init_distance", init_distance, "Pass None to use `reps_rel * (1 + ||x_0||)`."))
    elif init_sq_distance is not None:
        checks.append(V.positive("init_estim_sq_dist", init_sq_distance,
                                 "It is the initial squared distance; pass None to use `reps_rel * (1 + ||x_0||)`."))
    else:
        checks.append(V.positive("reps_rel", reps_rel, "Use 1e-6, or 1e-4 with batch normalisation."))
    hp_ok = V.all_of(*checks)
    layerwise = kind == "ldog"
    acc = _tree.accumulation_dtype()

    def sq(x):
        return jnp.square(_tree.to_acc(x))

    def reduce(fn, *trees):
        if layerwise:
            return _tree.leaf_reduce_sum(fn, *trees, axis_name=axis_name)
        return _tree.tree_reduce_sum(fn, *trees, axis_name=axis_name)

    def init_fn(params):
        check_init(kind, params)
        if init_eta is not None:  # the first step is init_eta; rbar starts from 0 as in dog-optimizer
            rbar = jax.tree.map(lambda n: jnp.zeros((), acc), reduce(sq, params))
        elif init_distance is not None:
            rbar = jax.tree.map(lambda n: jnp.asarray(init_distance, acc), reduce(sq, params))
        elif init_sq_distance is not None:
            rbar = jax.tree.map(lambda n: jnp.sqrt(jnp.asarray(init_sq_distance, acc)), reduce(sq, params))
        else:
            rbar = jax.tree.map(lambda n: reps_rel * (1 + jnp.sqrt(n)), reduce(sq, params))
        g0 = eps if kind != "dowg" else 0.0
        return DoGState(
            count=jnp.zeros((), jnp.int32),
            num_nonfinite=jnp.zeros((), jnp.int32),
            init_params=copy_to_state(params),
            rbar=rbar,
            grad_sum=jax.tree.map(lambda r: jnp.asarray(g0, acc), rbar),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax.contrib does
        check_update_args(kind, updates, params, state.init_params, "init_params (the params given to init)")
        # coupled (L2) decay, as in dog-optimizer and optax.contrib: it enters G as well
        grads = coupled_decay(updates, params, weight_decay, mask=mask)
        lr, lr_ok = learning_rate_at(learning_rate, schedule_step(state))
        dist = jax.tree.map(jnp.sqrt, reduce(lambda x, x0: sq(x.astype(x0.dtype) - x0), params, state.init_params))
        grad_sq = reduce(sq, grads)
        step_ok = V.all_of(lr_ok, hp_ok)
        # ||g||^2 representable in the state dtype (NaN/Inf fail too), ||x - x0|| finite (NaN params fail)
        finite = jax.tree.map(lambda n, r: V.all_of(fits(n, state.init_params) & jnp.isfinite(r), step_ok),
                              grad_sq, dist)
        gate = Gate.of(_tree.tree_all(finite))
        # where the step is not taken, dist and grad_sq count as 0: rbar and G (both >= 0) stay as they are
        dist, grad_sq = (jax.tree.map(lambda x, ok: jnp.where(ok, x, 0), t, finite) for t in (dist, grad_sq))
        rbar = jax.tree.map(jnp.maximum, state.rbar, dist)
        if kind == "dowg":
            grad_sum = jax.tree.map(lambda v, r, n: v + r * r * n, state.grad_sum, rbar, grad_sq)
            eta = jax.tree.map(lambda r, v: lr * r * r / (jnp.sqrt(v) + eps), rbar, grad_sum)
        else:
            grad_sum = jax.tree.map(jnp.add, state.grad_sum, grad_sq)
            # G is 0 only with eps=0 and all-zero gradients so far; the step is then 0 anyway
            eta = jax.tree.map(
                lambda r, s: jnp.where(s > 0, lr * r / jnp.sqrt(jnp.where(s > 0, s, 1)), 0), rbar, grad_sum
            )
        if init_eta is not None:
            eta = jax.tree.map(lambda e: jnp.where(state.count == 0, jnp.asarray(init_eta, e.dtype), e), eta)
        stepped = DoGState(state.count, state.num_nonfinite, state.init_params, rbar, grad_sum)
        if not layerwise:
            new_updates = jax.tree.map(lambda g, p: (-eta * g).astype(p.dtype), grads, params)
            return commit(gate, new_updates, stepped, state, gated=("rbar", "grad_sum"))
        # per tensor: each update waits only for its own tensor's norms
        new_updates = jax.tree.map(lambda g, e, ok, p: jnp.where(ok, -e * g, 0).astype(p.dtype), grads, eta, finite,
                                   params)
        return new_updates, commit(gate, (), stepped, state, gated=("rbar", "grad_sum"))[1]

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dog(
    learning_rate: ScalarOrSchedule = 1.0,
    init_step: tuple[str, float] | None = None,
    eps: float = 1e-8,
    weight_decay: float | None = None,
    mask: Any = None,
    *,
    reps_rel: float = 1e-6,
    init_eta: float | None = None,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""DoG: SGD with the distance-over-gradients step size (Ivgi et al., 2023).

    $$
        \bar r_t = \max(\bar r_{t-1}, \|x_t - x_0\|),\quad \bar r_{-1} = r_\epsilon (1 + \|x_0\|),\quad
        G_t = \epsilon + \sum_{i \le t} \|g_i\|^2,\quad
        x_{t+1} = x_t - c\,\frac{\bar r_t}{\sqrt{G_t}}\, g_t
    $$

    One global ``rbar``/``G`` over the whole pytree, exactly as ``dog.DoG`` of the
    ``dog-optimizer`` package (one parameter group) and ``optax.contrib.dog`` (same name, argument
    order and trajectory). Returns signed updates (add them).

    Args:
      learning_rate: the multiplier ``c`` (a float or an optax schedule of the step count);
        the authors advise against changing it from 1.
      init_step: optax.contrib's ``(kind, value)``: ``("heuristic", r)`` is ``reps_rel=r``,
        ``("distance", r)`` starts ``rbar`` at ``r``, ``("learning_rate", eta)`` is ``init_eta=eta``.
        None: ``reps_rel``.
      eps: added once to the gradient sum ``G``.
      weight_decay: coupled L2 decay, ``g += weight_decay * x`` before everything else (None or 0: none).
      mask: the leaves that get weight decay, as in ``optax.add_decayed_weights``: a tree of bools
        shaped like the params, or a callable ``params -> tree``; None decays every leaf.
      reps_rel: relative initial distance ``r_eps``: the first step is
        ``reps_rel * (1 + ||x_0||) / sqrt(||g_0||^2 + eps)``. See `DOG_PRESETS`.
      init_eta: if set, the first step size, overriding ``reps_rel`` (``rbar`` then starts at 0).
      axis_name: mapped axis over which parameters/states are sharded under ``shard_map`` or
        ``pmap``; the norms are then summed over it so every device sees the global step size.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `DoGState`; ``update`` needs
      ``params`` (extra keyword arguments, such as optax's ``value=``, are ignored).

    Raises:
      ValueError: a concrete hyperparameter out of range (NaN included), a learning-rate
        schedule that is negative or NaN at step 0, NaN/Inf in the parameters given to ``init``.
      TypeError: a hyperparameter of the wrong type; integer or complex parameters or updates.

    Bad values at run time (the rule of ``optim._lrfree``): a gradient with a NaN/Inf entry,
    or one whose square overflows the float32 state, a learning rate (schedule value) that is
    NaN, infinite or negative, or an injected hyperparameter out of range skips the step:
    zero updates, state unchanged, ``num_nonfinite`` + 1; the schedule is evaluated at the
    number of ``update`` calls, so it moves on. float16/bfloat16 parameters keep float32 state.

    Example:
      >>> import jax.numpy as jnp, optax, optim
      >>> tx = optax.chain(optim.dog(), optim.polynomial_decay_averaging())
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(2 * params, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> x_eval = optim.averaged_params(state)

    References:
      Ivgi, Hinder, Carmon, [DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
      Schedule](https://arxiv.org/abs/2302.12022), ICML 2023.
    """
    reps_rel, init_distance, step_eta = _init_step(init_step, reps_rel)
    return _build(
        "dog", reps_rel=reps_rel, learning_rate=learning_rate, weight_decay=weight_decay, eps=eps,
        init_eta=init_eta if step_eta is None else step_eta, init_distance=init_distance, mask=mask,
        axis_name=axis_name,
    )


def ldog(
    learning_rate: ScalarOrSchedule = 1.0,
    init_step: tuple[str, float] | None = None,
    eps: float = 1e-8,
    weight_decay: float | None = None,
    mask: Any = None,
    *,
    reps_rel: float = 1e-6,
    init_eta: float | None = None,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Layer-wise DoG: the `dog` rule with one ``rbar``/``G`` per pytree leaf.

    $$
        \eta^{(l)}_t = c\,\frac{\max_{i \le t}\|x^{(l)}_i - x^{(l)}_0\| \vee r_\epsilon(1+\|x^{(l)}_0\|)}
        {\sqrt{\epsilon + \sum_{i \le t}\|g^{(l)}_i\|^2}}
    $$

    As ``dog.LDoG``; a scalar (shape ``()``) leaf keeps its shape (unlike
    ``optax.scale_by_distance_over_gradients``). Arguments (and their order) as in `dog`; with
    ``axis_name`` each leaf's norms are summed over the shards of that leaf. A tensor whose
    gradient has a NaN/Inf entry is skipped alone (zero update, ``rbar``/``G`` kept); see the
    module docstring.

    Raises:
      ValueError: a concrete hyperparameter out of range (NaN included), a learning-rate
        schedule that is negative or NaN at step 0, NaN/Inf in the parameters given to ``init``.
      TypeError: a hyperparameter of the wrong type; integer or complex parameters or updates.

    Bad values at run time (the rule of ``optim._lrfree``): a gradient with a NaN/Inf entry,
    or one whose square overflows the float32 state, a learning rate (schedule value) that is
    NaN, infinite or negative, or an injected hyperparameter out of range skips the step:
    zero updates, state unchanged, ``num_nonfinite`` + 1; the schedule is evaluated at the
    number of ``update`` calls, so it moves on. float16/bfloat16 parameters keep float32 state.

    Example:
      >>> import jax.numpy as jnp, optim
      >>> tx = optim.ldog()
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(())}
      >>> updates, state = tx.update(params, tx.init(params), params)

    References:
      Ivgi, Hinder, Carmon, [DoG is SGD's Best Friend](https://arxiv.org/abs/2302.12022), 2023.
    """
    reps_rel, init_distance, step_eta = _init_step(init_step, reps_rel)
    return _build(
        "ldog", reps_rel=reps_rel, learning_rate=learning_rate, weight_decay=weight_decay, eps=eps,
        init_eta=init_eta if step_eta is None else step_eta, init_distance=init_distance, mask=mask,
        axis_name=axis_name,
    )


def dowg(
    learning_rate: ScalarOrSchedule = 1.0,
    init_estim_sq_dist: float | None = None,
    eps: float = 1e-8,
    weight_decay: float | None = None,
    mask: Any = None,
    *,
    reps_rel: float = 1e-6,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""DoWG: distance over *weighted* gradients (Khaled, Mishchenko, Jin, 2023, Algorithm 1).

    $$
        \bar r_t = \max(\bar r_{t-1}, \|x_t - x_0\|),\quad
        v_t = v_{t-1} + \bar r_t^2 \|g_t\|^2,\quad
        x_{t+1} = x_t - c\,\frac{\bar r_t^2}{\sqrt{v_t} + \epsilon}\, g_t
    $$

    with ``v_{-1} = 0`` and ``rbar_{-1} = r_eps``. The paper leaves ``r_eps`` to the user;
    by default it is DoG's ``reps_rel * (1 + ||x_0||)``, or ``sqrt(init_estim_sq_dist)`` when given.
    The argument order is ``optax.contrib.dowg``'s; its defaults differ (``eps=1e-4``, which is also
    its initial squared distance): ``DOWG_PRESETS["optax"]`` reproduces it.

    Args:
      learning_rate: multiplier ``c`` (float or schedule); 1 in the paper.
      init_estim_sq_dist: the initial squared distance ``r_eps^2``; overrides ``reps_rel``.
      eps: added to ``sqrt(v_t)`` (the paper has none; it only guards a zero gradient).
      weight_decay: coupled L2 decay added to the gradient (None or 0: none).
      mask: the leaves that get weight decay (see `dog`).
      reps_rel: relative initial distance, used when ``init_estim_sq_dist`` is None.
      axis_name: mapped axis for exact global norms under ``shard_map``/``pmap``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `DoGState` (``grad_sum`` holds ``v_t``).

    Raises:
      ValueError: a concrete hyperparameter out of range (NaN included), a learning-rate
        schedule that is negative or NaN at step 0, NaN/Inf in the parameters given to ``init``.
      TypeError: a hyperparameter of the wrong type; integer or complex parameters or updates.

    Bad values at run time (the rule of ``optim._lrfree``): a gradient with a NaN/Inf entry,
    or one whose square overflows the float32 state, a learning rate (schedule value) that is
    NaN, infinite or negative, or an injected hyperparameter out of range skips the step:
    zero updates, state unchanged, ``num_nonfinite`` + 1; the schedule is evaluated at the
    number of ``update`` calls, so it moves on. float16/bfloat16 parameters keep float32 state.

    Example:
      >>> import jax.numpy as jnp, optim
      >>> tx = optim.dowg(**optim.DOWG_PRESETS["optax"])
      >>> params = jnp.array([1.0, 2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)

    References:
      Khaled, Mishchenko, Jin, [DoWG Unleashed: An Efficient Universal Parameter-Free Gradient Descent
      Method](https://arxiv.org/abs/2305.16284), NeurIPS 2023.
    """
    return _build(
        "dowg", reps_rel=reps_rel, learning_rate=learning_rate, weight_decay=weight_decay, eps=eps,
        init_eta=None, init_distance=None, init_sq_distance=init_estim_sq_dist, mask=mask, axis_name=axis_name,
    )


class PolynomialDecayAveragingState(NamedTuple):
    """State of `polynomial_decay_averaging`."""

    count: jax.Array  # shape=(), int32: the averager's t, starting at 1.
    averaged_params: Any  # xbar_t: same tree and shapes as params, float32 at least.


def polynomial_decay_averaging(gamma: float = 8.0) -> optax.GradientTransformationExtraArgs:
    r"""Polynomial-decay iterate averaging (Shamir & Zhang, 2013), as recommended for DoG.

    $$
        \bar x_t = \Bigl(1 - \frac{\gamma + 1}{t + \gamma}\Bigr)\bar x_{t-1}
                   + \frac{\gamma + 1}{t + \gamma}\, x_t,\qquad t = 1, 2, \ldots
    $$

    where ``x_t = params + updates`` is the iterate after step ``t`` (so ``xbar_1 = x_1``),
    matching ``dog.PolynomialDecayAverager`` stepped after each optimizer step. The updates
    pass through unchanged: chain it **last**, after the optimizer, and read the average
    with `averaged_params`. Costs one copy of the parameters.

    Args:
      gamma: decay power; ``gamma=0`` is the uniform average, larger forgets faster.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `PolynomialDecayAveragingState`.

    Example:
      >>> import jax.numpy as jnp, optax, optim
      >>> tx = optax.chain(optim.ldog(), optim.polynomial_decay_averaging(gamma=8.0))
      >>> params = jnp.array([1.0, 2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)
      >>> xbar = optim.averaged_params(state)

    References:
      Shamir, Zhang, [Stochastic Gradient Descent for Non-smooth Optimization: Convergence Results and Optimal
      Averaging Schemes](https://arxiv.org/abs/1212.1824), ICML 2013.
    """
    V.nonnegative("gamma", gamma, "The DoG authors use 8.")

    def init_fn(params):
        check_init("polynomial_decay_averaging", params)
        return PolynomialDecayAveragingState(jnp.ones((), jnp.int32), copy_to_state(params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_update_args("polynomial_decay_averaging", updates, params, state.averaged_params,
                          "the params given to `init`")
        t = state.count.astype(_tree.accumulation_dtype())
        w = (gamma + 1) / (t + gamma)
        avg = jax.tree.map(
            lambda a, p, u: ((1 - w) * a + w * (p + u)).astype(a.dtype), state.averaged_params, params, updates
        )
        return updates, PolynomialDecayAveragingState(optax.safe_increment(state.count), avg)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def averaged_params(state: Any) -> Any:
    """The polynomial-decay average held anywhere inside ``state`` (e.g. an ``optax.chain`` state).

    Raises:
      ValueError: if ``state`` holds no, or more than one, `polynomial_decay_averaging` state.
    """
    return V.find_state(state, PolynomialDecayAveragingState,
                        "`state` holds {found} polynomial_decay_averaging states; expected exactly one. "
                        "Chain optim.polynomial_decay_averaging() once, after the optimizer.").averaged_params
