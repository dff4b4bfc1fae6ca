"""Construction-time checks of hyperparameters, shared by the optimizer factories.

A value that is not concrete (a tracer, when ``optax.inject_hyperparams`` rebuilds the
transform inside ``update``) or a schedule (a callable) is not checked: it was checked when
the transform was first built from Python numbers, and a schedule is the caller's contract.
"""

from __future__ import annotations

import math


def _concrete(value) -> float | None:
    if callable(value):
        return None
    try:
        return float(value)
    except TypeError:  # tracers raise ConcretizationTypeError, a TypeError
        return None


def _fail(name: str, value, expected: str, hint: str) -> None:
    raise ValueError(f"`{name}` must be {expected}, got {value!r}. {hint}".rstrip())


def check_positive(name: str, value, hint: str = "") -> None:
    """``value`` is a finite number > 0."""
    v = _concrete(value)
    if v is not None and not (math.isfinite(v) and v > 0):
        _fail(name, value, "a finite number > 0", hint)


def check_nonnegative(name: str, value, hint: str = "") -> None:
    """``value`` is a finite number >= 0."""
    v = _concrete(value)
    if v is not None and not (math.isfinite(v) and v >= 0):
        _fail(name, value, "a finite number >= 0", hint)


def check_open_unit(name: str, value, hint: str = "") -> None:
    """``value`` lies in the open interval (0, 1)."""
    v = _concrete(value)
    if v is not None and not (0.0 < v < 1.0):
        _fail(name, value, "in the open interval (0, 1)", hint)


def check_nonnegative_int(name: str, value, hint: str = "") -> None:
    """``value`` is an integer >= 0 (a Python int, or a concrete integer-valued array)."""
    if isinstance(value, bool) or isinstance(value, float):
        _fail(name, value, "an int >= 0", hint)
    v = _concrete(value)
    if v is not None and not (math.isfinite(v) and v >= 0 and v == int(v)):
        _fail(name, value, "an int >= 0", hint)
