"""Consensus numerics shared by CBO, polarized CBO and CBS: Gibbs weights, the weighted mean,
the ESS-targeting alpha, and the per-particle (random batch, kernel) consensus.

**Which particles count.** A particle enters the consensus when its loss *and* its
position are finite. Its weight is ``exp(-alpha (f_i - f_min))`` with ``f_min`` the smallest
finite loss (``pmin`` across devices), so every exponent is <= 0 and the weights lie in
[0, 1] for any ``alpha`` up to the float range; ``alpha = inf`` is the argmin limit (the
product ``alpha * 0`` at the minimum is taken as 0, not NaN). If no loss is finite, every
particle with a finite position gets weight 1 (the ensemble mean). If no particle counts
at all, the consensus is ``fallback`` (the previous consensus inside the transforms; NaN for
`consensus_point` on its own). The mean is accumulated in float32 at least.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optim import _tree
from optim import _validate as V


def _bcast(v, x):
    """Per-particle (N,) vector reshaped to broadcast against a leaf (N, ...)."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def finite_positions(points: Any) -> jax.Array:
    """(N,) bool: every coordinate of particle i is finite (True for an empty tree)."""
    leaves = jax.tree.leaves(points)
    n = jnp.shape(leaves[0])[0]
    ok = jnp.ones((n,), bool)
    for x in leaves:
        ok = ok & jnp.all(jnp.isfinite(x.reshape(n, -1)), axis=1)
    return ok


def scaled(alpha, shift):
    """``alpha * shift`` for ``shift >= 0``, with ``alpha * 0 = 0`` even when ``alpha`` is inf."""
    return jnp.where(shift > 0, alpha * shift, jnp.zeros((), jnp.result_type(alpha, shift)))


def shifted(value, usable, axis_name):
    """``f - f_min`` over the usable particles (pmin across devices); +inf elsewhere.

    Returns ``(shift, finite, any_finite)`` with ``finite`` = usable with a finite loss.
    """
    # materialized once: XLA may otherwise recompute a fused loss in two kernels (one for the min, one
    # for the difference) with different FMA contraction, so the argmin's shift comes out as +-1 ulp,
    # which alpha = 1e9 turns into a weight of 0 or exp(+big)
    value = jax.lax.optimization_barrier(value)
    finite = jnp.isfinite(value) & usable
    safe = jnp.where(finite, value, jnp.inf)
    fmin = _tree.pmin(jnp.min(safe), axis_name)
    any_finite = jnp.isfinite(fmin)
    shift = jnp.where(finite, safe - jnp.where(any_finite, fmin, 0.0), jnp.inf)
    return jax.lax.optimization_barrier(shift), finite, any_finite


def weights(value, usable, alpha, axis_name):
    """Unnormalised Gibbs weights in [0, 1]; uniform over ``usable`` when no loss is finite."""
    shift, finite, any_finite = shifted(value, usable, axis_name)
    w = jnp.where(finite, jnp.exp(-scaled(alpha, jnp.where(finite, shift, 0.0))), 0.0)
    return jnp.where(any_finite, w, usable.astype(w.dtype))


def weighted_mean(w, points, axis_name, fallback=None):
    """``sum_i w_i x_i / sum_i w_i`` over the leading axis, psum'ed over devices.

    Zero-weight points (possibly non-finite) contribute nothing; the sums run in float32 at
    least. Where every weight is 0, ``fallback`` (a pytree like one particle) or NaN.
    """
    keep = w > 0
    den = _tree.psum(jnp.sum(w), axis_name)
    has = den > 0

    def leaf_mean(x, fb):
        acc = jnp.promote_types(x.dtype, jnp.float32)
        xs = jnp.where(_bcast(keep, x), x, jnp.zeros((), x.dtype)).astype(acc)
        num = _tree.psum(jnp.tensordot(w.astype(acc), xs, axes=(0, 0)), axis_name)
        mean = num / jnp.where(has, den, 1).astype(acc)
        other = jnp.full_like(mean, jnp.nan) if fb is None else jnp.asarray(fb).astype(acc)
        return jnp.where(has, mean, other).astype(x.dtype)

    if fallback is None:
        return jax.tree.map(lambda x: leaf_mean(x, None), points)
    return jax.tree.map(leaf_mean, points, fallback)


def check_alpha(alpha, name: str = "alpha") -> None:
    """A concrete ``alpha`` is > 0 (``inf`` allowed: the argmin); NaN, 0 and negatives raise."""
    v = V.concrete(alpha)
    if v is not None and not v > 0:
        V.fail(name, alpha, "a number > 0 (math.inf gives the argmin)",
               "alpha is the inverse temperature of the weights exp(-alpha (f - f_min)); CBXpy starts at 30.")


def consensus_point(points, value, alpha, axis_name=None):
    """The CBO consensus ``sum_i w_i x_i / sum_i w_i``, ``w_i = exp(-alpha (f_i - min_j f_j))``.

    Numerically safe for any ``alpha * f`` (the shift makes every exponent <= 0; ``alpha`` up
    to the largest float, or ``inf`` for the argmin) and exact across devices: ``f_min`` by
    ``pmin``, numerator and denominator by ``psum``. Particles whose loss or position is
    NaN/Inf get weight zero; if no loss is finite the weights are uniform over the particles
    with finite positions; if no particle is usable the result is NaN.

    Args:
      points: pytree of particles with a leading particle axis N.
      value: shape (N,), the losses at ``points``.
      alpha: scalar inverse temperature, > 0. A concrete NaN or non-positive ``alpha`` raises
        ``ValueError``; a traced one is not checked (NaN or negative gives NaN).
      axis_name: mapped axis the particles are sharded over, or None.

    Returns:
      A pytree like one particle.

    Raises:
      ValueError: for a concrete ``alpha`` that is NaN or <= 0, or ``value`` not of shape (N,).

    Example:
      >>> import jax.numpy as jnp
      >>> c = consensus_point(jnp.array([[0.0], [1.0]]), jnp.array([0.0, 1e12]), 1.0)
      >>> float(c[0])
      0.0
    """
    check_alpha(alpha)
    n = jnp.shape(jax.tree.leaves(points)[0])[0]
    if jnp.shape(value) != (n,):
        V.fail("value", V.Text(f"an array of shape {jnp.shape(value)}"), f"of shape ({n},), one loss per particle",
               "Evaluate the loss per particle, e.g. `jax.vmap(loss)(points)`.")
    value = jnp.asarray(value)
    value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
    w = weights(value, finite_positions(points), alpha, axis_name)
    return weighted_mean(w, points, axis_name)


def ess_alpha(value, target, alpha_min, alpha_max, axis_name=None, iterations=48, usable=None):
    """The largest alpha in [alpha_min, alpha_max] whose effective sample size is >= target * N.

    ``ESS(alpha) = (sum w)^2 / sum w^2`` with ``w = exp(-alpha (f - f_min))`` is non-increasing in
    alpha; it is solved by bisection in ``log alpha`` (CBXpy bisects alpha linearly and cannot
    resolve alpha below ~1.5). N counts the particles with a finite loss (and, when ``usable`` is
    given, a True entry there: the transforms pass finite positions). ``alpha_max`` beyond the
    float range is taken as the largest float.
    """
    shift, finite, _ = shifted(value, jnp.ones(jnp.shape(value), bool) if usable is None else usable, axis_name)
    s = jnp.where(finite, shift, 0.0)
    n = _tree.psum(jnp.sum(finite.astype(s.dtype)), axis_name)
    big = jnp.finfo(s.dtype).max

    def ess_fraction(log_alpha):
        w = jnp.where(finite, jnp.exp(-scaled(jnp.exp(log_alpha), s)), 0.0)
        sums = _tree.psum(jnp.stack([jnp.sum(w), jnp.sum(w * w)]), axis_name)
        return sums[0] ** 2 / jnp.maximum(sums[1], jnp.finfo(s.dtype).tiny) / jnp.maximum(n, 1.0)

    def log_bound(a):  # clamped in Python first when concrete: no overflow in the cast
        v = V.concrete(a)
        a = jnp.asarray(min(v, float(big)) if v is not None else a, s.dtype)
        return jnp.log(jnp.clip(a, jnp.finfo(s.dtype).tiny, big))

    lo, hi = log_bound(alpha_min), log_bound(alpha_max)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = ess_fraction(mid) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo_f, hi_f = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    return jnp.minimum(jnp.exp(jnp.where(ess_fraction(hi) >= target, hi, lo_f)), big)


def kernel_consensus(points, value, usable, alpha, kernel: str, kappa, kernel_factor: str, fallback):
    """Polarized CBO: per-particle consensus with kernel weights ``k(x_i, x_j)^factor w_j`` (leaves (N, ...)).

    Row i's weights are ``exp(-t (v_ij - min_j v_ij))`` with ``v_ij = -log k_ij + s f_j`` (``t = alpha,
    s = 1`` for ``kernel_factor="alpha"``; ``t = 1, s = alpha`` for ``"const"``), so every exponent is
    <= 0 and the row's best member has weight exactly 1, for any alpha: a softmax of ``-alpha v``
    itself turned NaN at alpha = 1e9 on XLA:CPU (exp of a difference of two -2e9 logits gave inf).
    A row with no usable member takes ``fallback`` (the global consensus).
    """
    n = value.shape[0]
    shift, finite, any_finite = shifted(value, usable, None)
    flat = jnp.concatenate([x.reshape(n, -1) for x in jax.tree.leaves(points)], axis=1)
    flat = jnp.where(usable[:, None], flat, 0).astype(jnp.promote_types(flat.dtype, jnp.float32))
    d2 = jnp.sum((flat[:, None, :] - flat[None, :, :]) ** 2, axis=-1)
    neglog = d2 / (2 * kappa**2) if kernel == "gaussian" else jnp.sqrt(d2) / kappa
    temp, loss_scale = (alpha, 1.0) if kernel_factor == "alpha" else (1.0, alpha)
    v = neglog + scaled(loss_scale, jnp.where(finite, shift, 0.0))[None, :]
    keep = jnp.where(any_finite, finite, usable)
    v = jnp.where(keep[None, :], v, jnp.inf)
    row_ok = jnp.any(jnp.isfinite(v), axis=1)
    gap = v - jnp.where(row_ok, jnp.min(v, axis=1), 0.0)[:, None]
    gap = jax.lax.optimization_barrier(jnp.where(jnp.isnan(gap), jnp.inf, gap))  # one copy for exp and the sum
    e = jnp.exp(-scaled(temp, gap))  # (N, N): row i = particle i's unnormalised weights, max 1
    w = e / jnp.where(row_ok, jnp.sum(e, axis=1), 1.0)[:, None]

    def leaf(x, fb):
        acc = jnp.promote_types(x.dtype, jnp.float32)
        c = jnp.tensordot(w.astype(acc), jnp.where(_bcast(keep, x), x, 0).astype(acc), axes=(1, 0))
        return jnp.where(_bcast(row_ok, c), c, jnp.asarray(fb, acc)[None]).astype(x.dtype)

    return jax.tree.map(leaf, points, fallback)


def batch_consensus(points, value, usable, alpha, batch_size: int, perm, fallback):
    """Random batch method: each particle's consensus over its batch of ``perm`` (leaves (N, ...)).

    A batch in which no particle counts (every loss or position non-finite) takes ``fallback``
    (the global consensus) rather than a mean over nothing.
    """
    n, b = value.shape[0], batch_size
    w = weights(value, usable, alpha, None)[perm].reshape(n // b, b)
    batch_of = jnp.zeros(n, jnp.int32).at[perm].set(jnp.arange(n, dtype=jnp.int32) // b)
    den = jnp.sum(w, axis=1)
    has = den > 0

    def leaf(x, fb):
        acc = jnp.promote_types(x.dtype, jnp.float32)
        xb = x[perm].reshape((n // b, b) + x.shape[1:])
        xb = jnp.where(w.reshape(w.shape + (1,) * (x.ndim - 1)) > 0, xb, 0).astype(acc)
        num = jnp.einsum("kb,kb...->k...", w.astype(acc), xb)
        cb = num / _bcast(jnp.where(has, den, 1.0), num).astype(acc)
        cb = jnp.where(_bcast(has, cb), cb, jnp.asarray(fb, acc)[None])
        return cb[batch_of].astype(x.dtype)

    return jax.tree.map(leaf, points, fallback)
