"""Consensus-based optimization (CBO) and its variants as optax-style transforms.

CBO is a derivative-free global optimizer. An ensemble of ``N`` particles ``x_i`` drifts toward a
Gibbs-weighted consensus point and explores with noise scaled by the distance to it:

.. math::

    c_\\alpha = \\frac{\\sum_i w_i x_i}{\\sum_i w_i},\\quad w_i = e^{-\\alpha (f(x_i) - \\min_j f(x_j))},
    \\qquad x_i \\leftarrow x_i - \\lambda\\,dt\\,(x_i - c_\\alpha) + \\sigma \\sqrt{dt}\\, D(x_i - c_\\alpha)\\,\\xi_i .

Every transform here is an ``optax.GradientTransformationExtraArgs`` acting on a pytree whose
leaves carry a leading particle axis. ``update(updates, state, params, *, value=losses)`` takes the
``(N,)`` losses at ``params`` and returns ``new_params - params``; ``updates`` is ignored unless a
gradient drift is switched on (then it holds the per-particle gradients).

Randomness is drawn per particle from ``fold_in(fold_in(key, step), global_particle_index)``, so
the trajectory does not depend on how the particles are laid out over devices: with
``axis_name`` set and the particles sharded under ``shard_map``, every step equals the unsharded
one up to the summation order of the consensus ``psum``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _tree

__all__ = ["CBOState", "CBOHistory", "CBOResult", "cbo", "polar_cbo", "cbs", "cbo_minimize", "consensus_point",
           "ess_alpha"]

_NOISES = ("anisotropic", "isotropic")
_SCHEMES = ("euler_maruyama", "exact_drift")
_CORRECTIONS = (None, "heaviside", "heaviside_reg")
_KERNELS = ("gaussian", "laplace")
_CBS_MODES = ("sampling", "optimization")


class CBOState(NamedTuple):
    """State of :func:`cbo`, :func:`polar_cbo` and :func:`cbs`.

    Attributes:
      key: typed PRNG key, shape=(); fixed, each step folds in ``count``.
      count: shape=(), dtype=int32; steps taken so far.
      alpha: shape=(), float; the alpha used at the last step (the initial alpha before any step).
      consensus: pytree like one particle (no particle axis); the alpha-weighted consensus of the
        last step over all particles (zeros before the first step).
      memory: pytree like ``params`` holding each particle's best position so far, or None
        without ``memory=True``.
      memory_value: shape=(N,), the losses at ``memory`` (+inf before the first step), or None.
    """

    key: jax.Array
    count: jax.Array
    alpha: jax.Array
    consensus: Any
    memory: Any
    memory_value: Any


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static, hashable configuration shared by every consensus transform."""

    noise: str  # "anisotropic" | "isotropic" | "covariance" (cbs)
    sigma: float
    lambda_: float
    dt: float
    alpha: float
    alpha_growth: float
    alpha_max: float
    alpha_min: float
    alpha_schedule: Any  # "multiply" | "ess" | callable(count) -> alpha
    ess_target: float
    scheme: str
    batch_size: int | None
    correction: str | None
    correction_eps: float
    noise_truncation: float | None
    memory: bool
    lambda_memory: float
    sigma_memory: float
    gradient_weight: float
    kernel: str | None = None  # polar_cbo
    kappa: float = math.inf
    kernel_factor: str = "alpha"
    cbs_mode: str | None = None
    axis_name: Any = None


# ----------------------------------------------------------------------------------------------
# validation


def _fail(arg, value, expected, fix):
    raise ValueError(f"`{arg}`={value!r} is invalid: expected {expected}. {fix}")


def _check_choice(arg, value, choices):
    if value not in choices:
        _fail(arg, value, "one of " + ", ".join(repr(c) for c in choices), "Pick one of those.")


def _check_positive(arg, value, allow_zero=False):
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        _fail(arg, value, f"a finite number {bound}", f"Pass a finite `{arg}` {bound}.")


def _validate(cfg: _Config) -> None:
    if cfg.cbs_mode is None:
        _check_choice("noise", cfg.noise, _NOISES)
    _check_choice("scheme", cfg.scheme, _SCHEMES)
    _check_choice("correction", cfg.correction, _CORRECTIONS)
    _check_positive("sigma", cfg.sigma, allow_zero=True)
    _check_positive("lambda_", cfg.lambda_, allow_zero=True)
    _check_positive("dt", cfg.dt)
    _check_positive("alpha", cfg.alpha)
    _check_positive("alpha_growth", cfg.alpha_growth)
    _check_positive("alpha_max", cfg.alpha_max)
    _check_positive("alpha_min", cfg.alpha_min)
    _check_positive("correction_eps", cfg.correction_eps)
    _check_positive("lambda_memory", cfg.lambda_memory, allow_zero=True)
    _check_positive("sigma_memory", cfg.sigma_memory, allow_zero=True)
    _check_positive("gradient_weight", cfg.gradient_weight, allow_zero=True)
    if cfg.alpha_max < cfg.alpha or cfg.alpha_min > cfg.alpha:
        _fail("alpha", cfg.alpha, f"alpha_min={cfg.alpha_min} <= alpha <= alpha_max={cfg.alpha_max}",
              "Raise `alpha_max`, lower `alpha_min`, or change `alpha`.")
    if not (callable(cfg.alpha_schedule) or cfg.alpha_schedule in ("multiply", "ess")):
        _fail("alpha_schedule", cfg.alpha_schedule, "'multiply', 'ess' or a callable count -> alpha",
              "Use 'multiply' with `alpha_growth`/`alpha_max`, 'ess' with `ess_target`, or an optax schedule.")
    if not 0.0 < cfg.ess_target <= 1.0:
        _fail("ess_target", cfg.ess_target, "a fraction of the particles in (0, 1]", "Pass e.g. ess_target=0.5.")
    if cfg.noise_truncation is not None:
        _check_positive("noise_truncation", cfg.noise_truncation)
    if cfg.batch_size is not None:
        if not isinstance(cfg.batch_size, int) or isinstance(cfg.batch_size, bool) or cfg.batch_size < 1:
            _fail("batch_size", cfg.batch_size, "a positive int or None", "Pass the particles per random batch.")
        if cfg.axis_name is not None:
            _fail("batch_size", cfg.batch_size, "None when `axis_name` is set",
                  "The random batch method permutes all particles; use it on one device, or drop `axis_name`.")
    if cfg.kernel is not None:
        _check_choice("kernel", cfg.kernel, _KERNELS)
        _check_choice("kernel_factor", cfg.kernel_factor, ("alpha", "const"))
        _check_positive("kappa", cfg.kappa if cfg.kappa != math.inf else 1.0)


def _check_inputs(params, value, updates, cfg: _Config):
    """Trace-time shape checks; returns the number of (local) particles."""
    if params is None:
        raise ValueError(optax.NO_PARAMS_MSG + " Consensus transforms need the particle positions as `params`.")
    leaves = jax.tree.leaves_with_path(params)
    if not leaves:
        raise ValueError("`params` has no array leaves; pass a pytree of particles with a leading particle axis.")
    sizes = set()
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"`params` leaf {jax.tree_util.keystr(path) or '<root>'} has shape () but consensus transforms "
                "need a leading particle axis. Stack the particles as (num_particles, ...), e.g. "
                "`jnp.stack([x1, x2, ...])` or `jax.vmap(init)(keys)`.")
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"`params` leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; "
                             "particles must be floating point.")
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(f"`params` leaves have different leading (particle) sizes {sorted(sizes)}; every leaf "
                         "must hold the same particles along axis 0.")
    n = sizes.pop()
    if value is None:
        raise ValueError(f"Consensus transforms need the losses: call `update(updates, state, params, "
                         f"value=losses)` with `losses` of shape ({n},), one loss per particle.")
    if jnp.shape(value) != (n,):
        raise ValueError(
            f"`value` has shape {jnp.shape(value)} but `params` holds {n} particles; expected shape ({n},). "
            "Evaluate the loss per particle, e.g. `jax.vmap(loss)(params)`.")
    if cfg.batch_size is not None and n % cfg.batch_size:
        raise ValueError(f"`batch_size`={cfg.batch_size} does not divide the {n} particles; pick a divisor of {n}.")
    if cfg.gradient_weight > 0:
        if updates is None or jax.tree.structure(updates) != jax.tree.structure(params):
            raise ValueError("`gradient_weight` > 0 needs the per-particle gradients in `updates`, a pytree "
                             "shaped like `params`; pass `jax.vmap(jax.grad(f))(params)`.")
    return n


# ----------------------------------------------------------------------------------------------
# consensus numerics


def _shifted(value, axis_name):
    """f - f_min over all particles (pmin across devices); non-finite losses become +inf.

    Returns ``(shift, finite, any_finite)``; ``shift`` is 0 at the argmin, so exp(-alpha*shift)
    lies in [0, 1] for any alpha and never overflows.
    """
    finite = jnp.isfinite(value)
    safe = jnp.where(finite, value, jnp.inf)
    fmin = _tree.pmin(jnp.min(safe), axis_name)
    any_finite = jnp.isfinite(fmin)
    shift = jnp.where(finite, safe - jnp.where(any_finite, fmin, 0.0), jnp.inf)
    return shift, finite, any_finite


def _weights(shift, finite, any_finite, alpha):
    """Unnormalised Gibbs weights in [0, 1]; uniform if no particle has a finite loss."""
    w = jnp.where(finite, jnp.exp(-alpha * jnp.where(finite, shift, 0.0)), 0.0)
    return jnp.where(any_finite, w, jnp.ones_like(w))


def _weighted_mean(w, points, axis_name):
    """sum_i w_i x_i / sum_i w_i over the leading axis, psum'ed over devices; zero-weight points
    (possibly non-finite) contribute nothing."""
    keep = w > 0
    den = _tree.psum(jnp.sum(w), axis_name)

    def leaf_mean(x):
        xs = jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
        num = jnp.tensordot(w.astype(x.dtype), xs, axes=(0, 0))
        return (_tree.psum(num, axis_name) / den).astype(x.dtype)

    return jax.tree.map(leaf_mean, points)


def consensus_point(points, value, alpha, axis_name=None):
    """The CBO consensus ``sum_i w_i x_i / sum_i w_i``, ``w_i = exp(-alpha (f_i - min_j f_j))``.

    Numerically safe for any ``alpha * f`` (the shift makes every exponent <= 0) and exact across
    devices: ``f_min`` by ``pmin``, numerator and denominator by ``psum``. Particles with a
    non-finite loss get weight zero; if no particle has a finite loss the weights are uniform.

    Args:
      points: pytree of particles with a leading particle axis.
      value: shape (N,), the losses at ``points``.
      alpha: scalar inverse temperature.
      axis_name: mapped axis the particles are sharded over, or None.

    Returns:
      A pytree like one particle.

    Example:
      >>> import jax.numpy as jnp
      >>> c = consensus_point(jnp.array([[0.0], [1.0]]), jnp.array([0.0, 1e12]), 1.0)
      >>> float(c[0])
      0.0
    """
    shift, finite, any_finite = _shifted(value, axis_name)
    return _weighted_mean(_weights(shift, finite, any_finite, alpha), points, axis_name)


def ess_alpha(value, target, alpha_min, alpha_max, axis_name=None, iterations=48):
    """The largest alpha in [alpha_min, alpha_max] whose effective sample size is >= target * N.

    ``ESS(alpha) = (sum w)^2 / sum w^2`` with ``w = exp(-alpha (f - f_min))`` is non-increasing in
    alpha; it is solved by bisection in ``log alpha`` (CBXpy bisects alpha linearly and cannot
    resolve alpha below ~1.5). N counts the particles with a finite loss.
    """
    shift, finite, _ = _shifted(value, axis_name)
    s = jnp.where(finite, shift, 0.0)
    n = _tree.psum(jnp.sum(finite.astype(s.dtype)), axis_name)

    def ess_fraction(log_alpha):
        w = jnp.where(finite, jnp.exp(-jnp.exp(log_alpha) * s), 0.0)
        sums = _tree.psum(jnp.stack([jnp.sum(w), jnp.sum(w * w)]), axis_name)
        return sums[0] ** 2 / jnp.maximum(sums[1], jnp.finfo(s.dtype).tiny) / jnp.maximum(n, 1.0)

    lo, hi = jnp.log(jnp.asarray(alpha_min, s.dtype)), jnp.log(jnp.asarray(alpha_max, s.dtype))

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = ess_fraction(mid) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo_f, hi_f = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    return jnp.exp(jnp.where(ess_fraction(hi) >= target, hi, lo_f))


# ----------------------------------------------------------------------------------------------
# randomness


def _as_key(key):
    if isinstance(key, int):
        return jax.random.key(key)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _particle_normals(key, count, n_local, shape, dtype, axis_name):
    """Standard normals of ``shape`` for each local particle, from a per-particle key.

    The key of global particle ``i`` at step ``count`` is ``fold_in(fold_in(key, count), i)``, so
    the draws do not depend on the device layout.
    """
    step_key = jax.random.fold_in(key, count)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local
    index = offset + jnp.arange(n_local, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(step_key, i), shape, dtype))(index)


def _split_flat(flat, like):
    """(N, D) -> pytree like ``like`` (leaves (N, ...)), D = total size per particle."""
    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for leaf in leaves:
        size = math.prod(leaf.shape[1:])
        out.append(flat[:, start:start + size].reshape(leaf.shape).astype(leaf.dtype))
        start += size
    return jax.tree.unflatten(treedef, out)


def _bcast(v, x):
    """Per-particle (N,) vector reshaped to broadcast against a leaf (N, ...)."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


# ----------------------------------------------------------------------------------------------
# the transform


def _alpha_at(cfg: _Config, count, value, dtype):
    if cfg.alpha_schedule == "multiply":
        growth = jnp.exp(count.astype(dtype) * math.log(cfg.alpha_growth))
        return jnp.clip(cfg.alpha * growth, cfg.alpha_min, cfg.alpha_max).astype(dtype)
    if cfg.alpha_schedule == "ess":
        return ess_alpha(value, cfg.ess_target, cfg.alpha_min, cfg.alpha_max, cfg.axis_name).astype(dtype)
    return jnp.clip(jnp.asarray(cfg.alpha_schedule(count), dtype), cfg.alpha_min, cfg.alpha_max)


def _local_consensus(cfg: _Config, points, value, alpha, key, count):
    """Per-particle consensus points (leaves (N, ...)) for the random batch and polar variants."""
    n = value.shape[0]
    shift, finite, any_finite = _shifted(value, None)
    if cfg.kernel is not None:
        flat = jnp.concatenate([x.reshape(n, -1) for x in jax.tree.leaves(points)], axis=1)
        d2 = jnp.sum((flat[:, None, :] - flat[None, :, :]) ** 2, axis=-1)
        if cfg.kernel == "gaussian":
            neglog = d2 / (2 * cfg.kappa**2)
        else:
            neglog = jnp.sqrt(d2) / cfg.kappa
        factor = alpha if cfg.kernel_factor == "alpha" else 1.0
        logits = -factor * neglog - alpha * jnp.where(finite, shift, 0.0)[None, :]
        logits = jnp.where(finite[None, :] | ~any_finite, logits, -jnp.inf)
        w = jax.nn.softmax(logits, axis=1)  # (N, N): row i = weights of particle i's consensus
        keep = finite | ~any_finite
        return jax.tree.map(
            lambda x: jnp.tensordot(w.astype(x.dtype), jnp.where(_bcast(keep, x), x, 0), axes=(1, 0)), points)
    # random batch method: a fresh permutation each step, one consensus per batch of particles
    b = cfg.batch_size
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, count), n), n)
    w = _weights(shift, finite, any_finite, alpha)[perm].reshape(n // b, b)
    batch_of = jnp.zeros(n, jnp.int32).at[perm].set(jnp.arange(n, dtype=jnp.int32) // b)

    def leaf(x):
        xb = x[perm].reshape((n // b, b) + x.shape[1:])
        xb = jnp.where(w.reshape(w.shape + (1,) * (x.ndim - 1)) > 0, xb, 0)
        num = jnp.einsum("kb,kb...->k...", w.astype(x.dtype), xb)
        den = jnp.sum(w, axis=1)
        # a batch where every loss is non-finite keeps its own mean instead of 0/0
        cb = num / jnp.where(den > 0, den, 1.0).reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return cb[batch_of]

    return jax.tree.map(leaf, points)


def _make(cfg: _Config, key) -> optax.GradientTransformationExtraArgs:
    _validate(cfg)
    init_key = key

    def init_fn(params, key=None):
        leaves = jax.tree.leaves(params)
        dtype = jnp.result_type(*leaves) if leaves else jnp.result_type(float)
        consensus = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x)[1:], jnp.result_type(x)), params)
        memory = memory_value = None
        if cfg.memory:
            memory = jax.tree.map(jnp.asarray, params)
            n = jnp.shape(leaves[0])[0]
            memory_value = jnp.full((n,), jnp.inf, dtype)
        return CBOState(
            key=_as_key(init_key if key is None else key),
            count=jnp.zeros((), jnp.int32),
            alpha=jnp.asarray(cfg.alpha, dtype),
            consensus=consensus,
            memory=memory,
            memory_value=memory_value,
        )

    def update_fn(updates, state, params=None, *, value=None, value_fn=None, **extra):
        del extra
        n = _check_inputs(params, value, updates, cfg)
        leaves = jax.tree.leaves(params)
        dtype = jnp.result_type(*leaves)
        value = jnp.asarray(value).astype(jnp.promote_types(jnp.result_type(value), jnp.float32))
        if cfg.correction is not None and value_fn is None:
            raise ValueError(f"`correction`={cfg.correction!r} compares f(x_i) with f(consensus) and needs the "
                             "objective: call `update(..., value=losses, value_fn=f)` with `f` mapping one "
                             "particle to its loss.")

        memory, memory_value = state.memory, state.memory_value
        if cfg.memory:
            better = jnp.isfinite(value) & ~(value >= memory_value)
            memory = jax.tree.map(lambda y, x: jnp.where(_bcast(better, x), x, y), memory, params)
            memory_value = jnp.where(better, value.astype(memory_value.dtype), memory_value)
            points, point_value = memory, memory_value
        else:
            points, point_value = params, value

        alpha = _alpha_at(cfg, state.count, point_value, value.dtype)
        consensus = consensus_point(points, point_value, alpha, cfg.axis_name)
        if cfg.batch_size is not None or cfg.kernel is not None:
            local = _local_consensus(cfg, points, point_value, alpha, state.key, state.count)
            drift = jax.tree.map(jnp.subtract, params, local)
        else:
            local = None
            drift = jax.tree.map(lambda x, c: x - c[None], params, consensus)

        if cfg.correction is not None:
            if local is None:
                f_c = jnp.broadcast_to(value_fn(consensus), (n,))
            else:
                f_c = jax.vmap(value_fn)(local)
            z = value - f_c.astype(value.dtype)
            if cfg.correction == "heaviside":
                h = (z > 0).astype(value.dtype)
            else:
                h = 0.5 + 0.5 * jnp.tanh(z / cfg.correction_eps)
            drift_corrected = jax.tree.map(lambda d: d * _bcast(h, d).astype(d.dtype), drift)
        else:
            drift_corrected = drift

        if cfg.scheme == "euler_maruyama":
            decay = cfg.lambda_ * cfg.dt
        else:  # exact relaxation of dx = -lambda (x - c) dt over one step, frozen c
            decay = -math.expm1(-cfg.lambda_ * cfg.dt)

        flat_size = sum(math.prod(x.shape[1:]) for x in leaves)
        if cfg.cbs_mode is not None:
            step = _cbs_step(cfg, params, points, point_value, consensus, alpha, state, n, dtype)
        else:
            # draw only the normals a nonzero noise term needs (sigma = 0 runs draw none)
            noisy = [cfg.sigma > 0, cfg.memory and cfg.sigma_memory > 0]
            if any(noisy):
                xi = _particle_normals(state.key, state.count, n, (sum(noisy), flat_size), dtype, cfg.axis_name)
            step = jax.tree.map(lambda dc: -decay * dc, drift_corrected)
            if noisy[0]:
                scale = cfg.sigma * math.sqrt(cfg.dt)
                step = jax.tree.map(lambda s, e: s + scale * e, step, _noise(cfg, drift, xi[:, 0], params))
            if cfg.memory:
                to_memory = jax.tree.map(jnp.subtract, params, memory)
                step = jax.tree.map(lambda s, m: s - cfg.lambda_memory * cfg.dt * m, step, to_memory)
                if noisy[1]:
                    scale = cfg.sigma_memory * math.sqrt(cfg.dt)
                    step = jax.tree.map(lambda s, e: s + scale * e, step,
                                        _noise(cfg, to_memory, xi[:, sum(noisy) - 1], params))
        if cfg.gradient_weight > 0:
            step = jax.tree.map(lambda s, g: s - (cfg.gradient_weight * cfg.dt) * g.astype(s.dtype), step, updates)
        step = jax.tree.map(lambda s, x: s.astype(x.dtype), step, params)

        new_state = CBOState(
            key=state.key,
            count=optax.safe_increment(state.count),
            alpha=alpha.astype(state.alpha.dtype),
            consensus=consensus,
            memory=memory,
            memory_value=memory_value,
        )
        return step, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _noise(cfg: _Config, drift, xi_flat, like):
    """D(drift) xi: anisotropic (drift * xi) or isotropic (||drift|| xi), optionally truncated."""
    xi = _split_flat(xi_flat, like)
    m = cfg.noise_truncation
    if cfg.noise == "anisotropic":
        if m is not None:
            drift = jax.tree.map(lambda d: jnp.clip(d, -m, m), drift)
        return jax.tree.map(jnp.multiply, drift, xi)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1) for d in jax.tree.leaves(drift)))
    if m is not None:
        norm = jnp.minimum(norm, m)
    return jax.tree.map(lambda e: _bcast(norm, e).astype(e.dtype) * e, xi)


def _cbs_step(cfg: _Config, params, points, point_value, consensus, alpha, state, n, dtype):
    """Consensus-based sampling: exact OU step toward c with covariance noise (asymmetric root).

    x <- c + e^{-dt}(x - c) + sqrt((1 - e^{-2 dt}) / lam) * sum_j sqrt(w_j) (x_j - c) xi_ij,
    lam = 1/(1 + alpha) (sampling) or 1 (optimization); sum_j sqrt(w_j)(x_j - c) xi_ij has the
    alpha-weighted covariance of the ensemble, so no matrix square root is needed.
    """
    shift, finite, any_finite = _shifted(point_value, None)
    w = _weights(shift, finite, any_finite, alpha)
    root_w = jnp.sqrt(w / jnp.sum(w))
    xi = _particle_normals(state.key, state.count, n, (n,), dtype, None)  # (N, N): particle i, member j
    beta = math.exp(-cfg.dt)
    inv_lam = 1.0 + alpha if cfg.cbs_mode == "sampling" else 1.0
    noise_scale = jnp.sqrt((1.0 - beta**2) * inv_lam)

    def leaf(x, p, c):
        centred = jnp.where(_bcast(w > 0, p), p - c[None], 0)
        spread = jnp.tensordot(xi.astype(x.dtype), centred * _bcast(root_w, p).astype(x.dtype), axes=(1, 0))
        return (beta - 1.0) * (x - c[None]) + noise_scale.astype(x.dtype) * spread

    return jax.tree.map(leaf, params, points, consensus)


def _common(**kw) -> dict:
    defaults = dict(
        noise="anisotropic", sigma=1.0, lambda_=1.0, dt=0.01, alpha=30.0, alpha_growth=1.05, alpha_max=1e5,
        alpha_min=1e-5, alpha_schedule="multiply", ess_target=0.5, scheme="euler_maruyama", batch_size=None,
        correction=None, correction_eps=1e-3, noise_truncation=None, memory=False, lambda_memory=0.4,
        sigma_memory=None, gradient_weight=0.0, axis_name=None)
    defaults.update(kw)
    if defaults["sigma_memory"] is None:
        defaults["sigma_memory"] = defaults["lambda_memory"] * defaults["sigma"]
    return defaults


def cbo(
    noise: str = "anisotropic",
    sigma: float = 1.0,
    lambda_: float = 1.0,
    dt: float = 0.01,
    alpha: float = 30.0,
    alpha_growth: float = 1.05,
    alpha_max: float = 1e5,
    *,
    alpha_min: float = 1e-5,
    alpha_schedule: str | Callable[[jax.Array], jax.Array] = "multiply",
    ess_target: float = 0.5,
    scheme: str = "euler_maruyama",
    batch_size: int | None = None,
    correction: str | None = None,
    correction_eps: float = 1e-3,
    noise_truncation: float | None = None,
    memory: bool = False,
    lambda_memory: float = 0.4,
    sigma_memory: float | None = None,
    gradient_weight: float = 0.0,
    key: int | jax.Array = 0,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Consensus-based optimization (Pinnau et al. 2017; Carrillo et al. 2021) as a transform.

    One step with losses ``f_i = value[i]`` at the particles ``x_i`` (leading axis of every leaf):

    .. math::

        c = \frac{\sum_i w_i x_i}{\sum_i w_i},\ w_i = e^{-\alpha_k (f_i - \min_j f_j)},\qquad
        \Delta x_i = -\lambda\,dt\,(x_i - c) + \sigma\sqrt{dt}\,D(x_i - c)\,\xi_i - \gamma\,dt\,g_i,

    with ``D(y) = diag(y)`` (anisotropic) or ``||y|| I`` (isotropic), ``xi_i ~ N(0, I)`` and
    ``g_i`` the optional gradient in ``updates``. ``update`` returns ``Delta x`` (new minus old
    positions), so ``optax.apply_updates(params, step)`` gives the new ensemble. Chaining with a
    scaling transform rescales ``lambda dt`` and ``sigma sqrt(dt)`` together.

    Time stepping (``scheme``): ``"euler_maruyama"`` is CBXpy's and ConsensusBasedX's scheme and
    the one the CBXpy anchor settings (anisotropic, sigma=10.1, dt=0.01, alpha 30 x1.05 up to 1e5)
    are tuned for; it works in the strongly discrete regime sigma sqrt(dt) ~ 1 where particles
    jump across c. ``"exact_drift"`` relaxes the drift exactly, ``x - c <- e^{-lambda dt}(x - c)``,
    then adds the same noise: identical to first order in dt, stable for any ``lambda dt``, and
    the same anchor settings also succeed with it. Parameters tuned for one scheme should be
    re-checked for the other.

    Numerics: the weights are shifted by the minimum loss (``pmin`` across ``axis_name``), so
    ``alpha * f`` up to 1e12 and beyond never overflows. Particles whose loss is inf or NaN get
    weight zero (their positions, even non-finite ones, do not enter the consensus); if every
    loss is non-finite the weights are uniform. Such particles still move toward the consensus.

    Args:
      noise: ``"anisotropic"`` (componentwise, dimension-free stability 2 lambda > sigma^2 in the
        mean-field limit) or ``"isotropic"`` (needs sigma^2 < 2 lambda / (d - 2)).
      sigma: noise strength (CBXpy's sigma; ConsensusBasedX's sigma is this / sqrt(2)).
      lambda_: drift strength toward the consensus.
      dt: time step.
      alpha: initial inverse temperature alpha_0.
      alpha_growth: multiplicative scheduler, ``alpha_k = min(alpha_0 * alpha_growth**k, alpha_max)``
        for step k = 0, 1, ... (CBXpy's default scheduler is 1.05 up to 1e5).
      alpha_max: upper cap for every scheduler.
      alpha_min: lower cap for every scheduler (and the ESS solve's lower bracket).
      alpha_schedule: ``"multiply"`` (above), ``"ess"`` (each step, the largest alpha whose
        effective sample size ``(sum w)^2 / sum w^2`` is at least ``ess_target * N``, solved by
        bisection in log alpha), or a callable ``count -> alpha`` such as an optax schedule.
      ess_target: target ESS fraction for ``alpha_schedule="ess"``.
      scheme: ``"euler_maruyama"`` or ``"exact_drift"`` (see above).
      batch_size: random batch method (Carrillo, Jin, Li, Zhu 2021): each step permutes the
        particles, splits them into ``N / batch_size`` batches and moves each particle toward its
        own batch's consensus. Must divide N; not combinable with ``axis_name``.
      correction: None, ``"heaviside"`` (drift times 1[f(x_i) > f(c)], Pinnau et al. 2017) or
        ``"heaviside_reg"`` (times (1 + tanh((f(x_i) - f(c)) / correction_eps)) / 2). Needs
        ``update(..., value_fn=f)``; costs one evaluation of f at c per step (one per batch with
        ``batch_size``). As in the paper, and unlike CBXpy, the noise is not corrected.
      correction_eps: width of ``"heaviside_reg"``.
      noise_truncation: M in sigma * min(||x - c||, M) (Fornasier, Richtarik, Riedl, Sun 2023);
        the anisotropic noise clips each component of x - c to [-M, M]. None disables it.
      memory: personal-best memory (Grassi and Pareschi 2021; Riedl 2023). The consensus is
        taken over the memory points y_i (each particle's best position so far, updated from
        ``value`` at the start of each step) and an extra drift
        ``-lambda_memory dt (x - y) + sigma_memory sqrt(dt) D(x - y) xi'`` pulls toward y.
      lambda_memory: memory drift strength.
      sigma_memory: memory noise strength; defaults to ``lambda_memory * sigma`` (CBXpy).
      gradient_weight: gamma in the CBO-with-gradient drift ``-gamma dt g_i`` (Riedl 2023);
        ``updates`` must then hold the per-particle gradients. 0 ignores ``updates``.
      key: int seed or PRNG key used by ``init``; ``init(params, key=...)`` overrides it (the
        state's key can also be replaced with ``state._replace(key=...)``). Pass a key made with
        ``jax.random.key(seed, impl=...)`` to choose the PRNG implementation.
      axis_name: mapped axis the particles are sharded over (``shard_map``/``pmap``); the
        consensus and the ESS solve then reduce over it with ``pmin``/``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`CBOState`; its
      ``update(updates, state, params, *, value, value_fn=None)`` takes ``value`` of shape (N,).

    Raises:
      ValueError: for an invalid argument here, or at trace time for particles without a leading
        axis, a ``value`` whose shape is not (N,), or a missing ``value``/``value_fn``/gradient.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optim
      >>> f = lambda x: jnp.sum(x**2)
      >>> tx = optim.cbo(sigma=1.0, alpha=10.0)
      >>> x = jax.random.normal(jax.random.key(0), (20, 2))
      >>> state = tx.init(x)
      >>> step, state = tx.update(None, state, x, value=jax.vmap(f)(x))
      >>> x = optax.apply_updates(x, step)

    References:
      Pinnau, Totzeck, Tse, Martin, `A consensus-based model for global optimization and its
      mean-field limit <https://arxiv.org/abs/1604.05648>`_, 2017.
      Carrillo, Jin, Li, Zhu, `A consensus-based global optimization method for high dimensional
      machine learning problems <https://arxiv.org/abs/1909.09249>`_, 2021.
      Riedl, `Leveraging memory effects and gradient information in consensus-based optimization
      <https://arxiv.org/abs/2211.12184>`_, 2023.
      Fornasier, Richtarik, Riedl, Sun, `Consensus-based optimization with truncated noise
      <https://arxiv.org/abs/2310.16610>`_, 2023.
    """
    cfg = _Config(**_common(
        noise=noise, sigma=sigma, lambda_=lambda_, dt=dt, alpha=alpha, alpha_growth=alpha_growth,
        alpha_max=alpha_max, alpha_min=alpha_min, alpha_schedule=alpha_schedule, ess_target=ess_target,
        scheme=scheme, batch_size=batch_size, correction=correction, correction_eps=correction_eps,
        noise_truncation=noise_truncation, memory=memory, lambda_memory=lambda_memory,
        sigma_memory=sigma_memory, gradient_weight=gradient_weight, axis_name=axis_name))
    return _make(cfg, key)


def polar_cbo(
    kernel: str = "gaussian",
    kappa: float = 1.0,
    kernel_factor: str = "alpha",
    noise: str = "anisotropic",
    sigma: float = 1.0,
    lambda_: float = 1.0,
    dt: float = 0.01,
    alpha: float = 30.0,
    alpha_growth: float = 1.05,
    alpha_max: float = 1e5,
    *,
    key: int | jax.Array = 0,
    **options,
) -> optax.GradientTransformationExtraArgs:
    r"""Polarized CBO (Bungert, Roith, Wacker 2024): a kernel-localized consensus per particle.

    Particle i moves toward its own consensus

    .. math::

        c_i = \frac{\sum_j k(x_i, x_j)^{\kappa_f} e^{-\alpha f_j} x_j}{\sum_j k(x_i, x_j)^{\kappa_f} e^{-\alpha f_j}},

    with a Gaussian ``k = exp(-||x_i - x_j||^2 / (2 kappa^2))`` or Laplace ``exp(-||x_i - x_j|| / kappa)``
    kernel and ``kappa_f = alpha`` (``kernel_factor="alpha"``, CBXpy's default) or 1 (``"const"``).
    Distant groups of particles then do not interact, so the ensemble can settle in several
    minima at once. The step is :func:`cbo`'s with ``c`` replaced by ``c_i``; ``kappa=inf`` is CBO.
    Cost O(N^2 d) per step; the per-particle consensus needs every particle, so ``axis_name`` and
    ``batch_size`` are not supported. ``state.consensus`` holds the ordinary (global) consensus.

    Args:
      kernel: ``"gaussian"`` or ``"laplace"``.
      kappa: kernel width (communication radius).
      kernel_factor: ``"alpha"`` or ``"const"`` (see above).
      noise, sigma, lambda_, dt, alpha, alpha_growth, alpha_max, key: as in :func:`cbo`.
      **options: the keyword options of :func:`cbo` (scheme, alpha_schedule, correction, memory, ...).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`CBOState`.

    Example:
      >>> import jax, jax.numpy as jnp, optim
      >>> tx = optim.polar_cbo(kappa=0.5, sigma=0.5)
      >>> x = jax.random.uniform(jax.random.key(0), (50, 1), minval=-2, maxval=2)
      >>> step, state = tx.update(None, tx.init(x), x, value=jnp.sum((x**2 - 1) ** 2, axis=1))

    References:
      Bungert, Roith, Wacker, `Polarized consensus-based dynamics for optimization and sampling
      <https://arxiv.org/abs/2211.05238>`_, Math. Program. 2024.
    """
    for bad in ("axis_name", "batch_size"):
        if options.get(bad) is not None:
            _fail(bad, options[bad], "None for polar_cbo", "Polarized consensus needs all particles on one device; "
                  "use `cbo` for sharded or batched runs.")
    if not (isinstance(kappa, (int, float)) and kappa > 0):
        _fail("kappa", kappa, "a number > 0 (math.inf gives plain CBO)", "Pass the kernel width.")
    cfg = _Config(**_common(noise=noise, sigma=sigma, lambda_=lambda_, dt=dt, alpha=alpha, alpha_growth=alpha_growth,
                            alpha_max=alpha_max, kernel=kernel, kappa=float(kappa), kernel_factor=kernel_factor,
                            **options))
    return _make(cfg, key)


def cbs(
    mode: str = "sampling",
    dt: float = 0.1,
    alpha: float = 1.0,
    alpha_growth: float = 1.0,
    alpha_max: float = 1e5,
    *,
    alpha_schedule: str | Callable[[jax.Array], jax.Array] = "multiply",
    ess_target: float = 0.5,
    key: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Consensus-based sampling (Carrillo, Hoffmann, Stuart, Vaes 2022).

    Each step is the exact Ornstein-Uhlenbeck update toward the consensus c with the
    alpha-weighted ensemble covariance C:

    .. math::

        x_i \leftarrow c + e^{-dt}(x_i - c) + \sqrt{(1 - e^{-2dt})\,\lambda^{-1}}\; C^{1/2}\xi_i,
        \qquad \lambda = (1 + \alpha)^{-1}\ \text{(sampling)},\ 1\ \text{(optimization)}.

    ``C^{1/2} xi_i`` is drawn as ``sum_j sqrt(w_j) (x_j - c) xi_ij`` with ``xi_i ~ N(0, I_N)`` (the
    "asymmetric root" of ConsensusBasedX: the same covariance, no eigendecomposition). In
    sampling mode a Gaussian target ``exp(-f)`` is a fixed point for any alpha; in optimization
    mode the ensemble contracts onto a minimizer. Cost O(N^2 d) per step; one device only.

    Args:
      mode: ``"sampling"`` (the ensemble approximates exp(-f)) or ``"optimization"``.
      dt: time step (exact in the drift, so large steps are stable).
      alpha, alpha_growth, alpha_max, alpha_schedule, ess_target, key: as in :func:`cbo`; the
        default keeps alpha = 1 fixed, the natural choice for sampling.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`CBOState`.

    Example:
      >>> import jax, jax.numpy as jnp, optim
      >>> tx = optim.cbs("sampling")
      >>> x = jax.random.normal(jax.random.key(0), (100, 2))
      >>> step, state = tx.update(None, tx.init(x), x, value=0.5 * jnp.sum(x**2, axis=1))

    References:
      Carrillo, Hoffmann, Stuart, Vaes, `Consensus-based sampling
      <https://arxiv.org/abs/2106.02519>`_, Stud. Appl. Math. 2022.
    """
    _check_choice("mode", mode, _CBS_MODES)
    cfg = _Config(**_common(noise="covariance", dt=dt, alpha=alpha, alpha_growth=alpha_growth, alpha_max=alpha_max,
                            alpha_schedule=alpha_schedule, ess_target=ess_target, cbs_mode=mode))
    return _make(cfg, key)


# ----------------------------------------------------------------------------------------------
# driver


class CBOHistory(NamedTuple):
    """Per-step records of :func:`cbo_minimize`; entries after termination are NaN.

    Attributes:
      min_value: shape=(num_steps,), the smallest loss over the particles evaluated at each step.
      alpha: shape=(num_steps,), the alpha used at each step.
      consensus_shift: shape=(num_steps,), sup-norm of the consensus movement (inf at step 0).
      consensus: pytree like one particle with a leading (num_steps,) axis, or None unless
        ``save_consensus=True``.
    """

    min_value: jax.Array
    alpha: jax.Array
    consensus_shift: jax.Array
    consensus: Any


class CBOResult(NamedTuple):
    """Result of :func:`cbo_minimize`.

    Attributes:
      consensus: the consensus point of the last step (pytree like one particle).
      best_value: shape=(), the smallest loss evaluated over the whole run.
      best_particle: the particle that had ``best_value``.
      particles: the final ensemble (after the last update; not evaluated).
      state: the final transform state.
      num_steps: shape=(), int32, steps taken (fewer than ``num_steps`` if a criterion fired).
      num_evaluations: shape=(), int32, evaluations of ``f`` at the particles (N per step; the
        Heaviside correction's evaluations at the consensus are not counted).
      history: :class:`CBOHistory`.
    """

    consensus: Any
    best_value: jax.Array
    best_particle: Any
    particles: Any
    state: Any
    num_steps: jax.Array
    num_evaluations: jax.Array
    history: CBOHistory


def _is_cbo_state(s):
    return isinstance(s, CBOState)


def _find_cbo_state(state):
    found = [s for s in jax.tree.leaves(state, is_leaf=_is_cbo_state) if _is_cbo_state(s)]
    if len(found) != 1:
        raise ValueError(f"`tx` must contain exactly one consensus transform (cbo, polar_cbo or cbs); its state "
                         f"holds {len(found)} CBOState(s). Build `tx` with `optim.cbo(...)`, optionally chained.")
    return found[0]


def _sup_norm(a, b):
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))


def cbo_minimize(
    f: Callable[[Any], jax.Array],
    particles0: Any,
    key: jax.Array,
    tx: optax.GradientTransformationExtraArgs,
    num_steps: int,
    *,
    energy_tol: float | None = None,
    diff_tol: float | None = None,
    max_evaluations: int | None = None,
    with_gradient: bool = False,
    save_consensus: bool = False,
    progress: bool | None = None,
) -> CBOResult:
    """Minimizes ``f`` with a consensus transform in one ``lax.while_loop``.

    Each step evaluates ``f`` at every particle (``jax.vmap``), calls ``tx.update`` with
    ``value=losses`` and ``value_fn=f`` (and the per-particle gradients when ``with_gradient``),
    and applies the step. The run stops after ``num_steps`` steps or when a criterion fires:
    ``best_value < energy_tol``, consensus movement (sup-norm) ``< diff_tol``, or the next step
    would exceed ``max_evaluations`` evaluations. Under ``jax.vmap`` over independent runs (keys
    and/or initial ensembles) each run stops on its own: finished runs are frozen while the others
    continue. For particles sharded over devices, call ``tx.update`` inside ``shard_map`` yourself
    (see :func:`cbo`'s ``axis_name``); this driver keeps the ensemble on one device.

    A progress bar (tqdm) is shown only when called eagerly (not under ``jit``/``vmap``) with
    ``progress=True``, or with ``progress=None`` and ``num_steps >= 2000``. The loop then runs
    in jitted chunks with the same result.

    Args:
      f: loss of one particle (a pytree without the particle axis) -> scalar.
      particles0: initial ensemble, a pytree whose leaves have a leading particle axis N.
      key: PRNG key of the run; it replaces the key of ``tx``'s state. The key's implementation
        (``jax.random.key(seed, impl="threefry2x32" | "rbg" | "unsafe_rbg")``) is kept.
      tx: a transform from :func:`cbo`, :func:`polar_cbo` or :func:`cbs`, possibly chained.
      num_steps: maximum number of steps (static).
      energy_tol, diff_tol, max_evaluations: optional termination criteria (see above).
      with_gradient: pass ``jax.vmap(jax.grad(f))`` of the particles as ``updates`` (for
        ``cbo(gradient_weight=...)``).
      save_consensus: also record the consensus after every step in ``history.consensus``.
      progress: progress bar switch (see above).

    Returns:
      A :class:`CBOResult`.

    Example:
      >>> import jax, jax.numpy as jnp, optim
      >>> f = lambda x: jnp.sum(x**2 - 10 * jnp.cos(2 * jnp.pi * x)) + 10 * x.size
      >>> x0 = jax.random.uniform(jax.random.key(1), (40, 5), minval=-3, maxval=3)
      >>> tx = optim.cbo(sigma=10.1, dt=0.01, alpha=30.0)
      >>> res = optim.cbo_minimize(f, x0, jax.random.key(0), tx, num_steps=1000)
      >>> bool(jnp.max(jnp.abs(res.consensus)) < 0.25)
      True
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        _fail("num_steps", num_steps, "a positive int", "Pass the maximum number of steps as a Python int.")
    for name, tol in (("energy_tol", energy_tol), ("diff_tol", diff_tol), ("max_evaluations", max_evaluations)):
        if tol is not None:
            _check_positive(name, tol)
    leaves = jax.tree.leaves(particles0)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError("`particles0` needs a leading particle axis on every leaf: pass the ensemble as "
                         "(num_particles, ...), e.g. `jax.random.uniform(key, (N, d))`.")
    n = jnp.shape(leaves[0])[0]
    one = jax.tree.map(lambda x: x[0], particles0)
    out = jax.eval_shape(f, one)
    if getattr(out, "shape", None) != ():
        raise ValueError(f"`f` must map one particle (a pytree without the particle axis) to a scalar loss; it "
                         f"returned shape {getattr(out, 'shape', type(out))}. Use a per-particle loss; the driver "
                         "vmaps it.")
    vdtype = jnp.promote_types(out.dtype, jnp.float32)

    state0 = tx.init(particles0)
    _find_cbo_state(state0)
    state0 = jax.tree.map(lambda s: s._replace(key=_as_key(key)) if _is_cbo_state(s) else s, state0,
                          is_leaf=_is_cbo_state)

    def empty(shape, dtype):
        return jnp.full(shape, jnp.nan, dtype)

    cstate0 = _find_cbo_state(state0)
    history0 = CBOHistory(
        min_value=empty((num_steps,), vdtype), alpha=empty((num_steps,), cstate0.alpha.dtype),
        consensus_shift=empty((num_steps,), vdtype),
        consensus=jax.tree.map(lambda c: empty((num_steps,) + c.shape, c.dtype), cstate0.consensus)
        if save_consensus else None)
    carry = dict(params=particles0, state=state0, best_value=jnp.asarray(jnp.inf, vdtype), best_particle=one,
                 count=jnp.zeros((), jnp.int32), done=jnp.zeros((), bool), history=history0)
    static = dict(f=f, tx=tx, num_steps=num_steps, criteria=(energy_tol, diff_tol, max_evaluations),
                  with_gradient=with_gradient)

    traced = any(isinstance(x, jax.core.Tracer) for x in leaves + [key])
    if traced:
        carry = _loop(carry, num_steps, **static)
    elif progress if progress is not None else num_steps >= 2000:
        carry = _run_with_progress(functools.partial(_loop_jit, **static), carry, num_steps)
    else:
        carry = _loop_jit(carry, num_steps, **static)
    final = _find_cbo_state(carry["state"])
    return CBOResult(consensus=final.consensus, best_value=carry["best_value"], best_particle=carry["best_particle"],
                     particles=carry["params"], state=carry["state"], num_steps=carry["count"],
                     num_evaluations=carry["count"] * n, history=carry["history"])


def _loop(carry, stop, *, f, tx, num_steps, criteria, with_gradient):
    """The driver's while_loop from ``carry`` until a criterion fires or ``count == stop``."""
    energy_tol, diff_tol, max_evaluations = criteria
    n = jnp.shape(jax.tree.leaves(carry["params"])[0])[0]
    vdtype = carry["best_value"].dtype
    evaluate = jax.vmap(jax.value_and_grad(f)) if with_gradient else (lambda p: (jax.vmap(f)(p), None))

    def body(c):
        params, state, k = c["params"], c["state"], c["count"]
        value, grads = evaluate(params)
        value = value.astype(vdtype)
        old_consensus = _find_cbo_state(state).consensus
        step, state = tx.update(grads, state, params, value=value, value_fn=f)
        new_params = optax.apply_updates(params, step)
        cstate = _find_cbo_state(state)
        i = jnp.argmin(jnp.where(jnp.isfinite(value), value, jnp.inf))
        better = value[i] < c["best_value"]
        best_value = jnp.where(better, value[i], c["best_value"])
        best_particle = jax.tree.map(lambda b, x: jnp.where(better, x[i], b), c["best_particle"], params)
        shift = jnp.where(k == 0, jnp.inf, _sup_norm(cstate.consensus, old_consensus)).astype(vdtype)
        h = c["history"]
        history = CBOHistory(
            min_value=h.min_value.at[k].set(jnp.min(value)), alpha=h.alpha.at[k].set(cstate.alpha),
            consensus_shift=h.consensus_shift.at[k].set(shift),
            consensus=None if h.consensus is None else jax.tree.map(lambda a, v: a.at[k].set(v), h.consensus,
                                                                    cstate.consensus))
        done = k + 1 >= num_steps
        if energy_tol is not None:
            done = done | (best_value < energy_tol)
        if diff_tol is not None:
            done = done | (shift < diff_tol)
        if max_evaluations is not None:
            done = done | ((k + 2) * n > max_evaluations)
        return dict(params=new_params, state=state, best_value=best_value, best_particle=best_particle,
                    count=k + 1, done=done, history=history)

    return jax.lax.while_loop(lambda c: ~c["done"] & (c["count"] < stop), body, carry)


# f and tx are static so repeated eager calls with the same objective and transform reuse the compile
_loop_jit = jax.jit(_loop, static_argnames=("f", "tx", "num_steps", "criteria", "with_gradient"))


def _run_with_progress(run_jit, carry, num_steps):
    """Runs the jitted loop in chunks of ~1% of the steps, updating a tqdm bar in between."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience; run without it
        return run_jit(carry, num_steps)
    chunk = max(1, num_steps // 100)
    with tqdm(total=num_steps, desc="cbo", file=sys.stderr) as bar:
        done_steps = 0
        while done_steps < num_steps and not bool(carry["done"]):
            carry = run_jit(carry, min(done_steps + chunk, num_steps))
            now = int(carry["count"])
            bar.update(now - done_steps)
            done_steps = now
    return carry
