"""Schedule-free SGD, AdamW, RAdam and a schedule-free wrapper for any optax transform.

Schedule-free methods (Defazio et al., 2024) replace the learning-rate schedule by an
average. Three sequences: ``z`` takes the base steps, ``x`` is a weighted average of the
``z``'s, and the gradient is taken at their interpolation ``y``:

$$
    y_t = (1 - \\beta) z_t + \\beta x_t,\\qquad z_{t+1} = z_t - \\gamma_t \\hat g(y_t),\\qquad
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1},\\qquad
    c_{t+1} = \\frac{w_t}{\\sum_{i \\le t} w_i},\\quad w_t = (t+1)^r \\, (\\max_{i \\le t} \\gamma_i)^{p}
$$

with ``p = weight_lr_power`` and a linear warmup ``gamma_t = lr (t+1) / warmup_steps`` for
``t < warmup_steps``; ``t`` counts from 0 and one counter drives both the step size and
the weight, exactly as the reference package ``schedulefree`` (1.4.1).

**Which iterate is which.** The parameters the caller holds (and differentiates at) are
the training iterate ``y``; the state holds ``z``. Evaluate, checkpoint for inference and
recompute batch-norm statistics at ``x = schedule_free_eval_params(state, params)``. This
matches PyTorch's ``optimizer.train()`` (params are ``y``) and ``optimizer.eval()``
(params are ``x``). For float16/bfloat16 parameters (narrower than the float32 state) the
state also holds ``x``: ``y`` is then rebuilt from ``x`` and ``z`` at every step instead of
stepped, because recovering ``x`` from a rounded ``y`` drifts (bfloat16 schedule-free SGD:
0.42 from the optimum after 500 steps against 0.0015 in float32; 0 with ``x`` stored).

**Differences from optax.contrib.schedule_free_*** (0.2.8; same names and argument order here):
there the warmup schedule of the ``z`` step is evaluated one step behind the averaging weight
(its first ``z`` step has learning rate 0), ``state_dtype=None`` keeps ``z`` in the parameters'
dtype (here float32 at least), and there is no ``r`` weighting or RAdam variant. Without warmup
the trajectories agree to rounding. The wrapper ``optim.schedule_free`` is in
``optim.schedule_free_wrapper``.

**Non-finite gradients.** A step whose gradient has a NaN/Inf entry, or an entry whose
square overflows the dtype of ``z`` (``|g| > 1.8e19`` in float32: the second moment could not
hold it, and a plain SGD step of that size is no step), is skipped: zero updates, state
unchanged but for ``num_nonfinite``. The finiteness test is the only global reduction here
(``axis_name`` makes it agree across shards) and, unlike the D-Adaptation family's, not free:
it reads the gradient once more. ``skip_nonfinite=False`` drops it. A learning rate (a
schedule's value) that is NaN, infinite or negative skips the step as well (with or without
the check); the schedule is evaluated at the number of ``update`` calls, while the warmup
and the averaging weights count applied steps, as in the reference (``optim._lrfree``).
``z`` and the second moments are float32 at least, so float16/bfloat16 parameters train
like float32 ones; integer parameters raise ``TypeError``.
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
    bias_correction,
    check_init,
    check_learning_rate,
    check_update_args,
    commit,
    coupled_decay,
    fits,
    is_static_zero,
    learning_rate_at,
    schedule_step,
)

#: Named settings (sources in ``optim.presets``): ``"reference"`` (schedulefree 1.4.1 defaults),
#: ``"algoperf"`` (AdamW only: the AlgoPerf 2024 self-tuning winner; add ``warmup_steps=int(0.02 * total)``)
#: and ``"calibrated"``.
SCHEDULE_FREE_SGD_PRESETS = PRESETS["schedule_free_sgd"]
SCHEDULE_FREE_ADAMW_PRESETS = PRESETS["schedule_free_adamw"]
SCHEDULE_FREE_RADAM_PRESETS = PRESETS["schedule_free_radam"]


class ScheduleFreeState(NamedTuple):
    """State of every schedule-free transform here."""

    count: jax.Array  # shape=(), int32: steps applied (k in the reference).
    num_nonfinite: jax.Array  # shape=(), int32: steps skipped for a non-finite gradient.
    b1: jax.Array  # shape=(), accumulation dtype: the interpolation beta, kept for eval params.
    weight_sum: jax.Array  # shape=(), accumulation dtype: sum of the averaging weights w_t.
    lr_max: jax.Array  # shape=(), accumulation dtype: largest step size so far.
    z: Any  # the z sequence: same tree and shapes as params (dtype state_dtype, default float32 at least).
    inner: Any  # AdamW/RAdam: second moments (like z); SGD: None; wrapper: the base transform's state.
    # The average x, per leaf: for parameters narrower than z (float16/bfloat16 with float32 z) in z's dtype;
    # otherwise a shape-(0,) placeholder and x is recovered from y and z as in the reference.
    x: Any = None


def _check_common(learning_rate, b1, weight_decay, r, weight_lr_power, state_dtype, name="weight_decay"):
    """The checks every schedule-free factory makes; returns the runtime predicate for traced values."""
    if state_dtype is not None:
        try:
            dt = jnp.dtype(state_dtype)
        except TypeError:
            dt = None
        if dt is None or dt.name not in V.SUPPORTED_DTYPES:
            V.fail("state_dtype", state_dtype, "None or one of " + ", ".join(V.SUPPORTED_DTYPES),
                   "None keeps z in float32 at least (float64 for float64 parameters).", TypeError)
    return V.all_of(
        check_learning_rate(learning_rate, "The reference advises 10-50x the usual SGD rate (1-10x for AdamW)."),
        V.open_unit("b1", b1, "Schedule-free needs 0 < b1 < 1 (x is recovered from y and z by dividing by b1)."),
        V.nonnegative(name, weight_decay, "0 is the reference default."),
        V.nonnegative("r", r, "r = 0 is the uniform average; AlgoPerf used 0.75."),
        V.nonnegative("weight_lr_power", weight_lr_power, "The reference default is 2."),
    )


def _z_dtype(p, state_dtype):
    return jnp.dtype(state_dtype) if state_dtype is not None else _tree.state_dtype(p.dtype)


def _zeros_like_tree(tree, dtype):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, _z_dtype(p, dtype)), tree)


def _averaging_weight(state, lr, r, weight_lr_power):
    """``c_{k+1}`` and the new ``(lr_max, weight_sum)``; ``c = 0`` while every weight is 0."""
    acc = _tree.accumulation_dtype()
    lr_max = jnp.maximum(state.lr_max, lr)
    k1 = (state.count + 1).astype(acc)
    weight = jnp.power(k1, jnp.asarray(r, acc)) * jnp.power(lr_max, jnp.asarray(weight_lr_power, acc))
    weight_sum = state.weight_sum + weight
    ckp1 = jnp.where(weight_sum > 0, weight / jnp.where(weight_sum > 0, weight_sum, 1), 0)
    return ckp1, lr_max, weight_sum


def _finite_gate(updates, skip_nonfinite: bool, axis_name, z, step_ok) -> Gate:
    """Take the step iff ``||g||^2`` is representable in the dtype of ``z`` (and lr, hyperparameters are valid).

    NaN/Inf gradients fail, and so does one whose squared norm overflows (``||g|| > 1.8e19``
    for float32 ``z``). Without the check only ``step_ok`` counts.
    """
    if not skip_nonfinite:
        return Gate.of(step_ok)
    return Gate.of(V.all_of(fits(_tree.tree_norm_sq(updates, axis_name), z), step_ok))


def _narrow(p, z) -> bool:
    """Parameters narrower than the state: x is stored (recovering it from a rounded y drifts)."""
    return jnp.dtype(p.dtype).itemsize < jnp.dtype(z.dtype).itemsize


def _init_x(params, z):
    return jax.tree.map(lambda p, zi: jnp.array(zi, copy=True) if _narrow(p, zi) else jnp.zeros((0,), zi.dtype),
                        params, z)


def _x_of(y, z, x, b1):
    """The average x: stored (narrow parameters) or recovered as ``y + (1 - 1/b1)(z - y)``."""
    return x if x.size else y + (1 - 1 / b1) * (z - y)


def _check_update_args(name, updates, params, state):
    check_update_args(name, updates, params, state.z, "state.z (the params given to init)")


def _schedule_free_core(name, direction, init_inner, learning_rate, b1, r, weight_lr_power, warmup_steps,
                        state_dtype, skip_nonfinite, axis_name, hp_ok):
    """Shared y/z/x recursion of the fused SGD/AdamW/RAdam variants.

    ``direction(grads, params, inner, count, gate) -> (ghat, lr_factor, inner)`` returns the
    normalised gradient (weight decay at y included) and a step-size factor (RAdam's
    rectification, 1 otherwise); ``grads`` arrive masked by ``gate`` and ``inner`` must be
    built with it (see ``optim._lrfree.Gate``), so that a skipped step leaves it as it is.
    """
    acc = _tree.accumulation_dtype()

    def init_fn(params):
        check_init(name, params)
        z = jax.tree.map(lambda p: jnp.array(p, _z_dtype(p, state_dtype), copy=True), params)
        return ScheduleFreeState(
            count=jnp.zeros((), jnp.int32),
            num_nonfinite=jnp.zeros((), jnp.int32),
            b1=jnp.asarray(b1, acc),
            weight_sum=jnp.zeros((), acc),
            lr_max=jnp.zeros((), acc),
            z=z,
            inner=init_inner(params),
            x=_init_x(params, z),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax.contrib does
        _check_update_args(name, updates, params, state)
        k = state.count
        # the user's schedule runs on update calls; the warmup and the averaging weight on applied steps
        lr, lr_ok = learning_rate_at(learning_rate, schedule_step(state))
        if not is_static_zero(warmup_steps):
            lr = lr * jnp.minimum((k + 1).astype(acc) / warmup_steps, 1)
        gate = _finite_gate(updates, skip_nonfinite, axis_name, state.z, V.all_of(lr_ok, hp_ok))
        grads = gate.mask(jax.tree.map(lambda g, z: g.astype(z.dtype), updates, state.z))
        ghat, factor, inner = direction(grads, params, state.inner, k, gate)
        ghat = gate.mask(ghat)  # weight decay at y would move z on a skipped step
        lr = jnp.where(gate.take, lr * factor, 0)  # a NaN lr of a skipped step must not reach z or the weights
        ckp1, lr_max, weight_sum = _averaging_weight(state, lr, r, weight_lr_power)
        z = jax.tree.map(lambda z, g: (z - lr * g).astype(z.dtype), state.z, ghat)
        y_coef = b1 * (1 - ckp1) - 1

        # y <- lerp(y, z, c) + lr (b1 (1 - c) - 1) ghat as a difference, with lr ghat = z - z_new: reading
        # z_new instead of ghat spares XLA materializing ghat for two consumers (one write, two reads).
        # With x stored (narrow parameters) y is rebuilt from x and z instead, so its rounding never accumulates.
        def y_step(y, z_old, z_new, x):
            if x.size:
                x_new = x + ckp1 * (z_new - x)
                return ((1 - b1) * z_new + b1 * x_new - y).astype(y.dtype)
            return (ckp1 * (z_old - y) + y_coef * (z_old - z_new)).astype(y.dtype)

        new_updates = jax.tree.map(y_step, params, state.z, z, state.x)
        c_t = gate.coef(ckp1)
        x = jax.tree.map(lambda x, zn: (x + c_t * (zn - x)).astype(x.dtype) if x.size else x, state.x, z)
        stepped = ScheduleFreeState(k, state.num_nonfinite, state.b1, weight_sum, lr_max, z, inner, x)
        return commit(gate, new_updates, stepped, state, gated=("z", "inner", "x"))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def schedule_free_sgd(
    learning_rate: ScalarOrSchedule = 1.0,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    weight_decay: float | None = None,
    weight_lr_power: float = 2.0,
    state_dtype=None,
    *,
    r: float = 0.0,
    skip_nonfinite: bool = True,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Schedule-free SGD (``schedulefree.SGDScheduleFree``).

    $$
        \hat g = g(y_t) + \lambda y_t,\qquad
        y_{t+1} = y_t + c_{t+1}(z_t - y_t) + \gamma_t(\beta(1 - c_{t+1}) - 1)\hat g,\qquad
        z_{t+1} = z_t - \gamma_t \hat g
    $$

    The argument order is ``optax.contrib.schedule_free_sgd``'s (see the module docstring for the
    warmup step where optax differs); ``r`` and the skip options are keyword-only.

    Args:
      learning_rate: ``lr`` (float or schedule of the step count; warmup multiplies it).
        The reference advises 10-50x the usual SGD learning rate.
      warmup_steps: linear warmup length; ``gamma_t = lr (t+1) / warmup_steps`` before it
        (None or 0: none).
      b1: interpolation ``beta`` in (0, 1) (``momentum`` in the reference).
      weight_decay: L2 decay evaluated at ``y``, added to the gradient (None or 0: none).
      weight_lr_power: power of ``max lr`` in the averaging weight.
      state_dtype: dtype of ``z`` and the second moments (default: float32 at least, the
        parameters' dtype if wider; ``jnp.bfloat16`` halves the state of bfloat16 models at
        the cost of precision in the average).
      r: polynomial weighting power of the average.
      skip_nonfinite: skip a step whose gradient has a NaN/Inf entry, or one whose square
        overflows the dtype of ``z`` (see the module docstring). The check is a pass over the
        gradient, about 15 % of a step that is memory-bound; ``False`` drops it, and a
        non-finite gradient then corrupts ``z`` and ``y`` (as in ``optax.contrib``;
        ``optax.apply_if_finite`` is the generic guard).
      axis_name: mapped axis for the (only) global reduction, the non-finite check.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `ScheduleFreeState`. The params passed
      to ``update`` are ``y``; evaluate at `schedule_free_eval_params`.

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
      >>> tx = optim.schedule_free_sgd(learning_rate=0.5, warmup_steps=10)
      >>> y = jnp.array([1.0, -2.0])
      >>> state = tx.init(y)
      >>> updates, state = tx.update(2 * y, state, y)
      >>> y = optax.apply_updates(y, updates)
      >>> x = optim.schedule_free_eval_params(state, y)

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, [The Road Less
      Scheduled](https://arxiv.org/abs/2405.15682), NeurIPS 2024.
    """
    warmup_steps = 0 if warmup_steps is None else warmup_steps  # optax.contrib's "no warmup"
    weight_decay = 0.0 if weight_decay is None else weight_decay
    hp_ok = V.all_of(_check_common(learning_rate, b1, weight_decay, r, weight_lr_power, state_dtype),
                     V.nonnegative_int("warmup_steps", warmup_steps))

    def direction(grads, params, inner, k, gate):
        return coupled_decay(grads, params, weight_decay, grads), 1.0, inner

    return _schedule_free_core(
        "schedule_free_sgd", direction, lambda p: None, learning_rate, b1, r, weight_lr_power, warmup_steps,
        state_dtype, skip_nonfinite, axis_name, hp_ok,
    )


def _check_adam(b2, eps):
    return V.all_of(V.open_unit("b2", b2, "The reference default is 0.999."),
                    V.nonnegative("eps", eps, "The reference default is 1e-8."))


def schedule_free_adamw(
    learning_rate: ScalarOrSchedule = 0.0025,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_lr_power: float = 2.0,
    state_dtype=None,
    *,
    r: float = 0.0,
    skip_nonfinite: bool = True,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Schedule-free AdamW (``schedulefree.AdamWScheduleFree``).

    $$
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g^2,\qquad
        \hat g = \frac{g}{\sqrt{v_t / (1 - \beta_2^{t+1})} + \epsilon} + \lambda y_t
    $$

    then the schedule-free ``y``/``z`` steps of `schedule_free_sgd` with ``hat g``. No
    first moment: ``b1`` is the interpolation. See `SCHEDULE_FREE_ADAMW_PRESETS` for
    the reference defaults, the AlgoPerf and our calibration. The argument order is
    ``optax.contrib.schedule_free_adamw``'s; ``r`` and the skip options are keyword-only.

    Args:
      learning_rate: ``lr`` (float or schedule); the reference advises 1-10x AdamW's.
      warmup_steps: as in `schedule_free_sgd`.
      b1: interpolation ``beta`` in (0, 1).
      b2: second-moment decay in (0, 1).
      eps: added outside the square root.
      weight_decay: decay evaluated at ``y``, added to the normalised gradient.
      weight_lr_power, state_dtype, r, skip_nonfinite, axis_name: as in `schedule_free_sgd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `ScheduleFreeState` (``inner`` = ``v``).

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
      >>> tx = optim.schedule_free_adamw(**optim.SCHEDULE_FREE_ADAMW_PRESETS["algoperf"], warmup_steps=20)
      >>> y = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * y, tx.init(y), y)

    References:
      Defazio et al., [The Road Less Scheduled](https://arxiv.org/abs/2405.15682), NeurIPS 2024.
    """
    warmup_steps = 0 if warmup_steps is None else warmup_steps
    hp_ok = V.all_of(_check_common(learning_rate, b1, weight_decay, r, weight_lr_power, state_dtype),
                     _check_adam(b2, eps), V.nonnegative_int("warmup_steps", warmup_steps))

    def direction(grads, params, nu, k, gate):
        nu = jax.tree.map(lambda v, g: (gate.decay(b2) * v + (1 - b2) * g * g).astype(v.dtype), nu, grads)
        bc2 = bias_correction(b2, k)
        ghat = jax.tree.map(lambda g, v: g / (jnp.sqrt(v / bc2) + eps), grads, nu)
        return coupled_decay(ghat, params, weight_decay, ghat), 1.0, nu

    return _schedule_free_core(
        "schedule_free_adamw", direction, lambda p: _zeros_like_tree(p, state_dtype), learning_rate, b1, r,
        weight_lr_power, warmup_steps, state_dtype, skip_nonfinite, axis_name, hp_ok,
    )


def schedule_free_radam(
    learning_rate: ScalarOrSchedule = 0.0025,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_lr_power: float = 2.0,
    state_dtype=None,
    *,
    r: float = 0.0,
    silent_sgd_phase: bool = True,
    skip_nonfinite: bool = True,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Schedule-free RAdam (``schedulefree.RAdamScheduleFree``): no warmup to tune.

    With ``rho_inf = 2/(1-b2) - 1`` and ``rho_t = rho_inf - 2 (t+1) b2^{t+1} / (1 - b2^{t+1})``,
    the step size is ``lr * rect_t`` with RAdam's rectification
    ``rect_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))`` and the
    AdamW direction once ``rho_t > 4``. Before that (the first ~5 steps at ``b2=0.999``) the
    step is 0 with ``silent_sgd_phase=True`` (only ``v`` accumulates) or a plain SGD step
    with ``rect = 1`` otherwise.

    Args:
      learning_rate, b1, b2, eps, weight_decay, weight_lr_power, state_dtype, r, skip_nonfinite, axis_name: as
        in `schedule_free_adamw` (in that order, without ``warmup_steps``).
      silent_sgd_phase: skip the early SGD phase (the reference default and recommendation).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `ScheduleFreeState` (``inner`` = ``v``).

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
      >>> tx = optim.schedule_free_radam()
      >>> y = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * y, tx.init(y), y)  # silent phase: updates are 0

    References:
      Defazio et al., [The Road Less Scheduled](https://arxiv.org/abs/2405.15682), 2024;
      Liu et al., [On the Variance of the Adaptive Learning Rate and Beyond](https://arxiv.org/abs/1908.03265),
      ICLR 2020.
    """
    hp_ok = V.all_of(_check_common(learning_rate, b1, weight_decay, r, weight_lr_power, state_dtype),
                     _check_adam(b2, eps))
    acc = _tree.accumulation_dtype()
    rho_inf = 2 / (1 - b2) - 1

    def direction(grads, params, nu, k, gate):
        nu = jax.tree.map(lambda v, g: (gate.decay(b2) * v + (1 - b2) * g * g).astype(v.dtype), nu, grads)
        step = (k + 1).astype(acc)
        bc2 = bias_correction(b2, k)
        b2t = 1 - bc2
        rho_t = rho_inf - 2 * step * b2t / bc2
        adam = rho_t > 4
        safe_rho = jnp.where(adam, rho_t, 5.0)
        rect = jnp.sqrt((safe_rho - 4) * (safe_rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * safe_rho))
        factor = jnp.where(adam, rect, 0.0 if silent_sgd_phase else 1.0)
        ghat = jax.tree.map(lambda g, v: jnp.where(adam, g / (jnp.sqrt(v / bc2) + eps), g), grads, nu)
        return coupled_decay(ghat, params, weight_decay, ghat), factor, nu

    return _schedule_free_core(
        "schedule_free_radam", direction, lambda p: _zeros_like_tree(p, state_dtype), learning_rate, b1, r,
        weight_lr_power, 0, state_dtype, skip_nonfinite, axis_name, hp_ok,
    )


def _find_state(state: Any) -> ScheduleFreeState:
    return V.find_state(state, ScheduleFreeState, "`state` holds {found} schedule-free states; expected exactly one. "
                        "Pass the state of an optim.schedule_free_* transform (or of a chain containing one).")


def schedule_free_eval_params(state: Any, params: Any) -> Any:
    r"""The evaluation iterate ``x = (y - (1 - b1) z) / b1`` from the training iterate ``y = params``.

    For parameters narrower than the state (float16/bfloat16 with float32 ``z``) the state
    holds ``x`` itself, and it is returned (in the parameters' dtype): recovering it from a
    rounded ``y`` would amplify the rounding by ``1/b1`` at every step.

    Use it for evaluation, inference checkpoints and batch-norm statistics; keep training
    on ``params``. Equals the parameters PyTorch ``schedulefree`` holds after
    ``optimizer.eval()`` (it computes ``lerp(y, z, 1 - 1/b1)``, as here).

    Args:
      state: the state of a schedule-free transform, or any optax state containing exactly one.
      params: the current training parameters ``y``.

    Returns:
      ``x``, with the tree and dtypes of ``params``.
    """
    sf = _find_state(state)
    V.same_structure("params", params, "state.z", sf.z)
    if sf.x is None:  # a state saved before x was stored
        return jax.tree.map(lambda y, z: (y + (1 - 1 / sf.b1) * (z - y)).astype(y.dtype), params, sf.z)
    return jax.tree.map(lambda y, z, x: _x_of(y, z, x, sf.b1).astype(y.dtype), params, sf.z, sf.x)
