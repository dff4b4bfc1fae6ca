"""COCOB-Backprop (Orabona & Tommasi, 2017): per-coordinate coin betting, no learning rate.

Every coordinate bets a fraction of its accumulated reward on the direction of the summed
negative gradients. There is no global reduction, so sharded parameters need no
``axis_name`` (the argument is accepted for a uniform API and has no effect).

Initial values as in the authors' TensorFlow code and ``optax.contrib.cocob``: ``L_0 = eps``
(the paper's 0 would divide 0 by 0 on a coordinate whose gradients are all zero),
``G_0 = R_0 = theta_0 = 0``.

Non-finite gradients: a coordinate whose gradient entry is NaN/Inf, or so large that the
bet's denominator ``L max(G + L, alpha L)`` (about ``2 alpha g^2``) could overflow the state
dtype (``|g| > sqrt(max / (2 max(alpha, 1)))``: 1.3e18 in float32 with ``alpha = 100``), keeps
its state and gets a zero update for
that step (the other coordinates step normally), so no NaN enters ``L``, ``G``, ``R`` or
``theta`` and a coordinate hit by a ``1e30`` gradient carries on as if it had not come. A
finite but large gradient that fits is the algorithm's business: ``L`` is a running max, so
every later bet on that coordinate is scaled by it (clip gradients before COCOB if outliers
occur). State buffers are float32 at least (float16/bfloat16 parameters train like float32
ones); integer parameters raise ``TypeError``, NaN initial parameters ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _tree
from optim import _validate as V
from optim._lrfree import (
    ScalarOrSchedule,
    check_init,
    check_learning_rate,
    check_mask,
    check_update_args,
    copy_to_state,
    coupled_decay,
    learning_rate_at,
    zeros_like_state,
)


class COCOBState(NamedTuple):
    """State of `cocob`: five copies of the parameters."""

    count: jax.Array  # shape=(), int32: steps taken.
    params0: Any  # w_1: the initial params.
    theta: Any  # minus the sum of gradients.
    max_grad: Any  # L: running max of |g| (from eps).
    abs_grad_sum: Any  # G: sum of |g|.
    reward: Any  # R: max(R - g (w - w_1), 0).


def cocob(
    learning_rate: ScalarOrSchedule = 1.0,
    alpha: float = 100.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""COCOB-Backprop, Algorithm 2 of Orabona & Tommasi (2017), per coordinate.

    $$
    \begin{aligned}
        L &\leftarrow \max(L, |g|),\quad G \leftarrow G + |g|,\quad
        R \leftarrow \max(R - g\,(w - w_1), 0),\quad \theta \leftarrow \theta - g \\
        w &\leftarrow w_1 + \frac{\theta}{L \max(G + L, \alpha L)}\,(L + R)
    \end{aligned}
    $$

    Returns ``w_new - w``, so chain it **last** (clipping or decay go before it). Name, argument
    order and trajectory are ``optax.contrib.cocob``'s.

    Args:
      learning_rate: multiplies the gradient before the bet, as optax.contrib does (a float or a
        schedule of the step count); COCOB is nearly invariant to it (only ``L_0 = eps`` is not
        scaled), 1 in the paper.
      alpha: caps the bet early on (``alpha L`` in the denominator); the paper uses 100.
      eps: initial ``L``.
      weight_decay: coupled L2 decay added to the gradient (before ``learning_rate``).
      mask: the leaves that get weight decay, as in ``optax.add_decayed_weights`` (None: all).
      axis_name: accepted for a uniform API; COCOB has no global reduction.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `COCOBState`; ``update`` needs
      ``params`` (extra keyword arguments are ignored).

    Raises:
      ValueError: a concrete hyperparameter out of range (NaN included), NaN/Inf in the
        parameters given to ``init``.
      TypeError: a hyperparameter of the wrong type; integer or complex parameters or updates.

    Bad values at run time: a coordinate whose gradient entry is NaN/Inf or would overflow the
    bet (see the module docstring) keeps its state and gets a zero update; an injected
    hyperparameter out of range zeroes every update. float16/bfloat16 parameters keep float32 state.

    Example:
      >>> import jax.numpy as jnp, optax, optim
      >>> tx = optim.cocob()
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Orabona, Tommasi, [Training Deep Networks without Learning Rates Through Coin
      Betting](https://arxiv.org/abs/1705.07795), NeurIPS 2017.
    """
    del axis_name  # per-coordinate: nothing to reduce
    check_mask(mask)
    hp_ok = V.all_of(
        check_learning_rate(learning_rate, "The paper has none (1); COCOB is nearly invariant to it."),
        V.positive("alpha", alpha, "The paper uses 100."),
        V.positive("eps", eps, "It is the initial L; the reference uses 1e-8."),
        V.nonnegative("weight_decay", weight_decay, "0 is the reference default."),
    )
    scaled = callable(learning_rate) or V.concrete(learning_rate) != 1.0

    def init_fn(params):
        check_init("cocob", params)
        return COCOBState(
            jnp.zeros((), jnp.int32), copy_to_state(params), zeros_like_state(params),
            jax.tree.map(lambda z: jnp.full_like(z, eps), zeros_like_state(params)), zeros_like_state(params),
            zeros_like_state(params),
        )

    def limit(dtype):
        big = float(jnp.finfo(dtype).max)
        a = V.concrete(alpha)
        return math.sqrt(big / (2 * max(a, 1.0))) if a is not None else jnp.sqrt(big / (2 * jnp.maximum(alpha, 1.0)))

    def leaf(g, w, w1, theta, big_l, big_g, r, step_ok):
        # a coordinate whose gradient is NaN/Inf or too large for the bet's denominator (about 2 alpha g^2
        # must fit the state dtype) takes a zero gradient, which leaves theta, L, G and r (>= 0) as they are.
        # The test looks at g alone: tying it to the state (den itself) made XLA recompute every output.
        ok = jnp.abs(g) <= limit(theta.dtype)  # NaN compares False
        if step_ok is not True:
            ok = ok & step_ok
        g = jnp.where(ok, g, 0)
        big_l_new = jnp.maximum(big_l, jnp.abs(g))
        big_g_new = big_g + jnp.abs(g)
        r_new = jnp.maximum(r - g * (w - w1), 0)
        theta_new = theta - g
        bet = theta_new / (big_l_new * jnp.maximum(big_g_new + big_l_new, alpha * big_l_new)) * (big_l_new + r_new)
        u = jnp.where(ok, (w1 - w) + bet, 0)
        return tuple(x.astype(o.dtype) for x, o in
                     ((u, w), (theta_new, theta), (big_l_new, big_l), (big_g_new, big_g), (r_new, r)))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax.contrib does
        check_update_args("cocob", updates, params, state.params0, "the params given to `init`")
        treedef = jax.tree.structure(params)
        if treedef.num_leaves == 0:  # an empty tree: nothing to bet on
            return updates, state._replace(count=optax.safe_increment(state.count))
        grads = coupled_decay(updates, params, weight_decay, state.theta, mask)
        step_ok = hp_ok
        if scaled:  # optax.contrib's scale_by_learning_rate(lr, flip_sign=False) before the bet
            lr, lr_ok = learning_rate_at(learning_rate, state.count)
            grads = jax.tree.map(lambda g: lr.astype(g.dtype) * g, grads)
            step_ok = V.all_of(step_ok, lr_ok)
        out = jax.tree.map(lambda *a: leaf(*a, step_ok), grads, params, state.params0, state.theta, state.max_grad,
                           state.abs_grad_sum, state.reward)
        u, theta, big_l, big_g, r = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out)))
        return u, COCOBState(optax.safe_increment(state.count), state.params0, theta, big_l, big_g, r)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
