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

Rules for bad values (each tested in ``tests/optim/test_bad_input.py``):

* Hyperparameters are checked when the transform is built (``ValueError``/``TypeError`` naming
  the argument); ``optax.inject_hyperparams(optim.cbo)(sigma=1.0)`` works, its injected values
  are checked when concrete (under ``jit`` they are traced and taken as given).
* A particle whose loss or position is NaN/Inf has weight zero in the consensus (see
  ``optim._consensus``); if no loss is finite the consensus is the mean of the finite
  positions; if no particle counts, the previous consensus is kept. Such a particle still
  moves toward the consensus, but a non-finite position cannot be repaired by an update
  (``x + step`` stays non-finite): :func:`cbo_minimize` puts it back at the consensus.
* ``alpha`` is clamped to ``[alpha_min, alpha_max]`` and to the largest finite float of the
  losses' dtype (a Python ``1e39`` in float32, or growth past the range, is the argmin limit,
  never NaN); a callable ``alpha_schedule`` returning NaN keeps the previous alpha.
* The state is plain arrays (the key as raw ``jax.random.key_data``), so it round-trips
  through ``flax.serialization`` and orbax; the transform is hashable and equal by value, so
  a new but identical ``optim.cbo(...)`` reuses ``cbo_minimize``'s compiled loop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim import _consensus as C
from optim import _tree
from optim import _validate as V
from optim._consensus import consensus_point, ess_alpha

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
      key: raw PRNG key data (``jax.random.key_data``), uint32, shape=(2,) for threefry2x32
        or (4,) for rbg/unsafe_rbg; fixed, each step folds in ``count``. Plain data, so the
        state serializes; the transform wraps it with its key implementation.
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
    """Static configuration shared by every consensus transform (numbers may be traced when injected)."""

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
    key_impl: str | None = None  # the PRNG implementation the state's raw key data is wrapped with

    def spec(self) -> tuple:
        """A hashable value identifying the configuration (concrete numbers by value)."""
        return tuple(_spec(getattr(self, f.name)) for f in dataclasses.fields(self))


def _spec(value) -> Any:
    """Hashable stand-in: numbers by value, other hashables as they are, the rest by identity."""
    v = V.concrete(value) if not isinstance(value, (str, bool, type(None))) and not callable(value) else None
    if v is not None:
        return ("number", v)
    try:
        hash(value)
        return value
    except TypeError:
        return ("object", id(value))


# ----------------------------------------------------------------------------------------------
# validation


def _static(x) -> bool:
    return V.concrete(x) is not None


def _validate(cfg: _Config) -> None:
    if cfg.cbs_mode is None:
        V.choice("noise", cfg.noise, _NOISES)
    V.choice("scheme", cfg.scheme, _SCHEMES)
    V.choice("correction", cfg.correction, _CORRECTIONS)
    V.nonnegative("sigma", cfg.sigma, "CBXpy's anchor uses 10.1 (anisotropic); 0 switches the noise off.")
    V.nonnegative("lambda_", cfg.lambda_, "1 is the usual drift strength.")
    V.positive("dt", cfg.dt, "CBXpy uses 0.01.")
    C.check_alpha(cfg.alpha)
    V.positive("alpha", cfg.alpha, "CBXpy starts at 30.")
    V.positive("alpha_growth", cfg.alpha_growth, "1.05 grows alpha 5 % per step; 1 keeps it fixed.")
    V.positive("alpha_max", cfg.alpha_max, "CBXpy caps at 1e5; values beyond the losses' float range act as it.")
    V.positive("alpha_min", cfg.alpha_min, "The default is 1e-5.")
    V.positive("correction_eps", cfg.correction_eps, "The default is 1e-3.")
    V.nonnegative("lambda_memory", cfg.lambda_memory, "CBXpy uses 0.4.")
    V.nonnegative("sigma_memory", cfg.sigma_memory, "The default is lambda_memory * sigma.")
    V.nonnegative("gradient_weight", cfg.gradient_weight, "0 switches the gradient drift off.")
    lo, a, hi = (V.concrete(x) for x in (cfg.alpha_min, cfg.alpha, cfg.alpha_max))
    if None not in (lo, a, hi) and not lo <= a <= hi:
        V.fail("alpha", cfg.alpha, f"between alpha_min={cfg.alpha_min!r} and alpha_max={cfg.alpha_max!r}",
               "Raise `alpha_max`, lower `alpha_min`, or change `alpha`.")
    lam, dt = V.concrete(cfg.lambda_), V.concrete(cfg.dt)
    if cfg.cbs_mode is None and cfg.scheme == "euler_maruyama" and None not in (lam, dt) and lam * dt >= 2:
        V.fail("dt", cfg.dt, f"< 2 / lambda_ = {2 / lam:g} with scheme='euler_maruyama' (each step multiplies "
               f"x - c by 1 - lambda_ dt = {1 - lam * dt:g}, which diverges)",
               "Use a smaller `dt` (CBXpy uses 0.01), or scheme='exact_drift', which is stable for any dt.")
    if not (callable(cfg.alpha_schedule) or (isinstance(cfg.alpha_schedule, str)
                                             and cfg.alpha_schedule in ("multiply", "ess"))):
        V.fail("alpha_schedule", cfg.alpha_schedule, "'multiply', 'ess' or a callable count -> alpha",
               "Use 'multiply' with `alpha_growth`/`alpha_max`, 'ess' with `ess_target`, or an optax schedule "
               "(with optax.inject_hyperparams pass static_args=('alpha_schedule',)).")
    V.schedule("alpha_schedule", cfg.alpha_schedule, _check_alpha_value)
    V.interval("ess_target", cfg.ess_target, 0.0, 1.0, lo_closed=False, hi_closed=True,
               hint="It is a fraction of the particles; pass e.g. ess_target=0.5.")
    if cfg.noise_truncation is not None:
        V.positive("noise_truncation", cfg.noise_truncation, "It is M in sigma * min(||x - c||, M).")
    if cfg.batch_size is not None:
        if V.is_traced(cfg.batch_size):
            V.fail("batch_size", V.Text("a traced value"), "a static Python int",
                   "It sets shapes; with optax.inject_hyperparams pass static_args=('batch_size',).", TypeError)
        V.static_int("batch_size", cfg.batch_size, 1, "Pass the particles per random batch.")
        if cfg.axis_name is not None:
            V.fail("batch_size", cfg.batch_size, "None when `axis_name` is set",
                   "The random batch method permutes all particles; use it on one device, or drop `axis_name`.")
    if cfg.kernel is not None:
        V.choice("kernel", cfg.kernel, _KERNELS)
        V.choice("kernel_factor", cfg.kernel_factor, ("alpha", "const"))
        k = V.concrete(cfg.kappa)
        if k is not None and not k > 0:
            V.fail("kappa", cfg.kappa, "a number > 0 (math.inf gives plain CBO)", "Pass the kernel width.")


def _check_alpha_value(name, value, hint):
    if not (value > 0):  # NaN fails too
        V.fail(name, value, "a number > 0", hint)


def _check_inputs(params, value, updates, cfg: _Config):
    """Trace-time shape checks; returns the number of (local) particles."""
    if params is None:
        raise ValueError(optax.NO_PARAMS_MSG + " Consensus transforms need the particle positions as `params`.")
    leaves = jax.tree.leaves_with_path(params)
    if not leaves:
        raise ValueError("`params` has no array leaves; pass a pytree of particles with a leading particle axis.")
    V.float_tree("cbo", "params", params)
    sizes = set()
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"`params` leaf {jax.tree_util.keystr(path) or '<root>'} has shape () but consensus transforms "
                "need a leading particle axis. Stack the particles as (num_particles, ...), e.g. "
                "`jnp.stack([x1, x2, ...])` or `jax.vmap(init)(keys)`.")
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
    if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        V.fail("value", V.Text(f"an array of dtype {jnp.result_type(value)}"), "floating-point losses",
               "Cast the losses, e.g. `losses.astype(jnp.float32)`.", TypeError)
    if cfg.batch_size is not None and n % cfg.batch_size:
        raise ValueError(f"`batch_size`={cfg.batch_size} does not divide the {n} particles; pick a divisor of {n}.")
    if _static(cfg.gradient_weight) and V.concrete(cfg.gradient_weight) > 0:
        if updates is None or jax.tree.structure(updates) != jax.tree.structure(params):
            raise ValueError("`gradient_weight` > 0 needs the per-particle gradients in `updates`, a pytree "
                             "shaped like `params`; pass `jax.vmap(jax.grad(f))(params)`.")
    return n


# ----------------------------------------------------------------------------------------------
# keys: the state holds raw key data; the transform knows the implementation


def _impl_name(key) -> str:
    return str(jax.random.key_impl(key))


def _default_impl_for(shape) -> str:
    default = jax.random.key_data(jax.random.key(0))
    if tuple(shape) == tuple(default.shape):
        return _impl_name(jax.random.key(0))
    return {(2,): "threefry2x32", (4,): "rbg"}.get(tuple(shape), _impl_name(jax.random.key(0)))


def _is_typed(key) -> bool:
    return isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _key_data(key, impl: str | None):
    """Raw uint32 key data from an int seed, a typed key or raw data (checked against ``impl``)."""
    if isinstance(key, (bool, np.bool_)) or isinstance(key, float):
        V.fail("key", key, "an int seed or a PRNG key", "Pass e.g. key=0 or key=jax.random.key(0).", TypeError)
    if isinstance(key, (int, np.integer)) or (hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jnp.integer)
                                               and jnp.ndim(key) == 0):
        return jax.random.key_data(jax.random.key(key, impl=impl))
    if _is_typed(key):
        if jnp.ndim(key) != 0:
            V.fail("key", V.Text(f"a key array of shape {key.shape}"), "one PRNG key (shape ())",
                   "Split outside and pass one key per run (vmap over runs).")
        if impl is not None and _impl_name(key) != impl:
            V.fail("key", V.Text(f"a key with impl {_impl_name(key)!r}"), f"a key with impl {impl!r} (the transform's)",
                   f"Build the transform with that implementation: `optim.cbo(..., key=jax.random.key(0, "
                   f"impl={_impl_name(key)!r}))`.")
        return jax.random.key_data(key)
    data = jnp.asarray(key)
    if data.dtype != jnp.uint32 or data.ndim != 1:
        V.fail("key", V.Text(f"an array of shape {data.shape} and dtype {data.dtype}"),
               "an int seed, a typed PRNG key, or raw uint32 key data", "Pass e.g. key=jax.random.key(0).",
               TypeError)
    return data


def _step_key(cfg: _Config, data, override=None):
    """The typed key of this step: ``override`` (a typed key) or the state's data wrapped with the impl."""
    if override is not None:
        return override if _is_typed(override) else jax.random.wrap_key_data(
            _key_data(override, cfg.key_impl), impl=cfg.key_impl or _default_impl_for(jnp.shape(override)))
    return jax.random.wrap_key_data(data, impl=cfg.key_impl or _default_impl_for(data.shape))


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


_bcast = C._bcast


# ----------------------------------------------------------------------------------------------
# the transform


def _sqrt(x):
    v = V.concrete(x)
    return math.sqrt(v) if v is not None else jnp.sqrt(x)


def _clamped(x, dtype):
    """``x`` in ``dtype``, clamped to its largest finite value (a Python 1e39 in float32 without an overflow)."""
    big = float(jnp.finfo(dtype).max)
    v = V.concrete(x)
    if v is not None:
        return jnp.asarray(min(v, big), dtype)
    return jnp.minimum(jnp.asarray(x, dtype), big)


def _alpha_at(cfg: _Config, state, value, usable, dtype):
    """This step's alpha: the schedule's, clamped to [alpha_min, alpha_max] and the dtype's finite range."""
    if cfg.alpha_schedule == "multiply":
        growth = jnp.exp(state.count.astype(dtype) * jnp.log(jnp.asarray(cfg.alpha_growth, dtype)))
        alpha = _clamped(cfg.alpha, dtype) * growth
    elif cfg.alpha_schedule == "ess":
        alpha = ess_alpha(value, cfg.ess_target, cfg.alpha_min, cfg.alpha_max, cfg.axis_name, usable=usable)
    else:
        alpha = jnp.asarray(cfg.alpha_schedule(state.count), dtype)
        alpha = jnp.where(jnp.isnan(alpha), state.alpha.astype(dtype), alpha)  # a NaN keeps the last alpha
    return jnp.clip(jnp.asarray(alpha, dtype), _clamped(cfg.alpha_min, dtype), _clamped(cfg.alpha_max, dtype))


def _count_evaluations(value_fn, k: int) -> None:
    """Tell :func:`cbo_minimize`'s counting objective how many evaluations this step makes (trace time)."""
    note = getattr(value_fn, "note_evaluations", None)
    if note is not None:
        note(k)


@dataclasses.dataclass(frozen=True, eq=False)
class _Part:
    """Base of the init/update callables: equal and hashable by configuration, so two identical
    transforms are equal and a jit cache keyed on them is reused."""

    cfg: _Config

    def _id(self) -> tuple:
        return (type(self).__name__, self.cfg.spec()) + self._extra()

    def _extra(self) -> tuple:
        return ()

    def __eq__(self, other):
        return type(other) is type(self) and self._id() == other._id()

    def __hash__(self):
        return hash(self._id())


@dataclasses.dataclass(frozen=True, eq=False)
class _Init(_Part):
    key: Any = 0

    def _extra(self) -> tuple:
        key = self.key
        if _is_typed(key) and not V.is_traced(key):
            return ("key", tuple(np.asarray(jax.random.key_data(key)).ravel().tolist()), _impl_name(key))
        if isinstance(key, (jax.Array, np.ndarray)) and not V.is_traced(key):
            return ("data", tuple(np.asarray(key).ravel().tolist()))
        return (_spec(key),)

    def __call__(self, params, key=None):
        cfg = self.cfg
        leaves = jax.tree.leaves(params)
        if leaves:
            V.float_tree("cbo", "params", params)
        dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32) if leaves else jnp.result_type(float)
        consensus = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x)[1:], jnp.result_type(x)), params)
        memory = memory_value = None
        if cfg.memory:
            memory = jax.tree.map(jnp.asarray, params)
            n = jnp.shape(leaves[0])[0]
            memory_value = jnp.full((n,), jnp.inf, dtype)
        return CBOState(
            key=_key_data(self.key if key is None else key, cfg.key_impl),
            count=jnp.zeros((), jnp.int32),
            alpha=_clamped(cfg.alpha, dtype),
            consensus=consensus,
            memory=memory,
            memory_value=memory_value,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class _Update(_Part):

    def __call__(self, updates, state, params=None, *, value=None, value_fn=None, key=None, **extra):
        del extra
        cfg = self.cfg
        n = _check_inputs(params, value, updates, cfg)
        leaves = jax.tree.leaves(params)
        dtype = jnp.result_type(*leaves)
        value = jnp.asarray(value)
        value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
        if cfg.correction is not None and value_fn is None:
            raise ValueError(f"`correction`={cfg.correction!r} compares f(x_i) with f(consensus) and needs the "
                             "objective: call `update(..., value=losses, value_fn=f)` with `f` mapping one "
                             "particle to its loss.")
        step_key = _step_key(cfg, state.key, key)
        usable = C.finite_positions(params)

        memory, memory_value = state.memory, state.memory_value
        if cfg.memory:
            better = jnp.isfinite(value) & usable & ~(value >= memory_value)
            memory = jax.tree.map(lambda y, x: jnp.where(_bcast(better, x), x, y), memory, params)
            memory_value = jnp.where(better, value.astype(memory_value.dtype), memory_value)
            points, point_value, point_usable = memory, memory_value, C.finite_positions(memory)
        else:
            points, point_value, point_usable = params, value, usable

        alpha = _alpha_at(cfg, state, point_value, point_usable, value.dtype)
        w = C.weights(point_value, point_usable, alpha, cfg.axis_name)
        consensus = C.weighted_mean(w, points, cfg.axis_name, fallback=state.consensus)
        local = None
        if cfg.kernel is not None:
            local = C.kernel_consensus(points, point_value, point_usable, alpha, cfg.kernel, cfg.kappa,
                                       cfg.kernel_factor, consensus)
        elif cfg.batch_size is not None:
            perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(step_key, state.count), n), n)
            local = C.batch_consensus(points, point_value, point_usable, alpha, cfg.batch_size, perm, consensus)
        if local is None:
            drift = jax.tree.map(lambda x, c: x - c[None], params, consensus)
        else:
            drift = jax.tree.map(jnp.subtract, params, local)

        if cfg.correction is not None:
            if local is None:
                f_c = jnp.broadcast_to(value_fn(consensus), (n,))
                _count_evaluations(value_fn, 1)
            else:
                f_c = jax.vmap(value_fn)(local)
                _count_evaluations(value_fn, n)
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
            ld = V.concrete(cfg.lambda_ * cfg.dt) if _static(cfg.lambda_) and _static(cfg.dt) else None
            decay = -math.expm1(-ld) if ld is not None else -jnp.expm1(-cfg.lambda_ * cfg.dt)

        flat_size = sum(math.prod(x.shape[1:]) for x in leaves)
        if cfg.cbs_mode is not None:
            step = _cbs_step(cfg, params, points, point_usable, w, consensus, alpha, step_key, state.count, n,
                             dtype)
        else:
            # draw only the normals a nonzero noise term needs (a static sigma = 0 draws none)
            noisy = [not _is_zero(cfg.sigma), bool(cfg.memory) and not _is_zero(cfg.sigma_memory)]
            if any(noisy):
                xi = _particle_normals(step_key, state.count, n, (sum(noisy), flat_size), dtype, cfg.axis_name)
            step = jax.tree.map(lambda dc: -decay * dc, drift_corrected)
            if noisy[0]:
                scale = cfg.sigma * _sqrt(cfg.dt)
                step = jax.tree.map(lambda s, e: s + scale * e, step, _noise(cfg, drift, xi[:, 0], params))
            if cfg.memory:
                to_memory = jax.tree.map(jnp.subtract, params, memory)
                step = jax.tree.map(lambda s, m: s - cfg.lambda_memory * cfg.dt * m, step, to_memory)
                if noisy[1]:
                    scale = cfg.sigma_memory * _sqrt(cfg.dt)
                    step = jax.tree.map(lambda s, e: s + scale * e, step,
                                        _noise(cfg, to_memory, xi[:, sum(noisy) - 1], params))
        if not _is_zero(cfg.gradient_weight) and updates is not None:
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


def _is_zero(x) -> bool:
    return V.concrete(x) == 0.0


def _make(cfg: _Config, key) -> optax.GradientTransformationExtraArgs:
    if _is_typed(key) and not V.is_traced(key):
        cfg = dataclasses.replace(cfg, key_impl=_impl_name(key))
    _validate(cfg)
    _key_data(key, cfg.key_impl) if not V.is_traced(key) else None  # a bad key fails here, not in init
    return optax.GradientTransformationExtraArgs(_Init(cfg, key), _Update(cfg))


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


def _cbs_step(cfg: _Config, params, points, usable, w, consensus, alpha, key, count, n, dtype):
    """Consensus-based sampling: exact OU step toward c with covariance noise (asymmetric root).

    x <- c + e^{-dt}(x - c) + sqrt((1 - e^{-2 dt}) / lam) * sum_j sqrt(w_j) (x_j - c) xi_ij,
    lam = 1/(1 + alpha) (sampling) or 1 (optimization); sum_j sqrt(w_j)(x_j - c) xi_ij has the
    alpha-weighted covariance of the ensemble, so no matrix square root is needed. Members
    with zero weight (non-finite loss or position) enter neither the mean nor the spread.
    """
    total = jnp.sum(w)
    root_w = jnp.sqrt(w / jnp.where(total > 0, total, 1))
    xi = _particle_normals(key, count, n, (n,), dtype, None)  # (N, N): particle i, member j
    beta = jnp.exp(-jnp.asarray(cfg.dt, alpha.dtype))
    inv_lam = 1.0 + alpha if cfg.cbs_mode == "sampling" else jnp.ones_like(alpha)
    noise_scale = jnp.sqrt((1.0 - beta**2) * inv_lam)

    def leaf(x, p, c):
        centred = jnp.where(_bcast(w > 0, p), p - c[None], 0)
        spread = jnp.tensordot(xi.astype(x.dtype), centred * _bcast(root_w, p).astype(x.dtype), axes=(1, 0))
        return (beta - 1.0).astype(x.dtype) * (x - c[None]) + noise_scale.astype(x.dtype) * spread

    return jax.tree.map(leaf, params, points, consensus)


def _common(**kw) -> dict:
    defaults = dict(
        noise="anisotropic", sigma=1.0, lambda_=1.0, dt=0.01, alpha=30.0, alpha_growth=1.05, alpha_max=1e5,
        alpha_min=1e-5, alpha_schedule="multiply", ess_target=0.5, scheme="euler_maruyama", batch_size=None,
        correction=None, correction_eps=1e-3, noise_truncation=None, memory=False, lambda_memory=0.4,
        sigma_memory=None, gradient_weight=0.0, axis_name=None)
    defaults.update(kw)
    if defaults["sigma_memory"] is None:
        try:
            defaults["sigma_memory"] = defaults["lambda_memory"] * defaults["sigma"]
        except TypeError:  # a wrong type of sigma or lambda_memory: _validate names it
            pass
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
    ``alpha * f`` up to the float range never overflows, and alpha itself is clamped to the
    largest finite float of the losses' dtype (``alpha_max=1e39`` in float32 is the argmin
    limit, not NaN). Particles whose loss or position is inf or NaN get weight zero (their
    positions do not enter the consensus); if every loss is non-finite the weights are uniform
    over the finite positions, and if no particle is usable the previous consensus is kept.
    Such particles still move toward the consensus (see the module docstring for non-finite
    positions).

    Args:
      noise: ``"anisotropic"`` (componentwise, dimension-free stability 2 lambda > sigma^2 in the
        mean-field limit) or ``"isotropic"`` (needs sigma^2 < 2 lambda / (d - 2)).
      sigma: noise strength (CBXpy's sigma; ConsensusBasedX's sigma is this / sqrt(2)).
      lambda_: drift strength toward the consensus.
      dt: time step; with ``scheme="euler_maruyama"`` it must satisfy ``lambda_ * dt < 2`` (the
        drift multiplies ``x - c`` by ``1 - lambda_ dt`` each step).
      alpha: initial inverse temperature alpha_0.
      alpha_growth: multiplicative scheduler, ``alpha_k = min(alpha_0 * alpha_growth**k, alpha_max)``
        for step k = 0, 1, ... (CBXpy's default scheduler is 1.05 up to 1e5).
      alpha_max: upper cap for every scheduler.
      alpha_min: lower cap for every scheduler (and the ESS solve's lower bracket).
      alpha_schedule: ``"multiply"`` (above), ``"ess"`` (each step, the largest alpha whose
        effective sample size ``(sum w)^2 / sum w^2`` is at least ``ess_target * N``, solved by
        bisection in log alpha), or a callable ``count -> alpha`` such as an optax schedule
        (probed at step 0 when built: it must return a number > 0 there; a NaN it returns later
        keeps the previous alpha, values outside the caps are clipped).
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
      key: int seed or PRNG key used by ``init``; ``init(params, key=...)`` overrides it, and
        ``update(..., key=k)`` draws this step's noise from ``k`` instead of the state's key
        (the state stores raw key data; replace it with
        ``state._replace(key=jax.random.key_data(k))``). Pass a key made with
        ``jax.random.key(seed, impl=...)`` to choose the PRNG implementation; it is part of
        the transform's configuration.
      axis_name: mapped axis the particles are sharded over (``shard_map``/``pmap``); the
        consensus and the ESS solve then reduce over it with ``pmin``/``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`CBOState`; its
      ``update(updates, state, params, *, value, value_fn=None, key=None)`` takes ``value`` of
      shape (N,). It is hashable and equal by value: ``optim.cbo(sigma=1.0) == optim.cbo(sigma=1.0)``.
      ``optax.inject_hyperparams(optim.cbo)(sigma=1.0)`` injects every numeric hyperparameter.

    Raises:
      ValueError: for an invalid argument here (NaN, out of range, ``lambda_ * dt >= 2`` with
        Euler-Maruyama, an ``alpha_schedule`` that is not positive at step 0), or at trace time
        for particles without a leading axis, a ``value`` whose shape is not (N,), or a missing
        ``value``/``value_fn``/gradient.
      TypeError: for a wrong type (a non-float particle dtype, a string where a number goes).

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
            V.fail(bad, options[bad], "None for polar_cbo", "Polarized consensus needs all particles on one device; "
                   "use `cbo` for sharded or batched runs.")
    if isinstance(options.get("options"), dict):  # optax.inject_hyperparams binds **options as `options={...}`
        options = {**options.pop("options"), **options}
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(_Config)})
    if unknown:
        V.fail("options", unknown, "keyword options of optim.cbo", "See optim.cbo's arguments.", TypeError)
    cfg = _Config(**_common(noise=noise, sigma=sigma, lambda_=lambda_, dt=dt, alpha=alpha, alpha_growth=alpha_growth,
                            alpha_max=alpha_max, kernel=kernel, kappa=kappa, kernel_factor=kernel_factor,
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
    V.choice("mode", mode, _CBS_MODES)
    cfg = _Config(**_common(noise="covariance", dt=dt, alpha=alpha, alpha_growth=alpha_growth, alpha_max=alpha_max,
                            alpha_schedule=alpha_schedule, ess_target=ess_target, cbs_mode=mode))
    return _make(cfg, key)


from optim._cbo_driver import CBOHistory, CBOResult, cbo_minimize  # noqa: E402  (re-exported here)
