"""Consensus-based optimization (CBO) and its variants as optax-style transforms.

CBO is a derivative-free global optimizer. An ensemble of ``N`` particles ``x_i`` drifts toward a
Gibbs-weighted consensus point and explores with noise scaled by the distance to it:

.. math::

    c_\\alpha = \\frac{\\sum_i w_i x_i}{\\sum_i w_i},\\quad w_i = e^{-\\alpha (f(x_i) - \\min_j f(x_j))},
    \\qquad x_i \\leftarrow x_i - \\lambda\\,dt\\,(x_i - c_\\alpha) + \\sigma \\sqrt{dt}\\, D(x_i - c_\\alpha)\\,\\xi_i .

This module has CBO and polarized CBO; consensus-based sampling is ``optim.cbs``, the weights and the
consensus point ``optim._consensus``, the shared configuration, defaults (``optim._cbo_base.DEFAULTS``),
keys and state ``optim._cbo_base``, and the ``cbo_minimize`` driver ``optim._cbo_driver``.

Every transform is an ``optax.GradientTransformationExtraArgs`` acting on a pytree whose
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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from optim import _cbo_base as B
from optim import _consensus as C
from optim import _validate as V
from optim._cbo_base import DEFAULTS, CBOState

__all__ = ["CBOState", "cbo", "polar_cbo"]

_D = DEFAULTS["cbo"]
_P = DEFAULTS["polar_cbo"]


@dataclasses.dataclass(frozen=True, eq=False)
class _CBOUpdate(B._Update):
    """The CBO / polarized CBO move: drift toward the (local) consensus, scaled noise, memory and gradient terms."""

    def step(self, ctx: B.Context):
        cfg, n, params = ctx.cfg, ctx.n, ctx.params
        local = None
        if cfg.kernel is not None:
            local = C.kernel_consensus(ctx.points, ctx.point_value, ctx.point_usable, ctx.alpha, cfg.kernel, cfg.kappa,
                                       cfg.kernel_factor, ctx.consensus)
        elif cfg.batch_size is not None:
            perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(ctx.step_key, ctx.count), n), n)
            local = C.batch_consensus(ctx.points, ctx.point_value, ctx.point_usable, ctx.alpha, cfg.batch_size, perm,
                                      ctx.consensus)
        if local is None:
            drift = jax.tree.map(lambda x, c: x - c[None], params, ctx.consensus)
        else:
            drift = jax.tree.map(jnp.subtract, params, local)

        drift_corrected = drift
        if cfg.correction is not None:
            if local is None:
                f_c = jnp.broadcast_to(ctx.value_fn(ctx.consensus), (n,))
                B.count_evaluations(ctx.value_fn, 1)
            else:
                f_c = jax.vmap(ctx.value_fn)(local)
                B.count_evaluations(ctx.value_fn, n)
            z = ctx.value - f_c.astype(ctx.value.dtype)
            if cfg.correction == "heaviside":
                h = (z > 0).astype(ctx.value.dtype)
            else:
                h = 0.5 + 0.5 * jnp.tanh(z / cfg.correction_eps)
            drift_corrected = jax.tree.map(lambda d: d * C._bcast(h, d).astype(d.dtype), drift)

        if cfg.scheme == "euler_maruyama":
            decay = cfg.lambda_ * cfg.dt
        else:  # exact relaxation of dx = -lambda (x - c) dt over one step, frozen c
            ld = V.concrete(cfg.lambda_ * cfg.dt) if None not in (V.concrete(cfg.lambda_), V.concrete(cfg.dt)) else None
            decay = -math.expm1(-ld) if ld is not None else -jnp.expm1(-cfg.lambda_ * cfg.dt)

        # draw only the normals a nonzero noise term needs (a static sigma = 0 draws none)
        noisy = [not V.is_zero(cfg.sigma), bool(cfg.memory) and not V.is_zero(cfg.sigma_memory)]
        if any(noisy):
            flat_size = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(params))
            xi = B.particle_normals(ctx.step_key, ctx.count, n, (sum(noisy), flat_size), ctx.dtype, cfg.axis_name)
        step = jax.tree.map(lambda dc: -decay * dc, drift_corrected)
        if noisy[0]:
            scale = cfg.sigma * B.static_sqrt(cfg.dt)
            step = jax.tree.map(lambda s, e: s + scale * e, step, _noise(cfg, drift, xi[:, 0], params))
        if cfg.memory:
            to_memory = jax.tree.map(jnp.subtract, params, ctx.memory)
            step = jax.tree.map(lambda s, m: s - cfg.lambda_memory * cfg.dt * m, step, to_memory)
            if noisy[1]:
                scale = cfg.sigma_memory * B.static_sqrt(cfg.dt)
                step = jax.tree.map(lambda s, e: s + scale * e, step,
                                    _noise(cfg, to_memory, xi[:, sum(noisy) - 1], params))
        if not V.is_zero(cfg.gradient_weight) and ctx.updates is not None:
            step = jax.tree.map(lambda s, g: s - (cfg.gradient_weight * cfg.dt) * g.astype(s.dtype), step, ctx.updates)
        return step


def _noise(cfg: B._Config, drift, xi_flat, like):
    """D(drift) xi: anisotropic (drift * xi) or isotropic (||drift|| xi), optionally truncated."""
    xi = B.split_flat(xi_flat, like)
    m = cfg.noise_truncation
    if cfg.noise == "anisotropic":
        if m is not None:
            drift = jax.tree.map(lambda d: jnp.clip(d, -m, m), drift)
        return jax.tree.map(jnp.multiply, drift, xi)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1) for d in jax.tree.leaves(drift)))
    if m is not None:
        norm = jnp.minimum(norm, m)
    return jax.tree.map(lambda e: C._bcast(norm, e).astype(e.dtype) * e, xi)


def _sigma(sigma, noise):
    """``sigma=None``: the default of the noise model (``DEFAULTS``)."""
    if sigma is not None:
        return sigma
    return DEFAULTS["isotropic_sigma"]["sigma"] if noise == "isotropic" else _D["sigma"]


def cbo(
    noise: str = _D["noise"],
    sigma: float | None = None,
    lambda_: float = _D["lambda_"],
    dt: float = _D["dt"],
    alpha: float = _D["alpha"],
    alpha_growth: float = _D["alpha_growth"],
    alpha_max: float = _D["alpha_max"],
    *,
    alpha_min: float = _D["alpha_min"],
    alpha_schedule: str | Callable[[jax.Array], jax.Array] = _D["alpha_schedule"],
    ess_target: float = _D["ess_target"],
    scheme: str = _D["scheme"],
    batch_size: int | None = _D["batch_size"],
    correction: str | None = _D["correction"],
    correction_eps: float = _D["correction_eps"],
    noise_truncation: float | None = _D["noise_truncation"],
    memory: bool = _D["memory"],
    lambda_memory: float = _D["lambda_memory"],
    sigma_memory: float | None = _D["sigma_memory"],
    gradient_weight: float = _D["gradient_weight"],
    key: int | jax.Array = 0,
    axis_name: Any = _D["axis_name"],
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

    **Defaults** (``optim._cbo_base.DEFAULTS``) are the CBXpy anchor settings: with N = 40
    particles from U(-3, 3)^20 and 5000 steps they reach the global minimum of 20-D Rastrigin and
    Ackley in >= 99 of 100 runs (``benchmarks/results/cbo_defaults.md``). The former default
    ``sigma=1.0`` stalled at f = 20.3 on Rastrigin: too little noise to leave the local minima.

    Args:
      noise: ``"anisotropic"`` (componentwise, dimension-free stability 2 lambda > sigma^2 in the
        mean-field limit) or ``"isotropic"`` (needs sigma^2 < 2 lambda / (d - 2)).
      sigma: noise strength (CBXpy's sigma; ConsensusBasedX's sigma is this / sqrt(2)). None:
        10.1 for anisotropic noise (the CBXpy anchor), ``DEFAULTS["isotropic_sigma"]`` (0.3) for
        isotropic noise, which diverges at the anisotropic value in more than a few dimensions.
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
    cfg = B.config(
        noise=noise, sigma=_sigma(sigma, noise), lambda_=lambda_, dt=dt, alpha=alpha, alpha_growth=alpha_growth,
        alpha_max=alpha_max, alpha_min=alpha_min, alpha_schedule=alpha_schedule, ess_target=ess_target,
        scheme=scheme, batch_size=batch_size, correction=correction, correction_eps=correction_eps,
        noise_truncation=noise_truncation, memory=memory, lambda_memory=lambda_memory,
        sigma_memory=sigma_memory, gradient_weight=gradient_weight, axis_name=axis_name)
    return B.make(cfg, key, _CBOUpdate)


def polar_cbo(
    kernel: str = _P["kernel"],
    kappa: float = _P["kappa"],
    kernel_factor: str = _P["kernel_factor"],
    noise: str = _D["noise"],
    sigma: float = _P["sigma"],
    lambda_: float = _D["lambda_"],
    dt: float = _D["dt"],
    alpha: float = _D["alpha"],
    alpha_growth: float = _D["alpha_growth"],
    alpha_max: float = _D["alpha_max"],
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

    Its defaults (kernel, kappa and sigma = 1) are ``DEFAULTS["polar_cbo"]``; the others are
    :func:`cbo`'s.

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
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(B._Config)})
    if unknown:
        V.fail("options", unknown, "keyword options of optim.cbo", "See optim.cbo's arguments.", TypeError)
    cfg = B.config(noise=noise, sigma=sigma, lambda_=lambda_, dt=dt, alpha=alpha, alpha_growth=alpha_growth,
                   alpha_max=alpha_max, kernel=kernel, kappa=kappa, kernel_factor=kernel_factor, **options)
    return B.make(cfg, key, _CBOUpdate)
