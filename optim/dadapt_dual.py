"""D-Adaptation in dual-averaging form (Defazio & Mishchenko, 2023): SGD and AdaGrad.

``x = x_0 - s`` (SGD) or ``x_0 - s / (sqrt(alpha) + eps)`` (AdaGrad) with ``s`` the sum of the
``dlr``-scaled gradients, optionally mixed with the previous iterate by ``momentum``. Faithful to
``dadaptation`` 3.2 (``DAdaptSGD``, ``DAdaptAdaGrad``; one parameter group), defaults included;
neither has an optax counterpart. The skip rule for bad values and the dtypes are those of
``optim.dadapt`` (see ``optim._lrfree``); the shared D-Adaptation helpers live there.
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
    Gate,
    ScalarOrSchedule,
    check_init,
    check_update_args,
    commit,
    copy_to_state,
    coupled_decay,
    fits,
    is_static_zero,
    learning_rate_at,
    schedule_step,
    zeros_like_state,
)
from optim.dadapt import _check_common, _grow, _safe_div
from optim.presets import PRESETS

#: Named settings for `dadapt_sgd` (sources in ``optim.presets``).
DADAPT_SGD_PRESETS = PRESETS["dadapt_sgd"]


def _check_momentum(momentum):
    return V.interval("momentum", momentum, 0.0, 1.0, lo_closed=True, hi_closed=False,
                      hint="Use 0 (the reference default) or 0.9.")


# ----------------------------------------------------------------------------- SGD


class DAdaptSGDState(NamedTuple):
    """State of `dadapt_sgd`. Scalars are float32 (float64 under x64)."""

    count: jax.Array  # shape=(), int32: steps taken.
    num_nonfinite: jax.Array  # shape=(), int32: steps skipped for a non-finite gradient.
    d: jax.Array  # shape=(): the distance estimate.
    numerator_weighted: jax.Array  # shape=(): sum of dlr * <g, s>.
    g0_norm: jax.Array  # shape=(): ||g_0|| of the first (raw, nonzero) gradient; 0 before it.
    grad_sum: Any  # s = sum of dlr * g: tree like params.
    params0: Any  # x0: the initial params.


def dadapt_sgd(
    learning_rate: ScalarOrSchedule = 1.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    d0: float = 1e-6,
    growth_rate: float = math.inf,
    *,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""D-Adapted SGD in dual-averaging form (``dadaptation.DAdaptSGD``).

    With ``dlr = d * lr / ||g_0||``:

    $$
        n \leftarrow n + \mathrm{dlr}\,\langle g, s\rangle,\quad s \leftarrow s + \mathrm{dlr}\, g,\quad
        d \leftarrow \max\bigl(d, \min(2n/\|s\|_2,\ d\cdot\mathrm{growth})\bigr),\quad
        x \leftarrow \mu x + (1-\mu)(x_0 - s)
    $$

    Args:
      learning_rate: multiplier on ``d`` (float or schedule of the step count); use 1.0.
      momentum: ``mu`` in [0, 1). The reference default 0 can diverge on small non-convex
        networks (it does in PyTorch too); ``DADAPT_SGD_PRESETS["momentum"]`` uses 0.9.
      weight_decay: coupled L2 decay added to the gradient. As in the reference, ``||g_0||``
        is measured on the raw gradient, without it.
      d0: initial ``d`` (> 0).
      growth_rate: ``d`` grows at most by this factor per step.
      axis_name: mapped axis over which params/state are sharded (``shard_map``/``pmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `DAdaptSGDState`; ``update`` needs ``params``.

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
      >>> tx = optim.dadapt_sgd(momentum=0.9)
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)

    References:
      Defazio, Mishchenko, [Learning-Rate-Free Learning by D-Adaptation](https://arxiv.org/abs/2301.07733), ICML 2023.
    """
    hp_ok = V.all_of(_check_common(learning_rate, weight_decay, d0, growth_rate), _check_momentum(momentum))
    coupled = not is_static_zero(weight_decay)

    def init_fn(params):
        check_init("dadapt_sgd", params)
        acc = _tree.accumulation_dtype()
        return DAdaptSGDState(
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.asarray(d0, acc), jnp.zeros((), acc),
            jnp.zeros((), acc), zeros_like_state(params), copy_to_state(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax.contrib does
        check_update_args("dadapt_sgd", updates, params, state.grad_sum, "the params given to `init`")
        lr, lr_ok = learning_rate_at(learning_rate, schedule_step(state))
        # the first applied step fixes ||g_0|| (the reference takes step 0's, even if 0); a skipped
        # step leaves it 0, so the next finite gradient sets it
        g_norm = _tree.tree_norm(updates, axis_name)  # ||g_0|| until it is set; the overflow test always
        g0_norm = jnp.where(state.g0_norm > 0, state.g0_norm, g_norm)
        d = state.d
        dlr = _safe_div(d * lr, g0_norm)  # 0 while every gradient so far was 0: no signal, no step
        grads = coupled_decay(updates, params, weight_decay if coupled else 0.0, state.grad_sum)
        num, sk_sq = _tree.tree_reduce_sum(
            lambda g, s: (g * s, jnp.square((s + dlr * g).astype(s.dtype))),
            grads, state.grad_sum, axis_name=axis_name,
        )
        numerator_weighted = state.numerator_weighted + dlr * num
        # lr == 0 or no gradient signal yet: the reference returns before changing anything
        active = (sk_sq > 0) & (lr > 0)
        representable = fits(g_norm * g_norm, state.grad_sum)
        gate = Gate.of(jnp.isfinite(numerator_weighted) & jnp.isfinite(sk_sq) & representable & lr_ok & hp_ok, active)
        d_new = _grow(d, _safe_div(2 * numerator_weighted, jnp.sqrt(sk_sq)), growth_rate, active)
        dlr_t = gate.coef(dlr)
        grad_sum = jax.tree.map(lambda s, g: (s + dlr_t * g).astype(s.dtype), state.grad_sum, gate.mask(grads))
        new_updates = jax.tree.map(
            lambda x0, s, p: ((1 - momentum) * ((x0 - p) - s)).astype(p.dtype), state.params0, grad_sum, params
        )
        stepped = DAdaptSGDState(state.count, state.num_nonfinite, d_new, numerator_weighted, g0_norm, grad_sum,
                                 state.params0)
        return commit(gate, new_updates, stepped, state, gated=("grad_sum",))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- AdaGrad

_ALPHA0 = 1e-6  # the reference's initial AdaGrad accumulator (fixed, independent of eps)


class DAdaptAdaGradState(NamedTuple):
    """State of `dadapt_adagrad`. Scalars are float32 (float64 under x64)."""

    count: jax.Array  # shape=(), int32: steps taken.
    num_nonfinite: jax.Array  # shape=(), int32: steps skipped for a non-finite gradient.
    d: jax.Array  # shape=(): the distance estimate.
    gsq_weighted: jax.Array  # shape=(): sum of dlr^2 * sum(g^2 / (sqrt(alpha) + eps)).
    alpha: Any  # AdaGrad's sum of g^2 (from 1e-6): tree like params.
    grad_sum: Any  # s = sum of dlr * g: tree like params.
    params0: Any  # x0: the initial params.


def dadapt_adagrad(
    learning_rate: ScalarOrSchedule = 1.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-6,
    d0: float = 1e-6,
    growth_rate: float = math.inf,
    *,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""D-Adapted AdaGrad in dual-averaging form (``dadaptation.DAdaptAdaGrad``, dense gradients).

    With ``dlr = d * lr`` and ``a = sqrt(alpha) + eps``:

    $$
        \alpha \leftarrow \alpha + g^2,\quad s \leftarrow s + \mathrm{dlr}\,g,\quad
        \gamma \leftarrow \gamma + \mathrm{dlr}^2 \textstyle\sum g^2/a,\quad
        \hat d = \bigl(\textstyle\sum s^2/a - \gamma\bigr)/\|s\|_1,\quad
        x \leftarrow \mu x + (1-\mu)(x_0 - s/a)
    $$

    and ``d <- max(d, min(d_hat, d * growth))``. The reference keeps ``sum s^2/a`` and
    ``||s||_1`` as running sums of per-step changes; they telescope to the values computed
    here directly (one fewer pass over the state). The reference README notes that it
    adapts slowly and recommends `dadapt_adam`.

    Args:
      learning_rate: multiplier on ``d`` (float or schedule); use 1.0.
      momentum: ``mu`` in [0, 1).
      weight_decay: coupled L2 decay added to the gradient.
      eps: added to ``sqrt(alpha)`` (reference default 1e-6).
      d0: initial ``d`` (> 0).
      growth_rate: ``d`` grows at most by this factor per step.
      axis_name: mapped axis over which params/state are sharded (``shard_map``/``pmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `DAdaptAdaGradState`; ``update`` needs ``params``.

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
      >>> tx = optim.dadapt_adagrad()
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)

    References:
      Defazio, Mishchenko, [Learning-Rate-Free Learning by D-Adaptation](https://arxiv.org/abs/2301.07733), ICML 2023.
    """
    hp_ok = V.all_of(_check_common(learning_rate, weight_decay, d0, growth_rate), _check_momentum(momentum),
                     V.positive("eps", eps, "The reference default is 1e-6."))
    coupled = not is_static_zero(weight_decay)

    def init_fn(params):
        check_init("dadapt_adagrad", params)
        acc = _tree.accumulation_dtype()
        alpha0 = jax.tree.map(lambda z: jnp.full_like(z, _ALPHA0), zeros_like_state(params))
        return DAdaptAdaGradState(
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.asarray(d0, acc), jnp.zeros((), acc),
            alpha0, zeros_like_state(params), copy_to_state(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax.contrib does
        check_update_args("dadapt_adagrad", updates, params, state.grad_sum, "the params given to `init`")
        lr, lr_ok = learning_rate_at(learning_rate, schedule_step(state))
        d = state.d
        dlr = d * lr
        grads = coupled_decay(updates, params, weight_decay if coupled else 0.0, state.grad_sum)

        def sums(g, a, s):  # with the new alpha and s
            a, s = (a + jnp.square(g)).astype(a.dtype), (s + dlr * g).astype(s.dtype)
            return jnp.square(g) / (jnp.sqrt(a) + eps), jnp.square(s) / (jnp.sqrt(a) + eps), jnp.abs(s)

        g_sq, sk_sq, sk_l1 = _tree.tree_reduce_sum(sums, grads, state.alpha, state.grad_sum, axis_name=axis_name)
        gsq_weighted = state.gsq_weighted + dlr * dlr * g_sq
        # lr == 0 or no gradient signal yet: the reference returns before changing anything
        active = sk_l1 > 0
        gate = Gate.of(jnp.isfinite(gsq_weighted) & jnp.isfinite(sk_sq) & jnp.isfinite(sk_l1) & lr_ok & hp_ok,
                       active)
        d_new = _grow(d, _safe_div(sk_sq - gsq_weighted, sk_l1), growth_rate, active & (lr > 0))
        grads, dlr_t = gate.mask(grads), gate.coef(dlr)
        alpha = jax.tree.map(lambda a, g: (a + jnp.square(g)).astype(a.dtype), state.alpha, grads)
        grad_sum = jax.tree.map(lambda s, g: (s + dlr_t * g).astype(s.dtype), state.grad_sum, grads)
        new_updates = jax.tree.map(
            lambda x0, s, a, p: ((1 - momentum) * ((x0 - p) - s / (jnp.sqrt(a) + eps))).astype(p.dtype),
            state.params0, grad_sum, alpha, params,
        )
        stepped = DAdaptAdaGradState(state.count, state.num_nonfinite, d_new, gsq_weighted, alpha, grad_sum,
                                     state.params0)
        return commit(gate, new_updates, stepped, state, gated=("alpha", "grad_sum"))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
