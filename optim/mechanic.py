"""Mechanic (Cutkosky, Defazio & Mehta, 2023): learn the scale of any base optimizer's updates.

Follows Algorithm 1 of the paper with the constants of the authors' PyTorch package
``mechanic-pytorch`` (``s_init=1e-8``, ``eps=1e-8``, ``lambda=0.01``, six betas, the
max-product ``m`` starting at 1e-6) in its memory-saving form: ``Delta`` is recomputed
from ``(x - x_ref) / (sum(s) + eps)`` instead of stored.

Differences from ``optax.contrib.mechanize`` (0.2.8): that one clamps ``h`` to
``[-m, m]`` ("not part of the original paper"), starts ``m`` at 0 and adds ``eps`` to
``|h|``, starts ``s`` at ``s_init=1e-6`` instead of 0, keeps its scalars in the lowest
parameter dtype and has no ``axis_name``. The PyTorch package evaluates the weight-decay
term at the parameters *after* the base step; here, as in the paper, at ``x_t``.

Non-finite gradients: a NaN/Inf gradient entry, or one whose square overflows the state
dtype, makes ``h`` non-finite; the step is then skipped (zero updates, base and Mechanic
state unchanged, ``num_nonfinite`` incremented). The base transform's state keeps its dtypes
across steps (an ``optax.adam`` state built from float16 parameters stays float16 even when
the gradients are float32), so the step and the skip agree on one state type.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _tree
from optim import _validate as V
from optim._lrfree import Gate, check_init, check_update_args, commit, copy_to_state, fits
from optim.presets import PRESETS

_M_INIT = 1e-6  # mechanic-pytorch's initial max_product: makes s > 0 after the first step

#: Named settings for `mechanize` (sources in ``optim.presets``): ``"paper"`` (mechanic-pytorch,
#: ``s_init=1e-8``), ``"optax"`` (optax.contrib's ``s_init=1e-6``; its clamping of ``h`` is not reproduced)
#: and ``"calibrated"``.
MECHANIC_PRESETS = PRESETS["mechanize"]



class MechanicState(NamedTuple):
    """State of `mechanize`. The tuner's vectors are float32 (float64 under x64)."""

    count: jax.Array  # shape=(), int32: steps taken.
    num_nonfinite: jax.Array  # shape=(), int32: steps skipped for a non-finite gradient.
    base_state: Any  # the base transform's state.
    x_ref: Any  # the reference point: the params given to init.
    s: jax.Array  # shape=(n,): scale per beta; the step scale is sum(s).
    m: jax.Array  # shape=(n,): running max of |h|.
    v: jax.Array  # shape=(n,): beta^2-discounted sum of h^2.
    r: jax.Array  # shape=(n,): reward (wealth minus the initial bet).


def mechanize(
    base_optimizer: optax.GradientTransformation,
    weight_decay: float = 0.01,
    eps: float = 1e-8,
    s_init: float = 1e-8,
    num_betas: int | None = None,
    *,
    betas: tuple[float, ...] | None = None,
    axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Mechanic: scale ``base_optimizer``'s cumulative update by a learned ``sum(s)`` (a coin-betting tuner).

    With ``u_t`` the base update, ``S = sum(s)``, ``Delta_t = (x_t - x_ref) / (S + eps)``:

    $$
    \begin{aligned}
        h &= \bigl\langle \Delta_t,\ g_t + \lambda\, S\, \|g_t\| \, x_t / (\|x_t\| + \epsilon)\bigr\rangle,\quad
        m \leftarrow \max(\beta m, |h|),\quad v \leftarrow \beta^2 v + h^2 \\
        r &\leftarrow \max(0, \beta r - s\, h),\quad
        s \leftarrow \frac{s_\mathrm{init}\, m / n + r}{\sqrt v + \epsilon},\quad
        x_{t+1} = x_\mathrm{ref} + \textstyle\sum s\,(\Delta_t + u_t)
    \end{aligned}
    $$

    per beta (vectors of length ``n``). Returns ``x_{t+1} - x_t``, so chain it **last**
    (anything after it would corrupt the target); give the base its schedule with peak 1.

    The argument order is ``optax.contrib.mechanize``'s, whose algorithm differs in two details (see
    the module docstring) and whose ``s_init`` default is 1e-6 (``MECHANIC_PRESETS["optax"]``).

    Args:
      base_optimizer: any optax transform producing signed updates (e.g. ``optax.adam(1.0)``).
      weight_decay: ``lambda``, Mechanic's own decay on the tuner (not the base's).
      eps: guards the divisions.
      s_init: initial bet (scale of the first steps).
      num_betas: the number of tuners, with discounts ``1 - 10^-k``, k = 1..num_betas (a static
        int; None: 6, as optax.contrib; with ``optax.inject_hyperparams`` pass it in ``static_args``).
      betas: the discounts themselves, each in (0, 1]; overrides ``num_betas``.
      axis_name: mapped axis over which params/state are sharded (``shard_map``/``pmap``);
        the three global sums behind ``h`` are then ``psum``-ed.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with `MechanicState`; ``update``
      needs ``params`` and forwards extra arguments to ``base_optimizer``.

    Raises:
      ValueError: a concrete hyperparameter out of range (NaN included), NaN/Inf in the
        parameters given to ``init``.
      TypeError: ``base_optimizer`` without ``init``/``update``, a hyperparameter of the wrong type;
        integer or complex parameters or updates.

    Bad values at run time (the rule of ``optim._lrfree``): a gradient with a NaN/Inf entry,
    or one whose square overflows the float32 state, or an injected hyperparameter out of
    range skips the step: zero updates, Mechanic's and the base's state unchanged,
    ``num_nonfinite`` + 1. float16/bfloat16 parameters keep a float32 reference point; the
    base keeps the dtypes of its own state.

    Example:
      >>> import jax.numpy as jnp, optax, optim
      >>> tx = optim.mechanize(optax.adam(1.0))
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Cutkosky, Defazio, Mehta, [Mechanic: A Learning Rate Tuner](https://arxiv.org/abs/2306.00144), NeurIPS 2023.
    """
    base = base_optimizer
    if not hasattr(base, "init") or not hasattr(base, "update"):
        V.fail("base_optimizer", base, "an optax.GradientTransformation (with `init` and `update`)",
               "Pass e.g. optax.adam(1.0) (the base's learning rate is Mechanic's scale unit).", TypeError)
    if betas is None:
        num_betas = V.static_int("num_betas", 6 if num_betas is None else num_betas, 1,
                                 "The paper uses 6 (discounts 1 - 10^-k).")
        betas = tuple(1.0 - 10.0 ** -(k + 1) for k in range(num_betas))
    if not isinstance(betas, (tuple, list)) or not betas:
        V.fail("betas", betas, "a non-empty tuple of floats in (0, 1]", "The paper uses 1 - 10^-k, k = 1..6.")
    hp_ok = V.all_of(
        V.nonnegative("weight_decay", weight_decay, "The paper uses 0.01."),
        V.positive("s_init", s_init, "The paper uses 1e-8."),
        V.positive("eps", eps, "The paper uses 1e-8."),
        *(V.interval(f"betas[{i}]", b, 0.0, 1.0, lo_closed=False, hi_closed=True,
                     hint="The paper uses 1 - 10^-k, k = 1..6.") for i, b in enumerate(betas)),
    )
    base = optax.with_extra_args_support(base)
    n = len(betas)

    def init_fn(params):
        check_init("mechanize", params)
        acc = _tree.accumulation_dtype()
        zeros = jnp.zeros((n,), acc)
        return MechanicState(
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), base.init(params), copy_to_state(params),
            zeros, jnp.full((n,), _M_INIT, acc), zeros, zeros,
        )

    def update_fn(updates, state, params=None, **extra_args):
        check_update_args("mechanize", updates, params, state.x_ref, "the params given to `init`")
        acc = _tree.accumulation_dtype()
        beta = jnp.asarray(betas, acc)
        s_sum = jnp.sum(state.s)
        g_sq, x_sq = _tree.tree_reduce_sum(
            lambda x, g: (jnp.square(_tree.to_acc(g)), jnp.square(_tree.to_acc(x))), params, updates,
            axis_name=axis_name
        )
        scale = s_sum + eps
        decay = (weight_decay * s_sum * jnp.sqrt(g_sq) / (jnp.sqrt(x_sq) + eps)).astype(acc)

        # one pass over x - x_ref: <x - x_ref, g + decay x> (two sums sharing x - x_ref made XLA store it)
        h = _tree.tree_reduce_sum(
            lambda x, x0, g: (x - x0) * (g + decay * x), params, state.x_ref, updates, axis_name=axis_name
        ) / scale
        m = jnp.maximum(beta * state.m, jnp.abs(h))
        v = beta * beta * state.v + h * h
        r = jnp.maximum(0.0, beta * state.r - state.s * h)
        s = (s_init / n * m + r) / (jnp.sqrt(v) + eps)
        new_sum = jnp.sum(s)
        gate = Gate.of(jnp.isfinite(h) & jnp.all(jnp.isfinite(s)) & fits(g_sq, state.x_ref) & hp_ok)

        def step():
            base_updates, base_state = base.update(updates, state.base_state, params, **extra_args)
            # the base may change its state's dtypes (optax.adam with float16 params and float32
            # grads returns float32 moments): keep the types of the state it was initialised with
            base_state = jax.tree.map(lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)), base_state,
                                      state.base_state)
            new_updates = jax.tree.map(
                lambda x, x0, u: ((x0 - x) + new_sum * ((x - x0) / scale + u)).astype(x.dtype),
                params, state.x_ref, base_updates,
            )
            return new_updates, base_state

        def skip():
            return jax.tree.map(jnp.zeros_like, params), state.base_state

        # the base state is the base's own: skip its step by a branch, not a select (which costs a copy)
        new_updates, base_state = jax.lax.cond(gate.take, step, skip)
        stepped = MechanicState(state.count, state.num_nonfinite, base_state, state.x_ref, s, m, v, r)
        return commit(gate, new_updates, stepped, state, gated=("base_state",))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
