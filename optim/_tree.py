"""Fused tree reductions: the one place where cross-device reductions live.

Every global quantity an optimizer needs (a dot product over all parameters, a norm, a
sum, a max over particles) goes through these helpers. With ``axis_name=None`` they reduce
over the local pytree; with an ``axis_name`` they then ``psum``/``pmax``/``pmin`` over that
mapped axis, so the result is exact when parameters, optimizer state or particles are
sharded under ``shard_map`` or ``pmap``.

Reductions accumulate in float32 at least (float64 under ``jax_enable_x64``), whatever
the leaf dtype, so bfloat16 parameters never degrade a global estimate.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp

AxisName = Hashable | tuple[Hashable, ...] | None


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """float32, or float64 when x64 is on, or wider if an input is wider."""
    base = jnp.zeros((), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32).dtype
    return jnp.result_type(base, *[d for d in dtypes if jnp.issubdtype(d, jnp.floating)])


def _acc(x):
    return jnp.asarray(x).astype(accumulation_dtype(jnp.asarray(x).dtype))


to_acc = _acc  # public name for the transforms: a leaf in the accumulation dtype (or wider)


def state_dtype(dtype) -> jnp.dtype:
    """The dtype of a state buffer for parameters of ``dtype``: float32 at least.

    float16 cannot hold the products a step-size estimate accumulates (``d * g`` with
    ``d = 1e-6`` underflows, ``g**2`` overflows above 256); bfloat16 keeps 8 mantissa bits,
    too few for running sums. Parameters keep their dtype; only the optimizer's buffers widen.
    """
    return jnp.promote_types(dtype, jnp.float32)


def psum(x, axis_name: AxisName):
    """``lax.psum`` over ``axis_name``, or the identity when it is None."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def pmax(x, axis_name: AxisName):
    """``lax.pmax`` over ``axis_name``, or the identity when it is None."""
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def pmin(x, axis_name: AxisName):
    """``lax.pmin`` over ``axis_name``, or the identity when it is None."""
    return x if axis_name is None else jax.lax.pmin(x, axis_name)


def tree_reduce_sum(fn: Callable[..., Any], *trees: Any, axis_name: AxisName = None) -> jax.Array:
    """sum over leaves of ``sum(fn(*leaves))`` in the accumulation dtype, then ``psum``.

    ``fn`` may return a tuple of k arrays: the result is then the k sums (sibling reductions,
    which XLA may fuse).
    """
    leaves = [jax.tree.leaves(t) for t in trees]

    def part(*ls):
        out = fn(*ls)
        if not isinstance(out, tuple):
            return jnp.sum(_acc(out))
        return jnp.stack([jnp.sum(_acc(o)) for o in out])

    parts = [part(*ls) for ls in zip(*leaves)]
    if not parts:  # an empty tree: zeros of the shape one leaf would give
        parts = [jnp.zeros(jax.eval_shape(part, *[jnp.zeros(())] * len(trees)).shape, accumulation_dtype())]
    total = sum(parts)
    return psum(jnp.asarray(total, accumulation_dtype()), axis_name)


def tree_vdot(a: Any, b: Any, axis_name: AxisName = None) -> jax.Array:
    """<a, b> over all leaves (real), exact across ``axis_name``."""
    return tree_reduce_sum(lambda x, y: _acc(x) * _acc(y), a, b, axis_name=axis_name)


def tree_sum(a: Any, axis_name: AxisName = None) -> jax.Array:
    """Sum of all entries of all leaves, exact across ``axis_name``."""
    return tree_reduce_sum(lambda x: x, a, axis_name=axis_name)


def tree_norm_sq(a: Any, axis_name: AxisName = None) -> jax.Array:
    """||a||_2^2 over all leaves, exact across ``axis_name``."""
    return tree_reduce_sum(lambda x: jnp.square(_acc(x)), a, axis_name=axis_name)


def tree_norm(a: Any, axis_name: AxisName = None) -> jax.Array:
    """||a||_2 over all leaves, exact across ``axis_name``."""
    return jnp.sqrt(tree_norm_sq(a, axis_name))


def tree_l1(a: Any, axis_name: AxisName = None) -> jax.Array:
    """||a||_1 over all leaves, exact across ``axis_name``."""
    return tree_reduce_sum(lambda x: jnp.abs(_acc(x)), a, axis_name=axis_name)


def tree_max(a: Any, axis_name: AxisName = None) -> jax.Array:
    """max over all entries of all leaves, exact across ``axis_name`` (-inf for an empty tree)."""
    leaves = [jnp.max(_acc(x)) for x in jax.tree.leaves(a) if jnp.size(x)]
    local = jnp.max(jnp.stack(leaves)) if leaves else jnp.asarray(-jnp.inf, accumulation_dtype())
    return pmax(local, axis_name)


def tree_all(a: Any) -> jax.Array | bool:
    """Logical and of a tree of boolean scalars (True for an empty tree)."""
    leaves = jax.tree.leaves(a)
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), bool)


def leaf_reduce_sum(fn: Callable[..., jax.Array], *trees: Any, axis_name: AxisName = None) -> Any:
    """Per-leaf ``sum(fn(*leaves))`` in the accumulation dtype, then ``psum``: a tree of scalars.

    For layer-wise methods (LDoG) whose scalars live per tensor; a sharded tensor still gets
    its exact global value.
    """
    local = jax.tree.map(lambda *ls: jnp.sum(_acc(fn(*ls))), *trees)
    return psum(local, axis_name)
