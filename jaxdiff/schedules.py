"""Noise schedules: x_t = alpha_t x_0 + sigma_t eps.

Every schedule is a pytree of arrays (differentiable in its parameters) with pure methods:

- ``log_alpha(t)``, ``log_sigma(t)``, ``alpha(t)``, ``sigma(t)``;
- ``lambda_(t) = log alpha_t - log sigma_t`` (half log-SNR) and its inverse ``t_of_lambda``;
- ``model_time(t)``: what the network receives (``t`` itself, or the DDPM index for tables);
- ``t_min``/``t_max``: the default sampling interval.

Convention shared by all schedules: ``t = 0`` is clean data (sigma = 0, lambda = +inf). Grids
that end "at zero" (``jd.timesteps(..., final="zero")``) end at ``t = 0``; solvers treat the step
into sigma = 0 specially and never compute through infinities.
"""

from __future__ import annotations

import abc
import math

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["Schedule", "VPLinear", "VPCosine", "VPDiscrete", "VE", "EDM", "RectifiedFlow"]


def _float(x):
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _safe_log1mexp(a):
    """log(1 - exp(a)) for a <= 0, = -inf at a = 0, with finite gradients away from 0."""
    safe = jnp.where(a < 0, a, -1.0)
    out = jnp.where(safe > -math.log(2.0), jnp.log(-jnp.expm1(safe)), jnp.log1p(-jnp.exp(safe)))
    return jnp.where(a < 0, out, -jnp.inf)


class Schedule(struct.PyTreeNode, metaclass=abc.ABCMeta):
    """Base class. Subclasses define ``log_alpha``, ``log_sigma`` and ``t_of_lambda``."""

    @abc.abstractmethod
    def log_alpha(self, t):
        """log alpha_t."""

    @abc.abstractmethod
    def log_sigma(self, t):
        """log sigma_t (-inf at t = 0)."""

    @abc.abstractmethod
    def t_of_lambda(self, lam):
        """Inverse of ``lambda_``."""

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def lambda_(self, t):
        """Half log-SNR, log(alpha_t / sigma_t); +inf at t = 0."""
        return self.log_alpha(t) - self.log_sigma(t)

    def model_time(self, t):
        """The time input the network was trained with; continuous schedules pass t."""
        return t

    def t_of_model_time(self, t_model):
        """Inverse of ``model_time``."""
        return t_model

    @property
    def t_min(self):
        """Default end of sampling grids (the ``t_end`` field)."""
        return self.t_end

    @property
    def t_max(self):
        """Default start of sampling grids (the ``t_start`` field)."""
        return self.t_start


class _VP(Schedule):
    """Variance preserving: sigma_t^2 = 1 - alpha_t^2."""

    def log_sigma(self, t):
        return 0.5 * _safe_log1mexp(2.0 * self.log_alpha(t))

    @staticmethod
    def _log_alpha_of_lambda(lam):
        return -0.5 * jnp.logaddexp(0.0, -2.0 * lam)


class VPLinear(_VP):
    """VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (Song et al., 2021).

    log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2; the inverse in lambda is closed form.

    Example:
        >>> s = VPLinear()
        >>> float(s.t_of_lambda(s.lambda_(0.5)))  # doctest: +ELLIPSIS
        0.5...
    """

    beta_min: jax.Array = struct.field(default=0.1)
    beta_max: jax.Array = struct.field(default=20.0)
    t_start: float = struct.field(pytree_node=False, default=1.0)
    t_end: float = struct.field(pytree_node=False, default=1e-3)

    def log_alpha(self, t):
        t = _float(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_of_lambda(self, lam):
        # Solve (beta_max - beta_min) t^2 / 4 + beta_min t / 2 = L / 2, L = log(1 + e^{-2 lambda}),
        # in the cancellation-free form 2L / (b0 + sqrt(b0^2 + 2 (b1 - b0) L)).
        big_l = jnp.logaddexp(0.0, -2.0 * _float(lam))
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return 2.0 * big_l / (b0 + jnp.sqrt(b0**2 + 2.0 * db * big_l))


class VPCosine(_VP):
    """Cosine VP schedule (Nichol & Dhariwal, 2021): alpha_t = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2).

    ``t_max`` defaults to 0.9946 as in the official DPM-Solver, since alpha_1 = 0 (lambda = -inf).
    """

    s: jax.Array = struct.field(default=0.008)
    t_end: float = struct.field(pytree_node=False, default=1e-3)
    t_start: float = struct.field(pytree_node=False, default=0.9946)

    def _log_alpha_0(self):
        return jnp.log(jnp.cos(self.s / (1.0 + self.s) * math.pi / 2))

    def log_alpha(self, t):
        t = _float(t)
        return jnp.log(jnp.cos((t + self.s) / (1.0 + self.s) * math.pi / 2)) - self._log_alpha_0()

    def t_of_lambda(self, lam):
        log_alpha = self._log_alpha_of_lambda(_float(lam)) + self._log_alpha_0()
        return 2.0 * (1.0 + self.s) / math.pi * jnp.arccos(jnp.exp(log_alpha)) - self.s


class VPDiscrete(_VP):
    """A DDPM beta table, as a continuous schedule (Lu et al., 2022, DPM-Solver's discrete VP).

    Table entry n (n = 0..N-1) sits at t_n = (n + 1) / N, with log alpha_n = sum_{m<=n} log(1 - beta_m) / 2.
    log alpha is piecewise linear in t between entries (and between t = 0, where it is 0, and t_0), so
    ``t_of_lambda`` is its exact inverse on the same breakpoints. The network receives the DDPM index
    ``N t - 1`` (a float; integer at table entries).

    Build from ``betas`` or ``alphas_cumprod`` (exactly one).
    """

    log_alphas: jax.Array  # shape (N,), log sqrt(alphas_cumprod)

    def __init__(self, betas=None, *, alphas_cumprod=None, log_alphas=None):
        given = [v is not None for v in (betas, alphas_cumprod, log_alphas)]
        if sum(given) != 1:
            raise ValueError("`VPDiscrete` takes exactly one of `betas`, `alphas_cumprod` or `log_alphas`.")
        table = next(v for v in (betas, alphas_cumprod, log_alphas) if v is not None)
        if jnp.ndim(table) != 1 or jnp.shape(table)[0] < 2:
            raise ValueError(f"`VPDiscrete` needs a 1-D table of at least 2 entries, got shape {jnp.shape(table)}.")
        if betas is not None:
            log_alphas = 0.5 * jnp.cumsum(jnp.log1p(-_float(betas)))
        elif alphas_cumprod is not None:
            log_alphas = 0.5 * jnp.log(_float(alphas_cumprod))
        object.__setattr__(self, "log_alphas", log_alphas)

    @property
    def num_train_steps(self) -> int:
        return self.log_alphas.shape[0]

    def _knots(self):
        n = self.num_train_steps
        t = jnp.arange(n + 1, dtype=self.log_alphas.dtype) / n
        return t, jnp.concatenate([jnp.zeros((1,), self.log_alphas.dtype), self.log_alphas])

    def log_alpha(self, t):
        # knots are uniform in t (k / N), so the segment index is direct: no search in the sampling loop
        n = self.num_train_steps
        _, knots_la = self._knots()
        u = jnp.clip(_float(t), 0.0, 1.0) * n
        k = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, n - 1)
        frac = u - k
        return knots_la[k] + frac * (knots_la[k + 1] - knots_la[k])

    def t_of_lambda(self, lam):
        knots_t, knots_la = self._knots()
        log_alpha = self._log_alpha_of_lambda(_float(lam))
        # exact inverse of the piecewise-linear map; log alpha decreases along the knots
        desc = knots_la[::-1]
        k = jnp.clip(jnp.searchsorted(desc, log_alpha, method="compare_all") - 1, 0, desc.shape[0] - 2)
        lo, hi = desc[k], desc[k + 1]
        t_lo, t_hi = knots_t[::-1][k], knots_t[::-1][k + 1]
        return t_lo + (log_alpha - lo) / (hi - lo) * (t_hi - t_lo)

    def model_time(self, t):
        return self.num_train_steps * t - 1.0

    def t_of_model_time(self, t_model):
        return (t_model + 1.0) / self.num_train_steps

    @property
    def t_min(self):
        return 1.0 / self.num_train_steps

    @property
    def t_max(self):
        return 1.0


class VE(Schedule):
    """Variance exploding (Song et al., 2021): alpha = 1, sigma_t = sigma_min (sigma_max/sigma_min)^t.

    ``t = 0`` is clean data (sigma = 0) by the shared convention; ``t_min`` defaults to 1e-5.
    """

    sigma_min: jax.Array = struct.field(default=0.01)
    sigma_max: jax.Array = struct.field(default=50.0)
    t_start: float = struct.field(pytree_node=False, default=1.0)
    t_end: float = struct.field(pytree_node=False, default=1e-5)

    def log_alpha(self, t):
        return jnp.zeros_like(_float(t))

    def log_sigma(self, t):
        t = _float(t)
        log_s = jnp.log(self.sigma_min) + t * (jnp.log(self.sigma_max) - jnp.log(self.sigma_min))
        return jnp.where(t > 0, log_s, -jnp.inf)

    def t_of_lambda(self, lam):
        lo, hi = jnp.log(self.sigma_min), jnp.log(self.sigma_max)
        return (-_float(lam) - lo) / (hi - lo)


class EDM(Schedule):
    """EDM (Karras et al., 2022): alpha = 1, sigma_t = t; the network receives sigma."""

    sigma_min: jax.Array = struct.field(default=0.002)
    sigma_max: jax.Array = struct.field(default=80.0)

    def log_alpha(self, t):
        return jnp.zeros_like(_float(t))

    def sigma(self, t):
        return _float(t)

    def log_sigma(self, t):
        t = _float(t)
        return jnp.where(t > 0, jnp.log(jnp.where(t > 0, t, 1.0)), -jnp.inf)

    def t_of_lambda(self, lam):
        return jnp.exp(-_float(lam))

    @property
    def t_min(self):
        return self.sigma_min

    @property
    def t_max(self):
        return self.sigma_max


class RectifiedFlow(Schedule):
    """Rectified flow / flow matching (Liu et al., 2023; Lipman et al., 2023): alpha = 1 - t, sigma = t.

    t = 1 is pure noise (alpha = 0, lambda = -inf); solvers handle a first step from there.
    """

    t_end: float = struct.field(pytree_node=False, default=1e-3)
    t_start: float = struct.field(pytree_node=False, default=1.0)

    def alpha(self, t):
        return 1.0 - _float(t)

    def sigma(self, t):
        return _float(t)

    def log_alpha(self, t):
        t = _float(t)
        return jnp.where(t < 1, jnp.log1p(-jnp.where(t < 1, t, 0.0)), -jnp.inf)

    def log_sigma(self, t):
        t = _float(t)
        return jnp.where(t > 0, jnp.log(jnp.where(t > 0, t, 1.0)), -jnp.inf)

    def t_of_lambda(self, lam):
        return jax.nn.sigmoid(-_float(lam))
