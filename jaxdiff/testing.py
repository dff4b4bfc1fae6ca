"""Analytic diffusion models with exact answers, for tests, the demo and benchmarks.

- ``GaussianData(mean, scale)``: x0 ~ N(mean, diag(scale^2)). Under any schedule,
  x_t ~ N(alpha_t mean, C_t) with C_t = alpha_t^2 scale^2 + sigma_t^2, the predictions are affine,
  and the probability-flow ODE has the exact solution
  x_t = alpha_t mean + sqrt(C_t / C_T) (x_T - alpha_T mean).
- ``GaussianMixture(weights, means, scales)``: isotropic components; exact score and predictions
  (a softmax over components), exact samples of the data and of every marginal.

Both are pytrees; their ``denoiser(schedule, prediction)`` returns a ``jaxdiff.Denoiser`` whose
model reads its parameters from ``args``, so gradients flow to them like to network weights:
``jd.sample(gd.denoiser(s), x_T, ts, args=gd)``.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff.models import Denoiser
from jaxdiff.schedules import Schedule

__all__ = ["GaussianData", "GaussianMixture", "from_x0_eps"]


def from_x0_eps(schedule: Schedule, t, x, x0, eps, prediction: str):
    """Express exact (x0, eps) in a model parameterization (inverse of ``Denoiser``'s conversion)."""
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "score":
        return -eps / sigma
    if prediction == "velocity":
        d_alpha, d_sigma = jax.jvp(lambda tt: (schedule.alpha(tt), schedule.sigma(tt)), (t,), (jnp.ones_like(t),))[1]
        return d_alpha * x0 + d_sigma * eps
    raise ValueError(f"Unknown `prediction={prediction!r}`.")


class _Analytic(struct.PyTreeNode, metaclass=abc.ABCMeta):
    @abc.abstractmethod
    def x0_eps(self, schedule: Schedule, x, t):
        """Exact (E[x0 | x_t = x], E[eps | x_t = x])."""

    def denoiser(self, schedule: Schedule, prediction: str = "epsilon", **kwargs) -> Denoiser:
        """A Denoiser whose model is exact; pass the model (``self`` or a modified copy) as ``args``."""

        def fn(x, t_model, params):
            t = schedule.t_of_model_time(t_model)
            x0, eps = params.x0_eps(schedule, x, t)
            return from_x0_eps(schedule, t, x, x0, eps, prediction)

        return Denoiser(fn, schedule, prediction, **kwargs)


class GaussianData(_Analytic):
    """x0 ~ N(mean, diag(scale^2)); ``mean`` and ``scale`` broadcast against x (trailing axes)."""

    mean: jax.Array
    scale: jax.Array

    def _params(self, shape):
        return jnp.broadcast_to(self.mean, shape), jnp.broadcast_to(self.scale, shape)

    def variance(self, schedule: Schedule, t, shape=()):
        scale = jnp.broadcast_to(self.scale, jnp.broadcast_shapes(shape, jnp.shape(self.scale)))
        return schedule.alpha(t) ** 2 * scale**2 + schedule.sigma(t) ** 2

    def x0_eps(self, schedule: Schedule, x, t):
        mean, scale = self._params(x.shape)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        c = alpha**2 * scale**2 + sigma**2
        centred = x - alpha * mean
        return mean + alpha * scale**2 / c * centred, sigma / c * centred

    def flow(self, schedule: Schedule, x_s, s, t):
        """Exact probability-flow map from time s to time t."""
        mean, _ = self._params(x_s.shape)
        ratio = jnp.sqrt(self.variance(schedule, t, x_s.shape) / self.variance(schedule, s, x_s.shape))
        return schedule.alpha(t) * mean + ratio * (x_s - schedule.alpha(s) * mean)

    def sample_marginal(self, key, schedule: Schedule, t, shape):
        mean, _ = self._params(shape)
        z = jax.random.normal(key, shape)
        return schedule.alpha(t) * mean + jnp.sqrt(self.variance(schedule, t, shape)) * z


class GaussianMixture(_Analytic):
    """sum_k weights_k N(means_k, scales_k^2 I) in d dimensions; x has shape (..., d).

    Args (shapes): weights (K,), means (K, d), scales (K,).
    """

    weights: jax.Array
    means: jax.Array
    scales: jax.Array

    def _components(self, schedule, x, t):
        """Per-component log densities (up to a shared constant), differences and variances."""
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        num, d = self.means.shape
        c = alpha**2 * self.scales**2 + sigma**2  # (K,)
        xb = jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (num, d))
        diff = xb - alpha * jnp.broadcast_to(self.means, xb.shape)  # (..., K, d)
        cb = jnp.broadcast_to(c, diff.shape[:-1])
        logp = jnp.broadcast_to(jnp.log(self.weights), cb.shape) - 0.5 * jnp.sum(diff**2, -1) / cb - 0.5 * d * jnp.log(2 * jnp.pi * cb)
        return logp, diff, c

    def log_prob(self, schedule: Schedule, x, t):
        """log p_t(x), exact."""
        return jax.scipy.special.logsumexp(self._components(schedule, x, t)[0], axis=-1)

    def x0_eps(self, schedule: Schedule, x, t):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        logp, diff, c = self._components(schedule, x, t)
        resp = jax.nn.softmax(logp, axis=-1)[..., None]  # (..., K, 1)
        cd = jnp.broadcast_to(c[:, None], diff.shape)
        eps = sigma * jnp.sum(resp * diff / cd, axis=-2)
        shrink = jnp.broadcast_to((alpha * self.scales**2 / c)[:, None], diff.shape)
        x0 = jnp.sum(resp * (jnp.broadcast_to(self.means, diff.shape) + shrink * diff), axis=-2)
        return x0, eps

    def sample(self, key, num: int, schedule: Schedule | None = None, t=0.0):
        """Exact samples of the data (or of the marginal at t when a schedule is given)."""
        k1, k2 = jax.random.split(key)
        comp = jax.random.choice(k1, self.weights.shape[0], (num,), p=self.weights)
        z = jax.random.normal(k2, (num, self.means.shape[-1]))
        alpha, sigma = (1.0, 0.0) if schedule is None else (schedule.alpha(t), schedule.sigma(t))
        std = jnp.sqrt(alpha**2 * self.scales[comp] ** 2 + sigma**2)
        return alpha * self.means[comp] + std[:, None] * z
