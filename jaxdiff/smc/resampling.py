"""Resampling schemes and effective sample size, from log-weights.

Every resampler is a pure function ``scheme(key, log_weights, num_samples) -> ancestors`` that
returns ``num_samples`` int32 indices into the particles, drawn so that the expected number of
offspring of particle i is ``num_samples * w_i`` with w = softmax(log_weights) (unbiased
resampling, Douc, Cappe & Moulines, 2005). The shapes are static, so all of them run under
``jit``/``vmap``.

Numerics, shared by all schemes:

- log-weights are shifted by their maximum before exponentiating, so huge values are fine;
- ``-inf`` and NaN entries mean "weight zero" and are never selected; ``+inf`` entries share all
  the mass equally;
- the inverse CDF is searched on the *unnormalized* cumulative sum, with the uniforms scaled by
  its last entry and kept strictly below it, so rounding can never select a zero-weight particle
  (the float32 pitfall of dividing by the sum and clipping the index);
- if no entry has positive weight (all ``-inf``/NaN) there is nothing to resample from: the
  ancestors are then the identity ``0..num_samples-1`` (mod the number of particles) and
  ``ess(log_weights)`` is 0, which is how callers detect it (``jaxdiff.smc.fkc`` flags it).

Log-weights, not probabilities: every function here takes ``log_weights`` (log of unnormalized
weights). blackjax's resamplers take *weights* in the same position; passing probabilities here would
treat them as log-weights (nearly uniform resampling). Pass ``jnp.log(weights)``.

Inputs are checked at trace time: ``log_weights`` must be a 1-D real array with at least one entry (vmap
over a batch of particle systems instead of passing a 2-D array), ``num_samples`` a positive Python int.

Example:
    >>> key = jax.random.key(0)
    >>> idx = systematic(key, jnp.log(jnp.array([0.1, 0.0, 0.9])), 10)
    >>> bool((idx != 1).all())
    True
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff import _checks

__all__ = [
    "multinomial",
    "systematic",
    "stratified",
    "residual",
    "ess",
    "log_normalize",
    "RESAMPLERS",
    "get_resampler",
    "check_ancestors",
]

Resampler = Callable[[jax.Array, jax.Array, int], jax.Array]


def _check_log_weights(log_weights):
    """A 1-D real array of at least one log-weight (trace-time checks of shape and dtype)."""
    if not hasattr(log_weights, "dtype") and not isinstance(log_weights, (list, tuple)):
        _checks.fail("log_weights", log_weights, "a 1-D array of log-weights", "Pass `jnp.log(weights)`.", TypeError)
    lw = jnp.asarray(log_weights)
    if not (jnp.issubdtype(lw.dtype, jnp.floating) or jnp.issubdtype(lw.dtype, jnp.integer)):
        _checks.fail("log_weights", log_weights, "a real array of log-weights", "Pass `jnp.log(weights)`.", TypeError)
    if lw.ndim != 1 or lw.shape[0] == 0:
        raise ValueError(
            f"`log_weights` must be a 1-D array with at least one entry (one log-weight per particle), got shape "
            f"{lw.shape}. For several particle systems, vmap over the leading axis instead of flattening it."
        )
    return lw.astype(jnp.result_type(lw.dtype, jnp.float32))


def _clean(log_weights):
    """NaN -> -inf; if any entry is +inf, those entries become 0 and all others -inf."""
    lw = _check_log_weights(log_weights)
    lw = jnp.where(jnp.isnan(lw), -jnp.inf, lw)
    pos_inf = lw == jnp.inf
    return jnp.where(pos_inf.any(), jnp.where(pos_inf, 0.0, -jnp.inf), lw)


def log_normalize(log_weights):
    """``(log_weights - logsumexp(log_weights), logsumexp(log_weights))`` with NaN treated as -inf.

    When every entry is -inf/NaN the total is -inf and the normalized log-weights are all -inf.
    """
    lw = _clean(log_weights)
    top = jnp.max(lw)
    centred = lw - jnp.where(jnp.isfinite(top), top, 0.0)
    # Subtract the (small) log-sum from the centred values, not the (possibly huge) total from lw.
    log_sum = jnp.log(jnp.sum(jnp.exp(centred)))
    ok = jnp.isfinite(log_sum)
    return jnp.where(ok, centred - log_sum, -jnp.inf), jnp.where(ok, log_sum + top, -jnp.inf)


def ess(log_weights):
    """Effective sample size 1 / sum_i w_i^2 of the normalized weights, in [1, N]; 0 if all are -inf/NaN.

    Computed as exp(2 logsumexp(lw) - logsumexp(2 lw)) after shifting by the maximum.
    """
    lw = _clean(log_weights)
    top = jnp.max(lw)
    w = jnp.exp(lw - jnp.where(jnp.isfinite(top), top, 0.0))
    s1, s2 = jnp.sum(w), jnp.sum(w * w)
    return jnp.where(s1 > 0, s1 * s1 / jnp.where(s2 > 0, s2, 1.0), 0.0)


def _unnormalized_cdf(log_weights):
    lw = _clean(log_weights)
    top = jnp.max(lw)
    w = jnp.exp(lw - jnp.where(jnp.isfinite(top), top, 0.0))
    return jnp.cumsum(w)


def _inverse_cdf(cdf, u):
    """Index i with cdf[i-1] <= u * total < cdf[i] for u in [0, 1); zero-weight entries have empty intervals."""
    n = cdf.shape[0]
    total = cdf[-1]
    target = jnp.minimum(u.astype(cdf.dtype) * total, jnp.nextafter(total, jnp.zeros_like(total)))
    idx = jnp.searchsorted(cdf, target, side="right").astype(jnp.int32)
    identity = jnp.arange(u.shape[0], dtype=jnp.int32) % n
    return jnp.where(total > 0, jnp.minimum(idx, n - 1), identity)


def _check_num_samples(num_samples, key=None):
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive Python int, got {num_samples!r}.")
    _checks.prng_key("key", key)


def multinomial(key, log_weights, num_samples: int):
    """Multinomial resampling: i.i.d. draws from Categorical(w). Highest offspring variance N w (1 - w)."""
    _check_num_samples(num_samples, key)
    cdf = _unnormalized_cdf(log_weights)
    u = jax.random.uniform(key, (num_samples,), dtype=cdf.dtype)
    return _inverse_cdf(cdf, u)


def _ancestors_from_strata(log_weights, num_samples, uniforms):
    """Sorted ancestors for u_j = (j + U_j) / M, without a search: O(N + M).

    The number of u_j below a CDF value c is F(c) = floor(M c) + [U_floor(Mc) < frac(M c)]; particle i gets
    F(c_i) - F(c_(i-1)) offspring. F is computed in integers and fractions, so it is monotone, F(1) = M
    exactly (the CDF is divided by its own last entry), and a zero weight (c_i = c_(i-1)) gets no offspring.
    """
    cdf = _unnormalized_cdf(log_weights)
    total = cdf[-1]
    scaled = num_samples * (cdf / jnp.where(total > 0, total, 1.0))
    whole = jnp.floor(scaled)
    slot = jnp.minimum(whole.astype(jnp.int32), num_samples - 1)
    below = whole.astype(jnp.int32) + (uniforms.astype(cdf.dtype)[slot] < scaled - whole)
    counts = jnp.diff(below, prepend=0)
    n = cdf.shape[0]
    ancestors = jnp.repeat(jnp.arange(n, dtype=jnp.int32), counts, total_repeat_length=num_samples)
    return jnp.where(total > 0, ancestors, jnp.arange(num_samples, dtype=jnp.int32) % n)


def stratified(key, log_weights, num_samples: int):
    """Stratified resampling (Kitagawa, 1996): one independent uniform in each stratum [j/M, (j+1)/M).

    Returns sorted ancestors.
    """
    _check_num_samples(num_samples, key)
    return _ancestors_from_strata(log_weights, num_samples, jax.random.uniform(key, (num_samples,)))


def systematic(key, log_weights, num_samples: int):
    """Systematic resampling (Carpenter, Clifford & Fearnhead, 1999): one uniform shared by all strata.

    The offspring count of particle i is floor(M w_i) or ceil(M w_i), with w = softmax(log_weights).

    Args:
        key: PRNG key.
        log_weights: shape ``(N,)``, the *log* of the unnormalized weights (``jnp.log(weights)``, not the
            weights themselves as in blackjax); NaN and -inf mean weight zero.
        num_samples: M, the number of ancestors (a Python int).

    Returns:
        Sorted int32 ancestors, shape ``(M,)``, in [0, N).

    Example:
        >>> idx = systematic(jax.random.key(0), jnp.log(jnp.array([0.5, 0.5])), 4)
        >>> idx.tolist()
        [0, 0, 1, 1]
    """
    _check_num_samples(num_samples, key)
    u = jax.random.uniform(key, ())
    return _ancestors_from_strata(log_weights, num_samples, jnp.broadcast_to(u, (num_samples,)))


def residual(key, log_weights, num_samples: int):
    """Residual resampling (Liu & Chen, 1998): floor(M w_i) copies of i, the rest multinomial on the residuals.

    Static shapes: output slot j < D = sum_i floor(M w_i) takes the particle whose deterministic block
    covers j; slots j >= D take a multinomial draw from the residual weights M w_i - floor(M w_i).
    """
    _check_num_samples(num_samples, key)
    lw, _ = log_normalize(log_weights)
    scaled = num_samples * jnp.exp(lw)
    copies = jnp.floor(scaled)
    blocks = jnp.cumsum(copies)
    slots = jnp.arange(num_samples, dtype=blocks.dtype)
    deterministic = jnp.minimum(jnp.searchsorted(blocks, slots, side="right"), lw.shape[0] - 1).astype(jnp.int32)
    leftover = jnp.log(jnp.maximum(scaled - copies, 0.0))
    random = multinomial(key, leftover, num_samples)
    out = jnp.where(slots < blocks[-1], deterministic, random)
    identity = jnp.arange(num_samples, dtype=jnp.int32) % lw.shape[0]
    return jnp.where(jnp.isfinite(lw).any(), out, identity)


RESAMPLERS: dict[str, Resampler] = {
    "systematic": systematic,
    "stratified": stratified,
    "multinomial": multinomial,
    "residual": residual,
}


def check_ancestors(resampler: Resampler, num_particles: int, dtype=jnp.float32) -> None:
    """Trace-time check that ``resampler(key, log_weights, num_particles)`` returns ``num_particles`` integer indices."""
    lw = jax.ShapeDtypeStruct((num_particles,), dtype)
    try:
        out = jax.eval_shape(lambda k, w: resampler(k, w, num_particles), jax.random.key(0), lw)
    except TypeError:  # a raw-key resampler: try a uint32 key
        out = jax.eval_shape(lambda k, w: resampler(k, w, num_particles), jax.random.PRNGKey(0), lw)
    shape, odtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != (num_particles,) or odtype is None or not jnp.issubdtype(odtype, jnp.integer):
        what = f"shape {shape} and dtype {odtype}" if shape is not None else _checks.show(out)
        raise TypeError(
            f"The resampler `{getattr(resampler, '__name__', resampler)!r}` must return {num_particles} integer ancestor "
            f"indices (shape ({num_particles},), an int dtype), got {what}. A resampler is "
            "`(key, log_weights, num_samples) -> int32 indices in [0, N)`."
        )


def get_resampler(name_or_fn) -> Resampler:
    """A resampler from its name (one of ``RESAMPLERS``) or a callable with the same signature.

    A custom resampler returns ``num_samples`` int indices in [0, N); ``fkc.sample`` checks the shape and dtype
    at trace time, and an index out of range gives a NaN particle with weight zero (counted in
    ``FKCResult.num_nonfinite``; ``checks=True`` raises), never a silently clamped one.
    """
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in RESAMPLERS:
        raise ValueError(
            f"Unknown `resample={name_or_fn!r}`; expected one of {tuple(RESAMPLERS)}, None (never resample) "
            "or a function `(key, log_weights, num_samples) -> int32 ancestors`."
        )
    return RESAMPLERS[name_or_fn]
