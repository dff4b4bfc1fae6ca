"""What every consensus transform shares: the defaults (in one place), the static configuration and its
checks, the PRNG keys, the state, and the ``init``/``update`` callables up to the consensus point.

A transform is ``_make(cfg, key, update_cls)``: ``_Init`` builds the :class:`CBOState`; ``update_cls``
(``optim.cbo._CBOUpdate`` for CBO and polarized CBO, ``optim.cbs._CBSUpdate`` for consensus-based
sampling) inherits ``_Update.__call__``, which checks the inputs, updates the personal-best memory,
picks this step's alpha, computes the Gibbs weights and the consensus (``optim._consensus``), and
calls its ``step(ctx)`` for the algorithm's move. Both callables are frozen dataclasses equal and
hashable by configuration, so two identical transforms are equal and ``cbo_minimize``'s compiled
loop is reused.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim import _consensus as C
from optim import _validate as V
from optim._consensus import ess_alpha

#: Every default of the consensus transforms (the factories' signatures read them from here).
#: ``"cbo"`` is the CBXpy success-evaluation anchor (anisotropic Euler-Maruyama, sigma = 10.1,
#: dt = 0.01, alpha 30 x1.05 up to 1e5): it reaches the global minimum of Rastrigin and Ackley in
#: d = 20 with N = 40 particles in >= 99/100 runs (``benchmarks/results/cbo_defaults.md``), where the
#: former sigma = 1.0 stalled at f = 20.3. ``"isotropic_sigma"`` is the default sigma with
#: ``noise="isotropic"``, whose stability needs sigma^2 < 2 lambda / (d - 2). ``"polar_cbo"`` and
#: ``"cbs"`` are the options those transforms set differently.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cbo": dict(noise="anisotropic", sigma=10.1, lambda_=1.0, dt=0.01, alpha=30.0, alpha_growth=1.05, alpha_max=1e5,
                alpha_min=1e-5, alpha_schedule="multiply", ess_target=0.5, scheme="euler_maruyama", batch_size=None,
                correction=None, correction_eps=1e-3, noise_truncation=None, memory=False, lambda_memory=0.4,
                sigma_memory=None, gradient_weight=0.0, axis_name=None),
    "isotropic_sigma": {"sigma": 0.3},
    "polar_cbo": dict(kernel="gaussian", kappa=1.0, kernel_factor="alpha", sigma=1.0),
    "cbs": dict(mode="sampling", dt=0.1, alpha=1.0, alpha_growth=1.0, alpha_max=1e5),
}

NOISES = ("anisotropic", "isotropic")
SCHEMES = ("euler_maruyama", "exact_drift")
CORRECTIONS = (None, "heaviside", "heaviside_reg")
KERNELS = ("gaussian", "laplace")
CBS_MODES = ("sampling", "optimization")


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
    cbs_mode: str | None = None  # cbs
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


def validate(cfg: _Config) -> None:
    """Every construction-time check of a configuration (ValueError/TypeError naming the argument)."""
    if cfg.cbs_mode is None:
        V.choice("noise", cfg.noise, NOISES)
    V.choice("scheme", cfg.scheme, SCHEMES)
    V.choice("correction", cfg.correction, CORRECTIONS)
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
        V.choice("kernel", cfg.kernel, KERNELS)
        V.choice("kernel_factor", cfg.kernel_factor, ("alpha", "const"))
        k = V.concrete(cfg.kappa)
        if k is not None and not k > 0:
            V.fail("kappa", cfg.kappa, "a number > 0 (math.inf gives plain CBO)", "Pass the kernel width.")


def _check_alpha_value(name, value, hint):
    if not (value > 0):  # NaN fails too
        V.fail(name, value, "a number > 0", hint)


def check_inputs(params, value, updates, cfg: _Config):
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
    if (V.concrete(cfg.gradient_weight) or 0.0) > 0:
        if updates is None or jax.tree.structure(updates) != jax.tree.structure(params):
            raise ValueError("`gradient_weight` > 0 needs the per-particle gradients in `updates`, a pytree "
                             "shaped like `params`; pass `jax.vmap(jax.grad(f))(params)`.")
    return n


# ----------------------------------------------------------------------------------------------
# keys: the state holds raw key data; the transform knows the implementation


def _impl_name(key) -> str:
    return str(jax.random.key_impl(key))


def default_impl_for(shape) -> str:
    default = jax.random.key_data(jax.random.key(0))
    if tuple(shape) == tuple(default.shape):
        return _impl_name(jax.random.key(0))
    return {(2,): "threefry2x32", (4,): "rbg"}.get(tuple(shape), _impl_name(jax.random.key(0)))


def is_typed(key) -> bool:
    return isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def key_data(key, impl: str | None):
    """Raw uint32 key data from an int seed, a typed key or raw data (checked against ``impl``)."""
    if isinstance(key, (bool, np.bool_)) or isinstance(key, float):
        V.fail("key", key, "an int seed or a PRNG key", "Pass e.g. key=0 or key=jax.random.key(0).", TypeError)
    if isinstance(key, (int, np.integer)) or (hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jnp.integer)
                                               and jnp.ndim(key) == 0):
        return jax.random.key_data(jax.random.key(key, impl=impl))
    if is_typed(key):
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
        return override if is_typed(override) else jax.random.wrap_key_data(
            key_data(override, cfg.key_impl), impl=cfg.key_impl or default_impl_for(jnp.shape(override)))
    return jax.random.wrap_key_data(data, impl=cfg.key_impl or default_impl_for(data.shape))


def particle_normals(key, count, n_local, shape, dtype, axis_name):
    """Standard normals of ``shape`` for each local particle, from a per-particle key.

    The key of global particle ``i`` at step ``count`` is ``fold_in(fold_in(key, count), i)``, so
    the draws do not depend on the device layout.
    """
    step_key = jax.random.fold_in(key, count)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local
    index = offset + jnp.arange(n_local, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(step_key, i), shape, dtype))(index)


def split_flat(flat, like):
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
# pieces of a step


def static_sqrt(x):
    """``sqrt(x)`` as a Python float for a concrete ``x`` (no extra op in the program), else traced."""
    v = V.concrete(x)
    return math.sqrt(v) if v is not None else jnp.sqrt(x)


def _clamped(x, dtype):
    """``x`` in ``dtype``, clamped to its largest finite value (a Python 1e39 in float32 without an overflow)."""
    big = float(jnp.finfo(dtype).max)
    v = V.concrete(x)
    if v is not None:
        return jnp.asarray(min(v, big), dtype)
    return jnp.minimum(jnp.asarray(x, dtype), big)


def alpha_at(cfg: _Config, state, value, usable, dtype):
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


def count_evaluations(value_fn, k: int) -> None:
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
        if is_typed(key) and not V.is_traced(key):
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
            key=key_data(self.key if key is None else key, cfg.key_impl),
            count=jnp.zeros((), jnp.int32),
            alpha=_clamped(cfg.alpha, dtype),
            consensus=consensus,
            memory=memory,
            memory_value=memory_value,
        )


class Context(NamedTuple):
    """What ``_Update`` hands an algorithm's ``step``: the step's inputs and its consensus."""

    cfg: _Config
    n: int  # local particles
    params: Any  # the particles (leaves (n, ...))
    updates: Any  # per-particle gradients or None
    value: jax.Array  # (n,) losses at params, float32 at least
    value_fn: Callable | None
    dtype: Any  # the particles' dtype
    count: jax.Array  # steps taken before this one
    step_key: jax.Array  # a typed key
    memory: Any  # personal bests (None without memory=True)
    points: Any  # the points the consensus is taken over: params, or the memory
    point_value: jax.Array
    point_usable: jax.Array
    alpha: jax.Array
    weights: jax.Array  # (n,) unnormalised Gibbs weights of the points
    consensus: Any  # pytree like one particle


@dataclasses.dataclass(frozen=True, eq=False)
class _Update(_Part, abc.ABC):
    """``update(updates, state, params, *, value, value_fn=None, key=None)``: the shared part of every step;
    each algorithm (CBO, CBS) supplies ``step``."""

    @abc.abstractmethod
    def step(self, ctx: Context) -> Any:
        """The algorithm's move of the particles given the consensus context."""

    def __call__(self, updates, state, params=None, *, value=None, value_fn=None, key=None, **extra):
        del extra
        cfg = self.cfg
        n = check_inputs(params, value, updates, cfg)
        value = jnp.asarray(value)
        value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
        if cfg.correction is not None and value_fn is None:
            raise ValueError(f"`correction`={cfg.correction!r} compares f(x_i) with f(consensus) and needs the "
                             "objective: call `update(..., value=losses, value_fn=f)` with `f` mapping one "
                             "particle to its loss.")
        usable = C.finite_positions(params)
        memory, memory_value = state.memory, state.memory_value
        if cfg.memory:
            better = jnp.isfinite(value) & usable & ~(value >= memory_value)
            memory = jax.tree.map(lambda y, x: jnp.where(C._bcast(better, x), x, y), memory, params)
            memory_value = jnp.where(better, value.astype(memory_value.dtype), memory_value)
            points, point_value, point_usable = memory, memory_value, C.finite_positions(memory)
        else:
            points, point_value, point_usable = params, value, usable
        alpha = alpha_at(cfg, state, point_value, point_usable, value.dtype)
        w = C.weights(point_value, point_usable, alpha, cfg.axis_name)
        consensus = C.weighted_mean(w, points, cfg.axis_name, fallback=state.consensus)
        ctx = Context(cfg, n, params, updates, value, value_fn, jnp.result_type(*jax.tree.leaves(params)),
                      state.count, _step_key(cfg, state.key, key), memory, points, point_value, point_usable, alpha,
                      w, consensus)
        step = jax.tree.map(lambda s, x: s.astype(x.dtype), self.step(ctx), params)
        new_state = CBOState(key=state.key, count=optax.safe_increment(state.count),
                             alpha=alpha.astype(state.alpha.dtype), consensus=consensus, memory=memory,
                             memory_value=memory_value)
        return step, new_state


def make(cfg: _Config, key, update_cls: type) -> optax.GradientTransformationExtraArgs:
    """The transform of a configuration: validated, the key checked now (not at init)."""
    if is_typed(key) and not V.is_traced(key):
        cfg = dataclasses.replace(cfg, key_impl=_impl_name(key))
    validate(cfg)
    key_data(key, cfg.key_impl) if not V.is_traced(key) else None  # a bad key fails here, not in init
    return optax.GradientTransformationExtraArgs(_Init(cfg, key), update_cls(cfg))


def config(**kw) -> _Config:
    """A configuration from ``DEFAULTS["cbo"]`` updated with ``kw`` (sigma_memory defaults to lambda_memory sigma)."""
    values = dict(DEFAULTS["cbo"])
    values.update(kw)
    if values["sigma_memory"] is None:
        try:
            values["sigma_memory"] = values["lambda_memory"] * values["sigma"]
        except TypeError:  # a wrong type of sigma or lambda_memory: validate() names it
            pass
    return _Config(**values)
