"""Pieces shared by the learning-rate-free transforms (D-Adaptation, Prodigy, Mechanic, DoG,
COCOB, schedule-free): the skip rule, the step counters, dtypes and argument checks.

**The skip rule** (``Gate`` and ``commit``). A step is *skipped* (zero updates, state
unchanged but for the counters) when

* a statistic of the step is not finite: a NaN/Inf gradient entry, or a finite gradient too
  large for the state: its squared norm (times Prodigy's ``d^2`` when that exceeds 1)
  overflows the state dtype, ``||g|| > 1.8e19`` in float32 (a float32 second moment cannot
  hold ``1e30**2``; a skipped step lets the run continue exactly as if the gradient had not
  come). Where the transform needs no ``||g||^2`` of its own (Prodigy, D-Adapted Adam and
  Lion) this test costs one reduction over the gradient: 6-10 % of a 10M-parameter CPU step
  for Prodigy, 4-6 % for D-Adapted Adam (measured in process CPU time against the code
  before the test; Lion got faster, the norm replaced a ``0 * g`` term in its sum). Folding
  the test into Prodigy's ``<g, x0 - x>`` costs more (any extra term there takes XLA:CPU off
  its fast dot path: 1.2x to 2x). Elsewhere the test reuses a norm the step computes anyway;
* the learning rate of the step is NaN, infinite or negative (a schedule's value), or a
  hyperparameter injected as a traced value (``optax.inject_hyperparams`` under ``jit``) is
  out of its range; concrete invalid values raise ``ValueError`` when the transform is built.

A skipped step increments ``num_nonfinite``; an applied step increments ``count``. The
learning-rate schedule is evaluated at ``count + num_nonfinite`` (the number of ``update``
calls), so a skipped step still moves the schedule on, as a PyTorch scheduler steps once per
iteration whether or not the optimizer did: a schedule that returns NaN once costs one step,
not every later one. Bias corrections and averaging weights use ``count`` (the steps that
entered the moments). A learning rate of exactly 0 applies a step that changes nothing but
``count``, as in the references.

The rule is folded into the step's arithmetic (decays become 1, increments 0), not applied
by selecting between old and new state afterwards: each state leaf is then read and written
once, in place, and a skipped step is the identity exactly. (The select form made XLA keep a
copy of every moment buffer, 2.6x slower than ``optax.contrib.prodigy`` on a 10M-parameter
CPU step.) Both factors of an increment are masked, the gradient once (``gate.mask(g)``) and
each scalar coefficient (``gate.coef(c)``), so a coefficient that is itself NaN (a NaN
learning rate, a NaN first gradient norm) cannot leak into the state through ``NaN * 0``.
(Masking each product ``where(take, c * g, 0)`` instead is as safe but made XLA:CPU split the
fusions: 1.5x slower D-Adapted Adam steps.)

**dtypes.** Parameters may be float16, bfloat16, float32 or float64; integer and complex
parameters raise ``TypeError``. Scalars accumulate in float32 (float64 under x64) and every
state buffer is float32 at least (``_tree.state_dtype``), so float16/bfloat16 parameters train
like float32 ones; updates come back in the parameters' dtype.

**Initial parameters** with NaN/Inf raise ``ValueError`` in ``init`` when they are concrete;
under a trace they cannot be checked, and the steps whose statistics read them are skipped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim import _tree
from optim import _validate as V

ScalarOrSchedule = optax.ScalarOrSchedule  # the one definition: optax's


# ----------------------------------------------------------------------------- construction checks


def check_learning_rate(learning_rate: ScalarOrSchedule, hint: str = "") -> Any:
    """A constant ``learning_rate`` is > 0; a schedule is probed at step 0 (>= 0 there)."""
    if callable(learning_rate):
        V.schedule("learning_rate", learning_rate, V.nonnegative, hint)
        return True
    return V.positive("learning_rate", learning_rate, hint)


def check_betas(betas, *, allow_zero_beta1: bool = True, name: str = "betas") -> tuple[tuple, Any]:
    """``betas`` is a pair with ``beta1`` in [0, 1) (or (0, 1)) and ``beta2`` in (0, 1).

    Returns ``((beta1, beta2), ok)`` with ``ok`` the runtime predicate for traced values.
    """
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        V.fail(name, betas, "a pair (beta1, beta2)", "The reference default is (0.9, 0.999).")
    b1, b2 = betas
    ok1 = V.interval(f"{name}[0]", b1, 0.0, 1.0, lo_closed=allow_zero_beta1, hi_closed=False,
                     hint="The reference default is 0.9." + (" 0 turns momentum off." if allow_zero_beta1 else ""))
    ok2 = V.open_unit(f"{name}[1]", b2, "The reference default is 0.999.")
    return (b1, b2), V.all_of(ok1, ok2)


def optax_alias(name: str, value: Any, default: Any, alias: str, alias_value: Any) -> Any:
    """One hyperparameter under two names, ours and optax.contrib's (``d0`` and ``estim_lr0``).

    Returns ``alias_value`` when it is given (not None), else ``value``; TypeError when both are given
    (``value`` concrete and not its default).
    """
    if alias_value is None:
        return value
    v = V.concrete(value)
    if v is not None and v != default:
        V.fail(alias, alias_value, f"left out when `{name}` is given (got {name}={value!r})",
               f"`{alias}` is optax.contrib's name for `{name}`: pass one of them.", TypeError)
    return alias_value


def check_growth_rate(growth_rate) -> Any:
    """``growth_rate`` is >= 1 (``math.inf`` for unbounded growth of ``d``)."""
    return V.at_least("growth_rate", growth_rate, 1.0,
                      "It bounds d_new / d per step; pass math.inf for no bound (the reference default) or "
                      "e.g. 1.02 for a warmup effect.")


is_static_zero = V.is_zero  # the one concrete-value check lives in optim._validate


def check_mask(mask: Any) -> None:
    """``mask`` is None, a callable ``params -> tree of bools`` or a tree of bools (optax's convention)."""
    if mask is None or callable(mask):
        return
    for leaf in jax.tree.leaves(mask):
        if not isinstance(leaf, (bool, np.bool_)):
            V.fail("mask", mask, "None, a pytree of Python bools shaped like the params, or a callable params -> "
                   "such a pytree", "It selects the leaves that get weight decay, as in optax.add_decayed_weights.",
                   TypeError)


# ----------------------------------------------------------------------------- shared step pieces


def bias_correction(decay, count: jax.Array) -> jax.Array:
    """``1 - decay**(count + 1)`` in the accumulation dtype (Adam's, for the moment after ``count`` steps)."""
    acc = _tree.accumulation_dtype()
    return 1 - jnp.asarray(decay, acc) ** (count + 1).astype(acc)


def adam_step_correction(b1, b2, count: jax.Array) -> jax.Array:
    """Adam's bias correction folded into a step size: ``sqrt(1 - b2^(k+1)) / (1 - b1^(k+1))``, k = ``count``.

    The form of ``dadaptation`` and ``prodigyopt`` (``use_bias_correction=True``) and of optax.contrib's
    ``prodigy``/``dadapt_adamw`` (always on).
    """
    return jnp.sqrt(bias_correction(b2, count)) / bias_correction(b1, count)


def coupled_decay(grads: Any, params: Any, weight_decay: Any, like: Any = None, mask: Any = None) -> Any:
    """Coupled (L2) weight decay ``g + weight_decay * p``, in the dtype of ``like``'s leaves (state buffers).

    ``like=None`` keeps each gradient in its state dtype (float32 at least). ``mask`` (None, a tree of
    Python bools shaped like ``params``, or a callable ``params -> such a tree``) selects the leaves that
    are decayed, as in ``optax.add_decayed_weights``; the others pass through (cast). A static
    ``weight_decay`` of 0 leaves the term out of the program.
    """
    if like is None:
        like = jax.tree.map(lambda g: jnp.zeros((), _tree.state_dtype(g.dtype)), grads)
    cast = jax.tree.map(lambda g, x: g.astype(x.dtype), grads, like)
    if V.is_zero(weight_decay):
        return cast
    keep = jax.tree.map(lambda _: True, params) if mask is None else (mask(params) if callable(mask) else mask)
    return jax.tree.map(lambda g, p, k: g + weight_decay * p.astype(g.dtype) if k else g, cast, params, keep)


# ----------------------------------------------------------------------------- init / update checks


def check_init(name: str, params: Any) -> None:
    """Supported dtypes, and finite values when ``params`` is concrete."""
    V.float_tree(name, "params", params)
    V.finite_tree(name, "params", params)


def check_update_args(name: str, updates: Any, params: Any, ref: Any, ref_name: str) -> None:
    """``params`` given; ``updates``/``params``/``ref`` share one tree structure; float dtypes."""
    V.needs_params(name, params)
    V.same_structure("updates", updates, "params", params)
    V.same_structure("params", params, ref_name, ref)
    V.float_tree(name, "params", params)
    V.float_tree(name, "updates", updates)


# ----------------------------------------------------------------------------- state buffers


def zeros_like_state(params: Any) -> Any:
    """Fresh zero buffers shaped like ``params`` in the state dtype (float32 at least)."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _tree.state_dtype(p.dtype)), params)


def copy_to_state(params: Any) -> Any:
    """A fresh copy of ``params`` in the state dtype (so params and state never share a buffer)."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=_tree.state_dtype(p.dtype), copy=True), params)


# ----------------------------------------------------------------------------- schedules and counters


def schedule_step(state: Any) -> jax.Array:
    """The step count a schedule sees: ``update`` calls so far (applied plus skipped)."""
    return state.count + state.num_nonfinite


def learning_rate_at(learning_rate: ScalarOrSchedule, step: jax.Array) -> tuple[jax.Array, Any]:
    """The learning rate at ``step`` in the accumulation dtype, and whether it is valid.

    A constant was checked when the transform was built (``ok`` is then a Python ``True``);
    a schedule's value, or a traced injected one, must be finite and >= 0 or the step is skipped.
    """
    lr = learning_rate(step) if callable(learning_rate) else learning_rate
    ok = True
    if callable(learning_rate) or V.is_traced(learning_rate):
        ok = jnp.isfinite(lr) & (lr >= 0)
    return jnp.asarray(lr).astype(_tree.accumulation_dtype()), ok


def fits(grad_sq: jax.Array, like: Any, coef: Any = 1.0) -> jax.Array:
    """``coef * ||g||^2`` is finite and representable in the state dtype of ``like`` (a tree).

    False for a NaN/Inf gradient and for one whose squared norm overflows the narrowest state
    buffer (``||g|| > 1.8e19`` for float32), whatever the accumulation dtype of ``grad_sq``.
    Every skip test of an overflowing gradient goes through here; ``coef`` is the factor a
    transform puts on ``g^2`` in its second moment when that can exceed 1 (Prodigy's ``d^2``).
    """
    leaves = [x for x in jax.tree.leaves(like) if jnp.issubdtype(x.dtype, jnp.floating)]
    big = min((float(jnp.finfo(x.dtype).max) for x in leaves), default=float(jnp.finfo(jnp.float32).max))
    return jnp.maximum(coef, 1) * grad_sq <= big  # NaN compares False


class Gate(NamedTuple):
    """Whether a step is applied, for building its state updates so that a skip is the identity.

    ``ok``: the step's statistics, learning rate and traced hyperparameters are valid.
    ``take``: ``ok`` and the step is active (a learning rate of 0, or no gradient signal
    yet, leaves the state as it is but advances ``count``). Write a moment update as
    ``gate.decay(b) * x + gate.coef(c) * gm`` with ``gm = gate.mask(g)`` computed once: with
    ``take`` false it returns ``x`` exactly, even when ``c`` or ``g`` hold NaN/Inf.
    """

    ok: jax.Array
    take: jax.Array

    @classmethod
    def of(cls, ok: Any, active: jax.Array | None = None) -> "Gate":
        ok = jnp.asarray(ok, bool)
        return cls(ok, ok if active is None else ok & active)

    def decay(self, b):
        """``b`` when the step is taken, else 1."""
        return jnp.where(self.take, b, 1)  # keeps a Python float weakly typed

    def mask(self, x):
        """``x`` when the step is taken, else zeros (a leaf or a pytree); NaN-safe."""
        return jax.tree.map(lambda a: jnp.where(self.take, a, jnp.zeros((), a.dtype)), x)

    def coef(self, c):
        """A scalar coefficient when the step is taken, else 0 (so a NaN ``c`` never multiplies a 0)."""
        return jnp.where(self.take, c, 0)


def commit(gate: Gate, updates: Any, stepped: Any, state: Any, gated: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """Apply the skip rule to a stepped state: masked updates, kept scalars, counters.

    Fields named in ``gated`` were built with ``gate`` (so they already equal the old state
    on a skip) and are taken as they are; so are leaves the step passed through unchanged
    (``x0``). Every other field is selected leafwise, which costs a copy of the old buffer:
    use it only for scalars. ``count`` advances when ``gate.ok``; ``num_nonfinite`` when not.
    """

    def pick(new, old):
        return jax.tree.map(lambda a, b: a if a is b else jnp.where(gate.take, a, b), new, old)

    fields = {}
    for name in state._fields:
        new, old = getattr(stepped, name), getattr(state, name)
        if name == "count":
            fields[name] = jnp.where(gate.ok, optax.safe_increment(old), old)
        elif name == "num_nonfinite":
            fields[name] = jnp.where(gate.ok, old, optax.safe_increment(old))
        elif name in gated:
            fields[name] = new
        else:
            fields[name] = pick(new, old)
    return gate.mask(updates), type(state)(**fields)
