"""Every input check of ``optim`` and the one format of its messages.

A message names the argument in backticks, says what was expected and what came in, and
ends with what to do::

    `d0` must be a finite number > 0, got -1.0. It is the initial distance estimate; ...

Hyperparameter checks run in the factories. A concrete value (a Python number, a NumPy or
a concrete JAX scalar) that is invalid raises ``ValueError`` there. A *traced* value, as
when ``optax.inject_hyperparams`` rebuilds a transform inside a jitted ``update``, cannot
raise: the check then returns a traced boolean that the transform folds into its skip
rule (the step is skipped and counted in ``num_nonfinite``; see ``optim._lrfree``). Every
check returns ``True`` (a Python bool, which costs nothing in the traced program) for a
concrete valid value, so ``ok = all_of(check(...), ...)`` is the runtime predicate.

Schedules (callables of the step count) are probed once at step 0 when the factory runs;
the value they return at later steps is checked by the transform at run time.

Trace-time checks of ``update``/``init`` arguments (tree structure, dtypes, finiteness of
concrete initial parameters) live here too, so each message is written once.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

#: The parameter dtypes every learning-rate-free transform supports. Statistics and state
#: buffers are kept in float32 at least, so float16/bfloat16 parameters train like float32.
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")

Pred = "bool | jax.Array"


def message(name: str, value: Any, expected: str, hint: str = "") -> str:
    """The one message format: what came in, what was expected, what to do."""
    return f"`{name}` must be {expected}, got {_show(value)}. {hint}".rstrip()


def fail(name: str, value: Any, expected: str, hint: str = "", error: type = ValueError):
    """Raise ``error`` (ValueError unless a type is wrong) with `message`."""
    raise error(message(name, value, expected, hint))


class Text(str):
    """A description shown as is in a message (``Text("an array of shape (3,)")``), not quoted."""

    def __repr__(self) -> str:
        return str(self)


def _show(value: Any) -> str:
    if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, jax.core.Tracer):
        try:
            if np.ndim(value) == 0:
                return repr(np.asarray(value).item())
        except Exception:  # a typed PRNG key has no .item()
            pass
        return f"an array of shape {np.shape(value)} and dtype {value.dtype}"
    return repr(value)


def concrete(value: Any) -> float | None:
    """``float(value)`` for a concrete real scalar; None for tracers, callables and non-scalars."""
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) != 0:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):  # tracers raise ConcretizationTypeError, a TypeError
        return None


def is_zero(value: Any) -> bool:
    """True for a concrete 0 (a Python, NumPy or concrete JAX scalar): the term it scales can be left
    out of the traced program. False for anything traced or non-zero."""
    return concrete(value) == 0.0


def static_float(name: str, value: Any, hint: str = "Pass a concrete number, not one computed under jit/vmap.",
                 ) -> float:
    """``float(value)`` for a concrete scalar; TypeError naming ``name`` for a traced one (it is compiled in)."""
    v = concrete(value)
    if v is None:
        fail(name, Text("a traced value"), "a Python number (static: it is compiled into the program)", hint, TypeError)
    return v


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def all_of(*preds: Any) -> Any:
    """The conjunction of predicates; a Python ``True`` when every one is (nothing traced)."""
    out: Any = True
    for p in preds:
        if p is True:
            continue
        out = p if out is True else (out & p)
    return out


def _runtime(value: Any, predicate: Callable[[jax.Array], jax.Array]) -> Any:
    """The traced predicate for a traced value; True for anything not checkable (a callable)."""
    if is_traced(value):
        return predicate(jnp.asarray(value))
    return True


def _real(name: str, value: Any, expected: str, hint: str) -> float | None:
    """The concrete value, after rejecting a wrong type (a string, a complex, an array of size > 1)."""
    if callable(value) or is_traced(value):
        return None
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes, complex)):
        fail(name, value, expected, hint, TypeError)
    if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) != 0:
        fail(name, value, expected + " (a scalar)", hint, TypeError)
    v = concrete(value)
    if v is None:
        fail(name, value, expected, hint, TypeError)
    return v


def positive(name: str, value: Any, hint: str = "") -> Any:
    """``value`` is a finite number > 0."""
    expected = "a finite number > 0"
    v = _real(name, value, expected, hint)
    if v is not None and not (math.isfinite(v) and v > 0):
        fail(name, value, expected, hint)
    return _runtime(value, lambda x: jnp.isfinite(x) & (x > 0))


def nonnegative(name: str, value: Any, hint: str = "") -> Any:
    """``value`` is a finite number >= 0."""
    expected = "a finite number >= 0"
    v = _real(name, value, expected, hint)
    if v is not None and not (math.isfinite(v) and v >= 0):
        fail(name, value, expected, hint)
    return _runtime(value, lambda x: jnp.isfinite(x) & (x >= 0))


def finite(name: str, value: Any, hint: str = "") -> Any:
    """``value`` is a finite real number (of any sign)."""
    expected = "a finite real number"
    v = _real(name, value, expected, hint)
    if v is not None and not math.isfinite(v):
        fail(name, value, expected, hint)
    return _runtime(value, jnp.isfinite)


def interval(name: str, value: Any, lo: float, hi: float, *, lo_closed: bool, hi_closed: bool,
             hint: str = "") -> Any:
    """``value`` lies in the interval from ``lo`` to ``hi`` (closed or open at each end)."""
    span = f"{'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"
    expected = f"in the open interval {span}" if not (lo_closed or hi_closed) else f"in {span}"

    def inside(x):
        return (x >= lo if lo_closed else x > lo) & (x <= hi if hi_closed else x < hi)

    v = _real(name, value, expected, hint)
    if v is not None and not inside(v):
        fail(name, value, expected, hint)
    return _runtime(value, lambda x: inside(x))


def open_unit(name: str, value: Any, hint: str = "") -> Any:
    """``value`` lies in the open interval (0, 1)."""
    return interval(name, value, 0.0, 1.0, lo_closed=False, hi_closed=False, hint=hint)


def at_least(name: str, value: Any, bound: float, hint: str = "") -> Any:
    """``value`` >= ``bound`` (``math.inf`` allowed)."""
    expected = f">= {bound:g}"
    v = _real(name, value, expected, hint)
    if v is not None and not v >= bound:
        fail(name, value, expected, hint)
    return _runtime(value, lambda x: x >= bound)


def nonnegative_int(name: str, value: Any, hint: str = "") -> Any:
    """``value`` is an integer >= 0 (a Python int, or a concrete integer-valued scalar)."""
    if isinstance(value, (bool, float, np.bool_)):
        fail(name, value, "an int >= 0", hint, TypeError)
    v = _real(name, value, "an int >= 0", hint)
    if v is not None and not (math.isfinite(v) and v >= 0 and v == int(v)):
        fail(name, value, "an int >= 0", hint)
    return _runtime(value, lambda x: x >= 0)


def static_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    """``value`` is a Python int >= ``minimum`` (static configuration: shapes depend on it)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        fail(name, value, f"a static Python int >= {minimum}", hint,
             TypeError if not isinstance(value, (int, np.integer)) or isinstance(value, bool) else ValueError)
    return int(value)


def choice(name: str, value: Any, choices: Iterable[Any], hint: str = "") -> None:
    """``value`` is one of ``choices`` (static configuration)."""
    choices = tuple(choices)
    try:
        ok = value in choices
    except Exception:  # an array compared with strings
        ok = False
    if not ok:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices), hint or "Pick one of those.")


def schedule(name: str, fn: Any, check: Callable[[str, Any, str], Any], hint: str = "") -> None:
    """Probe a schedule (a callable of the step count) at step 0 and check the value it returns.

    A schedule that cannot be called with a concrete int32 step (or closes over tracers) is
    not probed; its values are still checked at run time by the transform.
    """
    if not callable(fn):
        return
    try:
        value = fn(jnp.zeros((), jnp.int32))
    except Exception:  # not ours to diagnose here; update() calls it the same way and will raise
        return
    v = concrete(value)
    if v is not None:
        check(f"{name}(0)", v, (hint + " The schedule is evaluated at every step count.").strip())


# ----------------------------------------------------------------------------- trees


def same_structure(name: str, tree: Any, ref_name: str, ref: Any) -> None:
    """Raise a ValueError at trace time when two pytrees differ in structure."""
    got, want = jax.tree.structure(tree), jax.tree.structure(ref)
    if got != want:
        raise ValueError(
            f"`{name}` has tree structure {got} but `{ref_name}` has {want}. "
            f"Pass `{name}` with the same structure as the `{ref_name}` the optimizer was initialised with."
        )


def float_tree(owner: str, name: str, tree: Any) -> None:
    """Every leaf of ``tree`` has one of `SUPPORTED_DTYPES`; TypeError naming the leaf otherwise."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if dtype.name not in SUPPORTED_DTYPES:
            where = f"`{name}{jax.tree_util.keystr(path)}`"
            if jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_:
                kind = " (an integer dtype: the update would be truncated)"
            elif jnp.issubdtype(dtype, jnp.complexfloating):
                kind = " (complex: the step-size statistics are real inner products)"
            else:
                kind = ""
            raise TypeError(
                f"{where} has dtype {dtype}{kind}, but optim.{owner} supports floating-point parameters "
                f"of dtype {', '.join(SUPPORTED_DTYPES)}. Cast them, e.g. "
                f"`jax.tree.map(lambda x: x.astype(jnp.float32), {name})`, and keep integer leaves out of "
                "the optimizer (optax.partition or optax.masked)."
            )


def finite_tree(owner: str, name: str, tree: Any) -> None:
    """ValueError if a *concrete* ``tree`` holds NaN/Inf (nothing is checked under a trace)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if any(is_traced(x) for _, x in leaves):
        return
    for path, leaf in leaves:
        if not bool(np.all(np.isfinite(np.asarray(leaf)))):  # numpy (ml_dtypes) handles bfloat16 too
            raise ValueError(
                f"`{name}{jax.tree_util.keystr(path)}` holds NaN or Inf at `optim.{owner}(...).init`. The "
                "initial parameters are the optimizer's reference point (its distance and step-size estimates "
                "start from them): initialise them finite."
            )


def find_state(state: Any, cls: type, message: str) -> Any:
    """The one ``cls`` state inside ``state`` (e.g. an ``optax.chain`` state); ValueError otherwise.

    ``message`` is formatted with ``{found}``, the number of ``cls`` states found.
    """
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)]
    if len(found) != 1:
        raise ValueError(message.format(found=len(found)))
    return found[0]


def needs_params(owner: str, params: Any) -> None:
    if params is None:
        raise ValueError(
            f"optim.{owner} needs `params`: call `update(updates, state, params)` "
            "(the step depends on the current parameters)."
        )
