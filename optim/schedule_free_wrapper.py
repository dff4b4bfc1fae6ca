"""The schedule-free wrapper: any optax transform made schedule-free (``schedulefree.ScheduleFreeWrapper``).

The fused SGD/AdamW/RAdam variants, the state, the evaluation point and the rules for bad values are
in ``optim.schedule_free``; this module reuses them for an arbitrary base transform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optim import _tree
from optim import _validate as V
from optim._lrfree import ScalarOrSchedule, check_init, commit, is_static_zero, learning_rate_at, schedule_step
from optim.schedule_free import (
    ScheduleFreeState,
    _averaging_weight,
    _check_common,
    _check_update_args,
    _finite_gate,
    _init_x,
    _x_of,
    _z_dtype,
)


def schedule_free(
    base_optimizer: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule = 1.0,
    b1: float = 0.9,
    weight_lr_power: float = 2.0,
    state_dtype=None,
    *,
    weight_decay_at_y: float = 0.0,
    r: float = 0.0,
    skip_nonfinite: bool = True,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Make any optax transform schedule-free (``schedulefree.ScheduleFreeWrapper``).

    The base takes its step on ``z`` with the gradient at ``y``:
    ``z_{t+1} = z_t + base.update(g(y_t), base_state, z_t)``; then
    ``x_{t+1} = x_t + c_{t+1}(z_{t+1} - x_t)`` and ``y_{t+1} = x_{t+1} + (1-b1)(z_{t+1} - x_{t+1})``.
    With ``weight_decay_at_y = lambda``, first ``z -= lr lambda y`` and ``y -= lr lambda (1-b1) y``.

    Name and argument order are ``optax.contrib.schedule_free``'s (``base_optimizer, learning_rate,
    b1, weight_lr_power, state_dtype``). One difference: optax hands the base ``y`` as its
    ``params``, the reference (and this wrapper) ``z``; they agree for bases that do not read the
    parameters (``optax.sgd``, ``optax.adam``, ...), while a base's own decoupled weight decay
    (``optax.adamw``) acts at ``y`` in optax and at ``z`` here.

    Args:
      base_optimizer: any ``optax.GradientTransformation`` returning signed updates (e.g.
        ``optax.adam(1e-3, b1=0.0)``), usually without momentum (the wrapper's interpolation
        replaces it). Its own weight decay acts at ``z``.
      learning_rate: the base's learning rate (float or schedule of this wrapper's step count),
        used only for the averaging weight ``(max lr)^weight_lr_power`` and the decay at ``y``;
        the reference reads it from the base's param group. A constant cancels out of ``c``.
      b1: interpolation ``beta`` in (0, 1) (``momentum`` in the reference).
      weight_lr_power, state_dtype: as in `optim.schedule_free_sgd`.
      weight_decay_at_y: decay evaluated at ``y``.
      r, skip_nonfinite, axis_name: as in `optim.schedule_free_sgd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `ScheduleFreeState` (``inner`` = base state).

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
      >>> tx = optim.schedule_free(optax.adam(1e-2, b1=0.0), learning_rate=1e-2)
      >>> y = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * y, tx.init(y), y)
      >>> x = optim.schedule_free_eval_params(state, optax.apply_updates(y, updates))

    References:
      Defazio et al., [The Road Less Scheduled](https://arxiv.org/abs/2405.15682), NeurIPS 2024.
    """
    base = base_optimizer
    if not hasattr(base, "init") or not hasattr(base, "update"):
        V.fail("base_optimizer", base, "an optax.GradientTransformation (with `init` and `update`)",
               "Pass e.g. optax.adam(1e-3, b1=0.0).", TypeError)
    hp_ok = _check_common(learning_rate, b1, weight_decay_at_y, r, weight_lr_power, state_dtype,
                          name="weight_decay_at_y")
    acc = _tree.accumulation_dtype()
    decay = not is_static_zero(weight_decay_at_y)

    def init_fn(params):
        check_init("schedule_free", params)
        z = jax.tree.map(lambda p: jnp.array(p, _z_dtype(p, state_dtype), copy=True), params)
        return ScheduleFreeState(
            count=jnp.zeros((), jnp.int32),
            num_nonfinite=jnp.zeros((), jnp.int32),
            b1=jnp.asarray(b1, acc),
            weight_sum=jnp.zeros((), acc),
            lr_max=jnp.zeros((), acc),
            z=z,
            inner=base.init(z),
            x=_init_x(params, z),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _check_update_args("schedule_free", updates, params, state)
        lr, lr_ok = learning_rate_at(learning_rate, schedule_step(state))
        gate = _finite_gate(updates, skip_nonfinite, axis_name, state.z, V.all_of(lr_ok, hp_ok))
        lr = jnp.where(gate.take, lr, 0)  # a NaN lr of a skipped step must not reach the weights
        y, z = params, state.z
        if decay:
            z = jax.tree.map(lambda zi, yi: (zi - lr * weight_decay_at_y * yi).astype(zi.dtype), z, y)
            y = jax.tree.map(lambda yi: yi - lr * weight_decay_at_y * (1 - b1) * yi, y)
        x = jax.tree.map(lambda yi, zi, xi: _x_of(yi, zi, xi, b1), y, z, state.x)
        ckp1, lr_max, weight_sum = _averaging_weight(state, lr, r, weight_lr_power)

        def step():
            grads = jax.tree.map(lambda g, zi: g.astype(zi.dtype), updates, z)
            base_updates, inner = optax.with_extra_args_support(base).update(grads, state.inner, z, **extra_args)
            # keep the base state's types (a base may widen them), so both branches agree
            inner = jax.tree.map(lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)), inner, state.inner)
            z_new = jax.tree.map(lambda zi, u: (zi + u).astype(zi.dtype), z, base_updates)

            x_new = jax.tree.map(lambda xi, zi: xi + ckp1 * (zi - xi), x, z_new)

            def y_next(y0, xi, zi):
                return (xi + (1 - b1) * (zi - xi) - y0).astype(y0.dtype)

            stored = jax.tree.map(lambda xs, xi: xi.astype(xs.dtype) if xs.size else xs, state.x, x_new)
            return jax.tree.map(y_next, params, x_new, z_new), z_new, inner, stored

        def skip():
            return jax.tree.map(jnp.zeros_like, params), state.z, state.inner, state.x

        # the base state is the base's own: skip its step by a branch, not a select (which costs a copy)
        new_updates, z, inner, x_state = jax.lax.cond(gate.take, step, skip)
        stepped = ScheduleFreeState(state.count, state.num_nonfinite, state.b1, weight_sum, lr_max, z, inner, x_state)
        return commit(gate, new_updates, stepped, state, gated=("z", "inner", "x"))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
