"""COCOB-Backprop (Orabona & Tommasi, 2017): per-coordinate coin betting, no learning rate.

Every coordinate bets a fraction of its accumulated reward on the direction of the summed
negative gradients. There is no global reduction, so sharded parameters need no
``axis_name`` (the argument is accepted for a uniform API and has no effect).

Initial values as in the authors' TensorFlow code and ``optax.contrib.cocob``: ``L_0 = eps``
(the paper's 0 would divide 0 by 0 on a coordinate whose gradients are all zero),
``G_0 = R_0 = theta_0 = 0``.

Non-finite gradients: a coordinate whose gradient entry is NaN/Inf keeps its state and
gets a zero update for that step (the other coordinates step normally), so no NaN enters
``L``, ``G``, ``R`` or ``theta``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _tree
from optim._lrfree import check_update_args, is_static_zero
from optim._validate import check_nonnegative, check_positive


class COCOBState(NamedTuple):
    """State of :func:`cocob`: five copies of the parameters."""

    count: jax.Array  # shape=(), int32: steps taken.
    params0: Any  # w_1: the initial params.
    theta: Any  # minus the sum of gradients.
    max_grad: Any  # L: running max of |g| (from eps).
    abs_grad_sum: Any  # G: sum of |g|.
    reward: Any  # R: max(R - g (w - w_1), 0).


def cocob(
    alpha: float = 100.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformation:
    r"""COCOB-Backprop, Algorithm 2 of Orabona & Tommasi (2017), per coordinate.

    .. math::
        L &\leftarrow \max(L, |g|),\quad G \leftarrow G + |g|,\quad
        R \leftarrow \max(R - g\,(w - w_1), 0),\quad \theta \leftarrow \theta - g \\
        w &\leftarrow w_1 + \frac{\theta}{L \max(G + L, \alpha L)}\,(L + R)

    Returns ``w_new - w``, so chain it **last** (clipping or decay go before it).

    Args:
      alpha: caps the bet early on (``alpha L`` in the denominator); the paper uses 100.
      eps: initial ``L``.
      weight_decay: coupled L2 decay added to the gradient.
      axis_name: accepted for a uniform API; COCOB has no global reduction.

    Returns:
      An ``optax.GradientTransformation`` with :class:`COCOBState`; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optim
      >>> tx = optim.cocob()
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Orabona, Tommasi, `Training Deep Networks without Learning Rates Through Coin Betting
      <https://arxiv.org/abs/1705.07795>`_, NeurIPS 2017.
    """
    del axis_name  # per-coordinate: nothing to reduce
    check_positive("alpha", alpha, "The paper uses 100.")
    check_positive("eps", eps, "It is the initial L; the reference uses 1e-8.")
    check_nonnegative("weight_decay", weight_decay)
    coupled = not is_static_zero(weight_decay)

    def init_fn(params):
        def zeros():  # fresh buffers per field, so params and state can all be donated
            return jax.tree.map(jnp.zeros_like, params)

        return COCOBState(
            jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), zeros(),
            jax.tree.map(lambda p: jnp.full_like(p, eps), params), zeros(), zeros(),
        )

    def leaf(g, w, w1, theta, big_l, big_g, r):
        ok = jnp.isfinite(g)
        g = jnp.where(ok, g, 0)  # a zero gradient leaves theta, L, G and r (>= 0) as they are
        big_l_new = jnp.maximum(big_l, jnp.abs(g))
        big_g_new = big_g + jnp.abs(g)
        r_new = jnp.maximum(r - g * (w - w1), 0)
        theta_new = theta - g
        bet = theta_new / (big_l_new * jnp.maximum(big_g_new + big_l_new, alpha * big_l_new)) * (big_l_new + r_new)
        u = jnp.where(ok, (w1 - w) + bet, 0)
        return tuple(x.astype(o.dtype) for x, o in
                     ((u, w), (theta_new, theta), (big_l_new, big_l), (big_g_new, big_g), (r_new, r)))

    def update_fn(updates, state, params=None):
        check_update_args("cocob", updates, params, state.params0, "the params given to `init`")
        grads = updates
        if coupled:
            grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        out = jax.tree.map(leaf, grads, params, state.params0, state.theta, state.max_grad, state.abs_grad_sum,
                           state.reward)
        treedef = jax.tree.structure(params)
        u, theta, big_l, big_g, r = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out)))
        return u, COCOBState(optax.safe_increment(state.count), state.params0, theta, big_l, big_g, r)

    return optax.GradientTransformation(init_fn, update_fn)
