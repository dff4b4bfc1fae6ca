"""D-Adaptation (Defazio & Mishchenko, 2023): Adam and Lion with a learned step size.

Each D-Adaptation transform keeps a lower bound ``d`` on the distance ``||x_0 - x_*||`` built from
a weighted sum of ``<g_k, s_k>`` (the numerator) over the size of the accumulated step ``s``
(the denominator), and uses ``dlr = d * lr`` as its step size. They are faithful to the
``dadaptation`` 3.2 package (one parameter group), defaults included. This module has the
exponential-moving-average forms (Adam, Lion) and the helpers of the family;
``optim.dadapt_dual`` has the dual-averaging forms (SGD, AdaGrad).

``dadapt_adamw`` is ``optax.contrib.dadapt_adamw`` under the same name and argument order: D-Adapted
Adam with Adam's bias correction and decoupled weight decay (what optax always does; the reference
defaults are neither, about 0.95 relative parameter difference after a few hundred steps). Unlike
optax it keeps ``d`` in float32 at least (optax: the lowest parameter dtype) and has ``growth_rate``
and ``axis_name``. SGD, AdaGrad and Lion have no optax counterpart.

Non-finite gradients: a NaN/Inf gradient entry, or one whose square overflows the state
dtype (``|g| > 1.8e19`` in float32), makes the step's global sums non-finite; the step is
then skipped (zero updates, state unchanged, ``num_nonfinite`` incremented), so ``d`` never
absorbs a NaN and a NaN first gradient does not fix ``||g_0||`` (the first finite one does).
So is a step whose learning rate (a schedule's value) is NaN, infinite or negative; the
schedule is evaluated at the number of ``update`` calls, so it moves on. A step at learning
rate 0 leaves ``d`` unchanged. State buffers are float32 at least (float16/bfloat16
parameters train like float32 ones); integer parameters raise ``TypeError``, NaN initial
parameters ``ValueError``. The full rule is in ``optim._lrfree``.
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
    adam_step_correction,
    check_betas,
    check_growth_rate,
    check_init,
    check_learning_rate,
    check_update_args,
    commit,
    coupled_decay,
    fits,
    is_static_zero,
    learning_rate_at,
    schedule_step,
    zeros_like_state,
)
from optim.presets import PRESETS

#: Named settings for `dadapt_adam` (sources in ``optim.presets``).
DADAPT_ADAM_PRESETS = PRESETS["dadapt_adam"]

_D0_HINT = "It is the initial distance estimate; the reference default is 1e-6."


def _check_common(learning_rate, weight_decay, d0, growth_rate=None):
    """The checks every D-Adaptation factory makes; returns the runtime predicate for traced values."""
    return V.all_of(
        check_learning_rate(learning_rate, "D-Adaptation expects 1.0 (times any schedule)."),
        V.nonnegative("weight_decay", weight_decay, "0 is the reference default."),
        V.positive("d0", d0, _D0_HINT),
        True if growth_rate is None else check_growth_rate(growth_rate),
    )


def _grow(d, d_hat, growth_rate, active):
    """``max(d, min(d_hat, d * growth_rate))`` when ``active``, else ``d``."""
    return jnp.where(active, jnp.maximum(d, jnp.minimum(d_hat, d * growth_rate)), d)


def _safe_div(a, b):
    return a / jnp.where(b > 0, b, 1)


# ----------------------------------------------------------------------------- Adam


class DAdaptAdamState(NamedTuple):
    """State of `dadapt_adam`. Scalars are float32 (float64 under x64)."""

    count: jax.Array  # shape=(), int32: steps taken.
    num_nonfinite: jax.Array  # shape=(), int32: steps skipped for a non-finite gradient.
    d: jax.Array  # shape=(): the distance estimate.
    numerator_weighted: jax.Array  # shape=(): sqrt(beta2)-EMA of dlr * <g, s / (sqrt(v) + eps)>.
    exp_avg: Any  # m (already scaled by dlr): tree like params.
    exp_avg_sq: Any  # v: tree like params.
    grad_sum: Any  # s: tree like params.


def dadapt_adam(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decouple: bool = False,
    use_bias_correction: bool = False,
    d0: float = 1e-6,
    growth_rate: float = math.inf,
    *,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""D-Adapted Adam (``dadaptation.DAdaptAdam``).

    With ``dlr = d * lr * bc`` and ``b = sqrt(beta2)``:

    $$
    \begin{aligned}
        n &\leftarrow b\, n + (1-b)\,\mathrm{dlr}\,\langle g, s/(\sqrt v+\epsilon)\rangle,\quad
        m \leftarrow \beta_1 m + (1-\beta_1)\,\mathrm{dlr}\, g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        s \leftarrow b\, s + (1-b)\,\mathrm{dlr}\, g \\
        d &\leftarrow \max\bigl(d, \min(n / ((1-b)\|s\|_1),\ d\cdot\mathrm{growth})\bigr),\quad
        x \leftarrow x - m/(\sqrt v + \epsilon) - \lambda\,\mathrm{dlr}\,x\ (\text{decoupled})
    \end{aligned}
    $$

    ``n`` uses ``s`` and ``v`` from before the step; the new ``d`` takes effect next step.

    Args:
      learning_rate: multiplier on ``d`` (float or schedule of the step count); use 1.0.
      betas: ``(beta1, beta2)``, ``beta1`` in [0, 1), ``beta2`` in (0, 1).
      eps: added to ``sqrt(v)``.
      weight_decay: ``lambda``; added to the gradient (coupled, the reference default) or,
        with ``decouple``, applied AdamW-style scaled by ``dlr``. The README advises 2-4x
        the usual value.
      decouple: AdamW-style decay.
      use_bias_correction: fold ``sqrt(1 - beta2^{k+1}) / (1 - beta1^{k+1})`` into ``dlr``.
      d0: initial ``d`` (> 0).
      growth_rate: ``d`` grows at most by this factor per step.
      axis_name: mapped axis over which params/state are sharded (``shard_map``/``pmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `DAdaptAdamState`; ``update`` needs ``params``.

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
      >>> tx = optim.dadapt_adam()
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Defazio, Mishchenko, [Learning-Rate-Free Learning by D-Adaptation](https://arxiv.org/abs/2301.07733), ICML 2023.

    Warning:
        ``optax.contrib.dadapt_adamw`` is ``DADAPT_ADAM_PRESETS["optax"]``, not the reference defaults.
    """
    hp_ok = _check_common(learning_rate, weight_decay, d0, growth_rate)
    (b1, b2), betas_ok = check_betas(betas)
    hp_ok = V.all_of(hp_ok, betas_ok, V.positive("eps", eps, "The reference default is 1e-8."))
    coupled = not decouple and not is_static_zero(weight_decay)
    decoupled = decouple and not is_static_zero(weight_decay)

    def init_fn(params):
        check_init("dadapt_adam", params)
        acc = _tree.accumulation_dtype()
        return DAdaptAdamState(
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.asarray(d0, acc), jnp.zeros((), acc),
            zeros_like_state(params), zeros_like_state(params), zeros_like_state(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax.contrib does
        check_update_args("dadapt_adam", updates, params, state.exp_avg, "the params given to `init`")
        acc = _tree.accumulation_dtype()
        lr, lr_ok = learning_rate_at(learning_rate, schedule_step(state))
        sb2 = jnp.sqrt(jnp.asarray(b2, acc))
        bc = adam_step_correction(b1, b2, state.count) if use_bias_correction else jnp.ones((), acc)
        d = state.d
        dlr = d * lr * bc
        grads = coupled_decay(updates, params, weight_decay if coupled else 0.0, state.exp_avg_sq)

        # <g, s / (sqrt(v) + eps)> with the old s, v, and ||s_new||_1, in one pass
        num, sk_l1 = _tree.tree_reduce_sum(
            lambda g, s, v: (g * (s / (jnp.sqrt(v) + eps)), jnp.abs((sb2 * s + (dlr * (1 - sb2)) * g).astype(s.dtype))),
            grads, state.grad_sum, state.exp_avg_sq, axis_name=axis_name,
        )
        # ||g||^2 only for the overflow test (v holds g^2): the one extra pass over g of this transform
        representable = fits(_tree.tree_norm_sq(grads, axis_name), state.exp_avg_sq)
        numerator_weighted = sb2 * state.numerator_weighted + (1 - sb2) * dlr * num
        # lr == 0 or no gradient signal yet: the reference returns before changing anything
        active = (lr > 0) & (sk_l1 > 0)
        gate = Gate.of(jnp.isfinite(numerator_weighted) & jnp.isfinite(sk_l1) & representable & lr_ok & hp_ok, active)
        d_new = _grow(d, _safe_div(numerator_weighted, (1 - sb2) * sk_l1), growth_rate, active)
        grads, dlr_t = gate.mask(grads), gate.coef(dlr)
        exp_avg = jax.tree.map(lambda m, g: (gate.decay(b1) * m + (dlr_t * (1 - b1)) * g).astype(m.dtype),
                               state.exp_avg, grads)
        exp_avg_sq = jax.tree.map(lambda v, g: (gate.decay(b2) * v + (1 - b2) * jnp.square(g)).astype(v.dtype),
                                  state.exp_avg_sq, grads)
        grad_sum = jax.tree.map(lambda s, g: (gate.decay(sb2) * s + (dlr_t * (1 - sb2)) * g).astype(s.dtype),
                                state.grad_sum, grads)

        def leaf_update(m, v, p):
            out = -m / (jnp.sqrt(v) + eps)
            if decoupled:
                out = out - (weight_decay * dlr) * p
            return out.astype(p.dtype)

        new_updates = jax.tree.map(leaf_update, exp_avg, exp_avg_sq, params)
        stepped = DAdaptAdamState(state.count, state.num_nonfinite, d_new, numerator_weighted, exp_avg, exp_avg_sq,
                                  grad_sum)
        return commit(gate, new_updates, stepped, state, gated=("exp_avg", "exp_avg_sq", "grad_sum"))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dadapt_adamw(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    growth_rate: float = math.inf,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""D-Adapted AdamW, ``optax.contrib.dadapt_adamw``'s name, arguments and algorithm.

    `dadapt_adam` with ``use_bias_correction=True, decouple=True`` and ``d0=estim_lr0``:
    ``dlr = d * lr * sqrt(1 - beta2^{k+1}) / (1 - beta1^{k+1})`` and the decoupled decay
    ``x <- x - weight_decay * dlr * x``. Equal to optax's trajectory up to rounding (float64: 1e-13
    relative over 200 steps, ``tests/optim/test_optax_dropin.py``); ``d`` stays float32 at least.

    Args:
      learning_rate: multiplier on ``d`` (float or schedule of the step count); use 1.0.
      betas: ``(beta1, beta2)``.
      eps: added to ``sqrt(v)``.
      estim_lr0: the initial ``d`` (the reference's ``d0``).
      weight_decay: decoupled (AdamW) decay, scaled by ``dlr``.
      growth_rate, axis_name: as in `dadapt_adam` (optax has neither).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `DAdaptAdamState`.

    Raises:
      ValueError: a concrete hyperparameter out of range (NaN included), a learning-rate
        schedule that is negative or NaN at step 0, NaN/Inf in the parameters given to ``init``.
      TypeError: a hyperparameter of the wrong type; integer or complex parameters or updates.

    Example:
      >>> import jax.numpy as jnp, optim
      >>> tx = optim.dadapt_adamw(learning_rate=1.0, weight_decay=1e-4)
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)

    References:
      Defazio, Mishchenko, [Learning-Rate-Free Learning by D-Adaptation](https://arxiv.org/abs/2301.07733), ICML 2023.
    """
    return dadapt_adam(learning_rate, betas, eps, weight_decay, decouple=True, use_bias_correction=True, d0=estim_lr0,
                       growth_rate=growth_rate, axis_name=axis_name)


# ----------------------------------------------------------------------------- Lion


class DAdaptLionState(NamedTuple):
    """State of `dadapt_lion`. Scalars are float32 (float64 under x64)."""

    count: jax.Array  # shape=(), int32: steps taken.
    num_nonfinite: jax.Array  # shape=(), int32: steps skipped for a non-finite gradient.
    d: jax.Array  # shape=(): the distance estimate.
    numerator_weighted: jax.Array  # shape=(): sqrt(beta2)-EMA of dlr * <u, s>.
    exp_avg: Any  # m (scaled by dlr): tree like params.
    grad_sum: Any  # s: tree like params.


def dadapt_lion(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    d0: float = 1e-6,
    *,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""D-Adapted Lion (``dadaptation.DAdaptLion``, marked experimental there).

    With ``dlr = d * lr`` and ``b = sqrt(beta2)``:

    $$
    \begin{aligned}
        u &= \mathrm{sign}(\beta_1 m + (1-\beta_1) g),\quad
        x \leftarrow x(1 - \mathrm{dlr}\,\lambda) - \mathrm{dlr}\, u,\quad
        m \leftarrow \beta_2 m + (1-\beta_2)\,\mathrm{dlr}\, g \\
        n &\leftarrow b\,n + (1-b)\,\mathrm{dlr}\langle u, s\rangle,\quad
        s \leftarrow b\,s + (1-b)\,\mathrm{dlr}\, u,\quad
        d \leftarrow \max(d, n/((1-b)\|s\|_1))
    \end{aligned}
    $$

    As in the reference, ``m`` accumulates ``dlr * g`` while ``u`` mixes it with the raw
    ``g`` (users report it learns poorly: dadaptation#35); there is no ``growth_rate``.

    Args:
      learning_rate: multiplier on ``d`` (float or schedule); use 1.0.
      betas: ``(beta1, beta2)``, ``beta1`` in [0, 1), ``beta2`` in (0, 1).
      weight_decay: decoupled decay ``x <- x (1 - dlr * weight_decay)``.
      d0: initial ``d`` (> 0).
      axis_name: mapped axis over which params/state are sharded (``shard_map``/``pmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `DAdaptLionState`; ``update`` needs ``params``.

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
      >>> tx = optim.dadapt_lion()
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)

    References:
      Defazio, Mishchenko, [Learning-Rate-Free Learning by D-Adaptation](https://arxiv.org/abs/2301.07733), ICML
      2023; Chen et al., [Symbolic Discovery of Optimization Algorithms](https://arxiv.org/abs/2302.06675), 2023.
    """
    hp_ok = _check_common(learning_rate, weight_decay, d0)
    (b1, b2), betas_ok = check_betas(betas)
    hp_ok = V.all_of(hp_ok, betas_ok)
    decay = not is_static_zero(weight_decay)

    def init_fn(params):
        check_init("dadapt_lion", params)
        acc = _tree.accumulation_dtype()
        return DAdaptLionState(
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.asarray(d0, acc), jnp.zeros((), acc),
            zeros_like_state(params), zeros_like_state(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax.contrib does
        check_update_args("dadapt_lion", updates, params, state.exp_avg, "the params given to `init`")
        acc = _tree.accumulation_dtype()
        lr, lr_ok = learning_rate_at(learning_rate, schedule_step(state))
        sb2 = jnp.sqrt(jnp.asarray(b2, acc))
        d = state.d
        dlr = d * lr
        grads = coupled_decay(updates, params, 0.0, state.exp_avg)  # in the state dtype; Lion's decay is decoupled
        direction = jax.tree.map(lambda m, g: jnp.sign(b1 * m + (1 - b1) * g), state.exp_avg, grads)
        num, sk_l1 = _tree.tree_reduce_sum(
            lambda u, s: (u * s, jnp.abs((sb2 * s + ((1 - sb2) * dlr) * u).astype(s.dtype))),
            direction, state.grad_sum, axis_name=axis_name,
        )
        # sign() hides an Inf gradient, so ||g||^2 decides finiteness (and overflow): one pass over g
        representable = fits(_tree.tree_norm_sq(grads, axis_name), state.exp_avg)
        numerator_weighted = sb2 * state.numerator_weighted + (1 - sb2) * dlr * num
        gate = Gate.of(jnp.isfinite(numerator_weighted) & jnp.isfinite(sk_l1) & representable & lr_ok & hp_ok)
        dlr_t = gate.coef(dlr)
        exp_avg = jax.tree.map(lambda m, g: (gate.decay(b2) * m + ((1 - b2) * dlr_t) * g).astype(m.dtype),
                               state.exp_avg, gate.mask(grads))
        grad_sum = jax.tree.map(lambda s, u: (gate.decay(sb2) * s + ((1 - sb2) * dlr_t) * u).astype(s.dtype),
                                state.grad_sum, gate.mask(direction))
        # the reference updates x, m and s before it returns on ||s||_1 == 0; only n and d wait
        has_signal = sk_l1 > 0
        numerator_weighted = jnp.where(has_signal, numerator_weighted, state.numerator_weighted)
        d_new = jnp.where(
            has_signal & (lr > 0), jnp.maximum(d, _safe_div(numerator_weighted, (1 - sb2) * sk_l1)), d
        )

        def leaf_update(u, p):
            out = -dlr * u
            if decay:
                out = out - (dlr * weight_decay) * p
            return out.astype(p.dtype)

        new_updates = jax.tree.map(leaf_update, direction, params)
        stepped = DAdaptLionState(state.count, state.num_nonfinite, d_new, numerator_weighted, exp_avg, grad_sum)
        return commit(gate, new_updates, stepped, state, gated=("exp_avg", "grad_sum"))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
