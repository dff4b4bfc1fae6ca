"""Prodigy: Adam with a D-Adaptation step size that estimates the distance to the solution.

Faithful to ``prodigyopt.Prodigy`` 1.1.2 (one parameter group), including its defaults
(no bias correction, decoupled weight decay), ``growth_rate``, ``safeguard_warmup``,
``d_coef`` and ``slice_p``. Differences from ``optax.contrib.prodigy`` (0.2.8): that one
always applies Adam's bias correction (about 0.95 relative difference in the parameters
after a few hundred steps with the reference defaults), has no ``growth_rate``/``slice_p``/
coupled decay, keeps ``d`` in the lowest parameter dtype (bfloat16 with bfloat16 params)
and has no ``axis_name``.

Non-finite gradients: a NaN/Inf in any gradient entry, or an entry whose second-moment
increment ``d^2 (1 - beta2) g^2`` overflows the state dtype (a float32 ``exp_avg_sq`` cannot
hold ``1e30**2``: it would turn inf and freeze the parameters for good), makes the step's
numerator ``<g, x0 - x>`` non-finite; the step is then skipped (zero updates, state
unchanged, ``num_nonfinite`` incremented), so ``d`` never absorbs a NaN and the run goes on
as if that gradient had not come. The same holds for NaN in the parameters, and for a
learning rate (a schedule's value) that is NaN, infinite or negative; the schedule is
evaluated at the number of ``update`` calls, so it moves past a bad value. With
``slice_p > 1`` the whole gradient is checked in the same pass. State buffers are float32
at least, so float16/bfloat16 parameters train like float32 ones (``optim._lrfree``).
"""

from __future__ import annotations

import math
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
    optax_alias,
    schedule_step,
)

#: Named settings for `prodigy` (sources in ``optim.presets``): ``"paper"`` (the prodigyopt
#: 1.1.2 defaults), ``"diffusion"``, ``"optax"`` (bias correction on, as optax.contrib) and ``"calibrated"``.
PRODIGY_PRESETS = PRESETS["prodigy"]


class ProdigyState(NamedTuple):
    """State of `prodigy`. Scalars are float32 (float64 under x64) whatever the params."""

    count: jax.Array  # shape=(), int32: steps taken (the schedule's and bias correction's k).
    num_nonfinite: jax.Array  # shape=(), int32: steps skipped for a non-finite gradient.
    d: jax.Array  # shape=(): the distance estimate.
    d_max: jax.Array  # shape=(): the largest d_hat so far.
    d_numerator: jax.Array  # shape=(): r, the beta3-weighted sum of <g, x0 - x>.
    exp_avg: Any  # m: tree like params (None when betas[0] == 0).
    exp_avg_sq: Any  # v: tree like params.
    grad_sum: Any  # s: tree of flat every-slice_p-th entries (like params when slice_p == 1).
    params0: Any  # x0: the initial params, sliced like grad_sum.


def prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    d0: float = 1e-6,
    d_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
    *,
    decouple: bool = True,
    use_bias_correction: bool = False,
    growth_rate: float = math.inf,
    slice_p: int | None = None,
    estim_lr0: float | None = None,
    estim_lr_coef: float | None = None,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Prodigy (Mishchenko & Defazio, 2024): Adam whose step size ``d`` is learned.

    With ``dlr = d * lr * bc`` (``bc = sqrt(1 - b2^{k+1}) / (1 - b1^{k+1})`` if
    ``use_bias_correction`` else 1):

    $$
    \begin{aligned}
        r &\leftarrow \beta_3 r + \tfrac{d}{d_0}\,\mathrm{dlr}\,\langle g, x_0 - x\rangle,\quad
        s \leftarrow \beta_3 s + \tfrac{d}{d_0}\,\mathrm{dlr}\,g,\quad
        \hat d = d_\mathrm{coef}\, r / \|s\|_1 \\
        d &\leftarrow \min(\max(d_\mathrm{max}, \hat d),\ d\cdot\mathrm{growth}),\ \text{(and }
        d \leftarrow \max(d, \hat d) \text{ while } d = d_0) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) d\, g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) d^2 g^2,\quad
        x \leftarrow x - \mathrm{dlr}\, m / (\sqrt v + d\,\epsilon) - \lambda\,\mathrm{dlr}\, x
    \end{aligned}
    $$

    Returns signed updates (add them with ``optax.apply_updates``). ``d`` is one scalar for
    the whole pytree, as in PyTorch with one parameter group; wrap it in
    ``optax.partition`` for one ``d`` per group. Gradient clipping or coupled weight decay
    chained before it change the statistics ``d`` is estimated from.

    The positional order is ``optax.contrib.prodigy``'s (``learning_rate, betas, beta3, eps,
    estim_lr0, estim_lr_coef, weight_decay, safeguard_warmup``), which also accepts our names
    ``d0``/``d_coef`` for its ``estim_lr0``/``estim_lr_coef``; the options optax lacks are keyword-only.
    One difference in meaning: optax always applies Adam's bias correction, the reference (and this
    default) does not; ``use_bias_correction=True`` gives optax's trajectory.

    Args:
      learning_rate: multiplier on ``d`` (a float or an optax schedule of the step count);
        the authors recommend 1.0. A step at learning rate 0 leaves everything unchanged.
      betas: ``(beta1, beta2)``; ``beta1 = 0`` drops the first moment (saves one copy).
      beta3: decay of ``r`` and ``s``; ``None`` means ``sqrt(beta2)``.
      eps: added to ``sqrt(v)`` after scaling by ``d``.
      weight_decay: ``lambda``; decoupled (AdamW-style, scaled by ``dlr``) if ``decouple``,
        else added to the gradient (and so to the ``d`` statistics).
      decouple: see ``weight_decay``.
      use_bias_correction: Adam's bias correction folded into ``dlr`` (off in the reference).
      safeguard_warmup: accumulate ``s`` with ``d`` instead of ``dlr`` (for warmup schedules).
      d0: the initial distance estimate (> 0).
      d_coef: multiplies ``d_hat``; the preferred knob (0.5 to 10).
      growth_rate: ``d`` grows at most by this factor per step (``inf``: unbounded).
      slice_p: keep ``s`` and ``x0`` for every ``slice_p``-th entry of each flattened leaf
        only (``None`` = 1 = exact Prodigy; ~11 saves memory). Must be a static int. Under
        ``shard_map`` with ``slice_p > 1`` the slice is taken per shard.
      estim_lr0, estim_lr_coef: ``optax.contrib.prodigy``'s names for ``d0`` and ``d_coef``.
      axis_name: mapped axis over which parameters and state are sharded (``shard_map``/
        ``pmap``); the two global sums are then ``psum``-ed so ``d`` is exact.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `ProdigyState`; ``update`` needs
      ``params`` (extra keyword arguments are ignored).

    Raises:
      ValueError: a concrete hyperparameter out of range (NaN included), a learning-rate
        schedule that is negative or NaN at step 0, NaN/Inf in the parameters given to ``init``.
      TypeError: a hyperparameter of the wrong type, or one given under both names (``d0`` and
        ``estim_lr0``); integer or complex parameters or updates.

    Bad values at run time (the rule of ``optim._lrfree``): a gradient with a NaN/Inf entry,
    or one whose square overflows the float32 state, a learning rate (schedule value) that is
    NaN, infinite or negative, or an injected hyperparameter out of range skips the step:
    zero updates, state unchanged, ``num_nonfinite`` + 1; the schedule is evaluated at the
    number of ``update`` calls, so it moves on. float16/bfloat16 parameters keep float32 state.

    Example:
      >>> import jax.numpy as jnp, optax, optim
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optim.prodigy())
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(2 * params, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Mishchenko, Defazio, [Prodigy: An Expeditiously Adaptive Parameter-Free
      Learner](https://arxiv.org/abs/2306.06101), ICML 2024.

    Warning:
        ``optax.contrib.prodigy`` always uses bias correction; for its behaviour pass
        ``**PRODIGY_PRESETS["optax"]``.
    """
    d0 = optax_alias("d0", d0, 1e-6, "estim_lr0", estim_lr0)
    d_coef = optax_alias("d_coef", d_coef, 1.0, "estim_lr_coef", estim_lr_coef)
    (b1, b2), betas_ok = check_betas(betas)
    hp_ok = V.all_of(
        check_learning_rate(learning_rate, "The authors recommend 1.0."),
        betas_ok,
        True if beta3 is None else V.open_unit("beta3", beta3, "Pass None for sqrt(beta2)."),
        V.positive("eps", eps, "The reference default is 1e-8."),
        V.nonnegative("weight_decay", weight_decay, "Try 0, 1e-3, 1e-2 or 1e-1."),
        V.positive("d0", d0, "It is the initial step size; the reference default is 1e-6 (raise to 1e-5 or 1e-4 if "
                   "d stays small)."),
        V.positive("d_coef", d_coef, "Values between 0.5 and 10 are typical; 1.0 is the default."),
        check_growth_rate(growth_rate),
    )
    if slice_p is None:
        slice_p = 1
    slice_p = V.static_int("slice_p", slice_p, 1, "With optax.inject_hyperparams pass static_args=('slice_p',).")
    use_m = not is_static_zero(b1)
    coupled = not decouple and not is_static_zero(weight_decay)
    decoupled = decouple and not is_static_zero(weight_decay)

    def sl(x):
        return x.reshape(-1)[::slice_p] if slice_p > 1 else x

    def init_fn(params):
        check_init("prodigy", params)
        acc = _tree.accumulation_dtype()

        def zeros(p):  # fresh buffers per field, so params and state can all be donated
            return jnp.zeros(p.shape, _tree.state_dtype(p.dtype))

        return ProdigyState(
            count=jnp.zeros((), jnp.int32),
            num_nonfinite=jnp.zeros((), jnp.int32),
            d=jnp.asarray(d0, acc),
            d_max=jnp.asarray(d0, acc),
            d_numerator=jnp.zeros((), acc),
            exp_avg=jax.tree.map(zeros, params) if use_m else None,
            exp_avg_sq=jax.tree.map(zeros, params),
            grad_sum=jax.tree.map(lambda p: zeros(sl(p)), params),
            params0=jax.tree.map(lambda p: jnp.array(sl(p), _tree.state_dtype(p.dtype), copy=True), params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # optax.contrib's signature: extra arguments are accepted and ignored
        check_update_args("prodigy", updates, params, state.exp_avg_sq, "the params given to `init`")
        acc = _tree.accumulation_dtype()
        lr, lr_ok = learning_rate_at(learning_rate, schedule_step(state))
        d = state.d
        d_init = jnp.asarray(d0, acc)
        b3 = jnp.sqrt(jnp.asarray(b2, acc)) if beta3 is None else jnp.asarray(beta3, acc)
        bc = adam_step_correction(b1, b2, state.count) if use_bias_correction else jnp.ones((), acc)
        dlr = d * lr * bc
        # the gradient in the state dtype (float32 at least) before any product
        grads = coupled_decay(updates, params, weight_decay if coupled else 0.0, state.exp_avg_sq)

        ratio = d / d_init
        s_coef = ratio * (d if safeguard_warmup else dlr)
        v_coef = d * d * (1 - b2)

        num = _tree.tree_reduce_sum(lambda g, p, p0: sl(g) * (p0 - sl(p)), grads, params, state.params0,
                                    axis_name=axis_name)
        # ||g||^2 for the overflow test (v holds d^2 g^2), which also sees every entry when slice_p > 1:
        # a separate pass, since any extra term in <g, x0 - x> costs more (XLA:CPU runs it as a fast dot)
        representable = fits(_tree.tree_norm_sq(grads, axis_name), state.exp_avg_sq, v_coef)
        d_numerator = b3 * state.d_numerator + ratio * dlr * num
        # lr == 0 leaves everything as it is (the reference returns first)
        gate = Gate.of(jnp.isfinite(d_numerator) & representable & lr_ok & hp_ok, lr > 0)
        grads = gate.mask(grads)
        s_coef_t, v_coef_t, m_coef_t = gate.coef(s_coef), gate.coef(v_coef), gate.coef(d * (1 - b1))
        grad_sum = jax.tree.map(lambda s, g: (gate.decay(b3) * s + s_coef_t * sl(g)).astype(s.dtype),
                                state.grad_sum, grads)
        denom = _tree.tree_l1(grad_sum, axis_name)  # from the stored s: no second pass over g

        # ||s||_1 = 0 (no gradient signal yet, so m = v = 0 and the step is 0): d waits, as in the reference
        d_hat = d_coef * d_numerator / jnp.where(denom > 0, denom, 1)
        d_max = jnp.where(denom > 0, jnp.maximum(state.d_max, d_hat), state.d_max)
        d_new = jnp.where(d == d_init, jnp.maximum(d, d_hat), d)
        d_new = jnp.where(denom > 0, jnp.minimum(d_max, d_new * growth_rate), d)

        exp_avg_sq = jax.tree.map(
            lambda v_, g: (gate.decay(b2) * v_ + v_coef_t * jnp.square(g)).astype(v_.dtype),
            state.exp_avg_sq, grads,
        )
        if use_m:
            exp_avg = jax.tree.map(lambda m, g: (gate.decay(b1) * m + m_coef_t * g).astype(m.dtype),
                                   state.exp_avg, grads)
            direction = exp_avg
            step = dlr
        else:
            exp_avg, direction, step = None, grads, dlr * d_new

        def leaf_update(u, v_, p):
            out = -step * u / (jnp.sqrt(v_) + d_new * eps)
            if decoupled:
                out = out - (weight_decay * dlr) * p
            return out.astype(p.dtype)

        new_updates = jax.tree.map(leaf_update, direction, exp_avg_sq, params)
        stepped = ProdigyState(state.count, state.num_nonfinite, d_new, d_max, d_numerator, exp_avg, exp_avg_sq,
                               grad_sum, state.params0)
        return commit(gate, new_updates, stepped, state, gated=("exp_avg", "exp_avg_sq", "grad_sum"))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
