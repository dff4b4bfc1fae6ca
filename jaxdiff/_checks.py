"""Every input check of ``jaxdiff`` that more than one module needs, and the one format of their messages.

A message names the argument in backticks, says what was expected and what came in, and ends with
what to do (the format ``optim`` uses too)::

    `eta` must be a real number in [0, 1], got 1.5. 0 is the deterministic DDIM, 1 DDPM's ancestral step ...

Checks run at trace time on concrete values (Python numbers, NumPy arrays, concrete JAX arrays) or once
in constructors; nothing here adds work to a compiled program. A traced value (an argument of ``jax.jit``,
a ``vmap``-ped leaf) is not checked: ``concrete`` returns None for it and each check returns quietly.
Quantities computed from concrete inputs while a ``jit`` traces (alpha at the first grid point, say) would
be staged into the trace; ``eager`` computes them at trace time instead (``jax.ensure_compile_time_eval``).

Array leaves of pytrees (schedule parameters, the CFG scale) are checked where they are used
(``jd.sample``, ``jd.timesteps``, ``fkc.sample``), not in constructors: JAX rebuilds pytrees through the
constructor with gradients, tangents and placeholders as leaves. Static fields are checked in constructors.

The one opt-in runtime check is ``check_grid`` on a traced grid, which emits ``jax.experimental.checkify``
checks (see its docstring); ``fkc.sample(..., checks=True)`` does the same for its traced arguments.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

__all__ = [
    "message",
    "fail",
    "show",
    "is_traced",
    "concrete",
    "concrete_scalar",
    "all_concrete",
    "require_concrete",
    "static_int",
    "static_bool",
    "choice",
    "real_number",
    "float_array",
    "prng_key",
    "as_grid",
    "check_grid",
    "validate_grid",
    "eager",
]

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def show(value: Any) -> str:
    """A short description of ``value`` for a message: scalars by value, arrays by shape and dtype."""
    if isinstance(value, jax.core.Tracer):
        return f"a traced array of shape {jnp.shape(value)} and dtype {jnp.result_type(value)}"
    if isinstance(value, (jax.Array, np.ndarray)):
        try:
            if np.ndim(value) == 0:
                return repr(np.asarray(value).item())
            if np.size(value) <= 6 and np.issubdtype(np.asarray(value).dtype, np.number):
                return f"{np.asarray(value).tolist()} (shape {np.shape(value)}, dtype {value.dtype})"
        except Exception:  # a typed PRNG key has no NumPy value
            pass
        return f"an array of shape {np.shape(value)} and dtype {value.dtype}"
    if isinstance(value, dict):
        return f"a dict with keys {list(value)[:6]}"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"a {type(value).__name__} of length {len(value)}"
    if isinstance(value, (str, bytes, numbers.Number, type(None), list, tuple)):
        return repr(value)
    return f"a {type(value).__name__}"


def message(name: str, value: Any, expected: str, hint: str = "") -> str:
    """The one message format: what came in, what was expected, what to do."""
    return f"`{name}` must be {expected}, got {show(value)}. {hint}".rstrip()


def fail(name: str, value: Any, expected: str, hint: str = "", error: type = ValueError):
    """Raise ``error`` (``ValueError`` unless the type is wrong) with ``message``."""
    raise error(message(name, value, expected, hint))


def is_traced(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a tracer (its value is unknown at trace time)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array, or None when it is traced or not array-like (the check is then skipped)."""
    if isinstance(x, jax.core.Tracer) or x is None:
        return None
    if isinstance(x, (list, tuple)) and is_traced(x):
        return None
    try:
        out = np.asarray(x)
    except Exception:  # a tracer inside a container, a typed PRNG key, an object without __array__
        return None
    if out.dtype == object:
        return None
    return out


def all_concrete(*xs: Any) -> bool:
    """Whether every argument is a concrete real scalar (so value checks can run at trace time)."""
    return all(concrete_scalar(x) is not None for x in xs)


def require_concrete(x: Any, error: str) -> np.ndarray:
    """``x`` as a float64 NumPy array; ``ValueError(error)`` when it is traced (for code that needs values)."""
    a = concrete(x)
    if a is None:
        raise ValueError(error)
    return a.astype(np.float64)


def concrete_scalar(x: Any) -> float | None:
    """``float(x)`` for a concrete real scalar, None otherwise (traced, non-scalar, non-numeric)."""
    a = concrete(x)
    if a is None or a.ndim != 0 or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        return None
    if np.iscomplexobj(a):
        return None
    return float(a)


def static_int(name: str, value: Any, *, minimum: int | None = None, allowed: Iterable[int] | None = None,
               hint: str = "") -> int:
    """``value`` is a Python int (not a bool, not a float such as 2.0): static configuration fixes shapes."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        what = "one of " + ", ".join(map(str, allowed)) if allowed is not None else "a Python int"
        fail(name, value, f"{what} (a static Python int)", hint or f"Pass e.g. `{name}=2`, not a float or array.",
             TypeError)
    value = int(value)
    if allowed is not None and value not in tuple(allowed):
        fail(name, value, "one of " + ", ".join(map(str, allowed)), hint)
    if minimum is not None and value < minimum:
        fail(name, value, f"an int >= {minimum}", hint)
    return value


def static_bool(name: str, value: Any, hint: str = "") -> bool:
    if not isinstance(value, (bool, np.bool_)):
        fail(name, value, "True or False", hint, TypeError)
    return bool(value)


def choice(name: str, value: Any, choices: Iterable[Any], hint: str = "") -> None:
    """``value`` is one of ``choices`` (static configuration); the message lists them."""
    choices = tuple(choices)
    try:
        ok = any(value == c and type(value) is type(c) for c in choices)
    except Exception:  # an array compared with strings
        ok = False
    if not ok:
        raise ValueError(f"Unknown `{name}={value!r}`; expected one of {choices}. {hint}".rstrip())


def real_number(name: str, value: Any, *, lo: float = -math.inf, hi: float = math.inf, lo_closed: bool = True,
                hi_closed: bool = True, hint: str = "") -> float | None:
    """A concrete real scalar in the interval (checked), or None when traced (unchecked).

    Raises TypeError for strings, complex numbers, arrays of size > 1 and other non-numbers, ValueError for
    NaN, infinities outside the interval and values outside it.
    """
    span = f"{'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"
    expected = "a real number" if (lo, hi) == (-math.inf, math.inf) else f"a real number in {span}"
    if is_traced(value):
        return None
    if isinstance(value, (str, bytes, complex, bool, np.bool_)) or callable(value):
        fail(name, value, expected, hint, TypeError)
    a = concrete(value)
    if a is None or a.size != 1 or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        fail(name, value, expected + " (a scalar)", hint, TypeError)
    v = float(a.reshape(()))
    inside = (v >= lo if lo_closed else v > lo) and (v <= hi if hi_closed else v < hi)
    if math.isnan(v) or not inside:
        fail(name, value, expected, hint)
    return v


def float_array(name: str, x: Any, hint: str = "") -> None:
    """``x`` is one real floating-point array (TypeError for pytrees, complex, integer or boolean data)."""
    if isinstance(x, (dict, list, tuple)) or not hasattr(x, "dtype") and not isinstance(x, numbers.Real):
        fail(name, x, "one real floating-point array", hint or f"Pass `{name}` as a jnp array, e.g. "
             "`jax.random.normal(key, shape)`; pytrees are not states.", TypeError)
    dtype = jnp.result_type(x)
    if dtype.name not in FLOAT_DTYPES:
        kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else str(dtype)
        raise TypeError(
            f"`{name}` must be a real floating-point array ({', '.join(FLOAT_DTYPES)}), got dtype {kind} "
            f"(shape {jnp.shape(x)}). {hint or f'Cast it, e.g. `{name}.astype(jnp.float32)`.'}".rstrip()
        )


def prng_key(name: str, key: Any, hint: str = "") -> None:
    """``key`` is a PRNG key: a typed key (``jax.random.key``) or a raw uint32 key (``jax.random.PRNGKey``)."""
    if key is None:
        return
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if jnp.ndim(key) != 0:
            fail(name, key, "a single PRNG key (shape ())", hint or "Split keys outside and vmap the call.", ValueError)
        return
    if dtype is not None and dtype == jnp.uint32 and jnp.shape(key) == (2,):
        return
    fail(name, key, "a PRNG key", hint or f"Pass `{name}=jax.random.key(0)` (an int is not a key).", TypeError)


# ----------------------------------------------------------------------------------------------------- grids


def as_grid(ts: Any, name: str = "ts"):
    """``ts`` as a 1-D floating JAX array (lists and integer arrays are converted); TypeError for non-numbers."""
    if isinstance(ts, (list, tuple)):
        if is_traced(ts):
            ts = jnp.stack([jnp.asarray(t) for t in ts])
        else:
            try:
                ts = np.asarray(ts, dtype=np.float64)
            except (TypeError, ValueError):
                fail(name, ts, "a 1-D array of times", "Build grids with `jaxdiff.timesteps`.", TypeError)
    if not hasattr(ts, "dtype") or isinstance(ts, dict):
        fail(name, ts, "a 1-D array of times", "Build grids with `jaxdiff.timesteps`.", TypeError)
    dtype = jnp.result_type(ts)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        fail(name, ts, "a 1-D array of real times", "Build grids with `jaxdiff.timesteps`.", TypeError)
    if jnp.ndim(ts) != 1 or jnp.shape(ts)[0] < 2:
        raise ValueError(f"`{name}` must be a 1-D array of at least 2 times, got shape {jnp.shape(ts)}. "
                         "Build grids with `jaxdiff.timesteps`.")
    with jax.ensure_compile_time_eval():  # a concrete grid stays concrete under jit (checks can read it)
        return jnp.asarray(ts, dtype=jnp.result_type(dtype, float))


def eager(fn, *args):
    """``fn(*args)`` evaluated at trace time when its inputs are concrete (None if it is traced)."""
    with jax.ensure_compile_time_eval():
        return concrete(fn(*args))


def _grid_text(a: np.ndarray) -> str:
    return f"{np.round(a[:6], 6).tolist()}{'...' if a.size > 6 else ''}"


def check_grid(schedule, ts, name: str = "ts"):
    """Check a sampling grid for ``schedule`` and return it as a floating array (``jd.check_grid``).

    A valid grid is 1-D with at least 2 times, finite, strictly decreasing (from noise to data) and inside
    the schedule's domain ``schedule.t_domain`` ([0, 1] for ``VPDiscrete``, ``VPCosine`` and
    ``RectifiedFlow``; t >= 0 for the others).

    A concrete grid (a NumPy array, a concrete JAX array, a list) is checked at once; a bad one raises
    ``ValueError``. ``jd.sample`` does this itself. A traced grid (a ``jax.jit`` argument) has no value
    while tracing, so ``jd.sample`` cannot check it; ``check_grid`` then emits the same rules as
    ``jax.experimental.checkify`` checks. That is the opt-in runtime check: call ``check_grid`` inside the
    jitted function and wrap that function in ``checkify.checkify`` (outside ``checkify`` JAX refuses to
    stage a check). Or check the grid before passing it to ``jit``.

    Args:
        schedule: the noise schedule the grid is for.
        ts: the grid, shape ``(num_steps + 1,)``.
        name: the argument name used in messages.

    Returns:
        ``ts`` as a floating JAX array.

    Raises:
        ValueError: a concrete grid that breaks one of the rules (the message says which and what to do).
        TypeError: ``ts`` is not an array of real numbers.

    Example:
        >>> s = jd.VPLinear()
        >>> ts = jd.check_grid(s, jd.timesteps(s, 10))
        >>> run = checkify.checkify(jax.jit(lambda ts: jd.sample(den, x_T, jd.check_grid(s, ts))))  # doctest: +SKIP
        >>> err, x0 = run(jnp.array([0.5, 0.7, 0.1]))  # doctest: +SKIP
        >>> err.throw()  # doctest: +SKIP
        Traceback (most recent call last):
        JaxRuntimeError: `ts` must be strictly decreasing (from noise to data). (`check` failed)
    """
    out = validate_grid(schedule, ts, name)
    if concrete(out) is None:
        lo, hi = schedule.t_domain
        checkify.check(jnp.all(jnp.isfinite(out)), f"`{name}` must be finite (a NaN or infinite time was passed).")
        checkify.check(jnp.all(jnp.diff(out) < 0), f"`{name}` must be strictly decreasing (from noise to data).")
        checkify.check((out[0] <= hi) & (out[-1] >= lo),
                       f"`{name}` must lie in the schedule's domain [{lo:g}, {hi:g}] ({type(schedule).__name__}).")
    return out


def validate_grid(schedule, ts, name: str = "ts", hint: str = "Build grids with `jaxdiff.timesteps`."):
    """``check_grid`` without the runtime part: a concrete grid is checked, a traced one only for its shape."""
    schedule.check_params()
    out = as_grid(ts, name)
    a = concrete(out)
    if a is None:
        return out
    lo, hi = schedule.t_domain
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        fail(name, a, "finite", f"A NaN or infinite time gives NaN samples. {hint}")
    if not np.all(np.diff(a) < 0):
        raise ValueError(
            f"`{name}` must be strictly decreasing (from noise to data); got {_grid_text(a)}. {hint}"
        )
    if a[0] > hi or a[-1] < lo:
        hint = (f"{type(schedule).__name__} is defined for {lo:g} <= t <= {hi:g} (t = 0 is clean data); "
                f"choose `t_start`/`t_end` inside it. {hint}")
        n = getattr(schedule, "num_train_steps", None)
        if n and a[0] > hi and np.allclose(a, np.round(a)):
            hint = (f"These look like diffusers' integer timesteps: a `VPDiscrete` grid is continuous time, with "
                    f"table entry n at t = (n + 1) / {n}. Use `jd.timesteps(s, num_steps, 'trailing')` (or 'linspace', "
                    f"'leading'), or convert with `(timesteps + 1) / {n}`.")
        raise ValueError(
            f"`{name}` must lie in the schedule's domain [{lo:g}, {hi:g}], got times from {a[0]:g} to {a[-1]:g}. {hint}"
        )
    return out
