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


class _Analytic(struct.PyTreeNode):
    def x0_eps(self, schedule: Schedule, x, t):
        raise NotImplementedError

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

    def variance(self, schedule: Schedule, t):
        return schedule.alpha(t) ** 2 * self.scale**2 + schedule.sigma(t) ** 2

    def x0_eps(self, schedule: Schedule, x, t):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        c = self.variance(schedule, t)
        centred = x - alpha * self.mean
        return self.mean + alpha * self.scale**2 / c * centred, sigma / c * centred

    def flow(self, schedule: Schedule, x_s, s, t):
        """Exact probability-flow map from time s to time t."""
        ratio = jnp.sqrt(self.variance(schedule, t) / self.variance(schedule, s))
        return schedule.alpha(t) * self.mean + ratio * (x_s - schedule.alpha(s) * self.mean)

    def sample_marginal(self, key, schedule: Schedule, t, shape):
        z = jax.random.normal(key, shape)
        return schedule.alpha(t) * self.mean + jnp.sqrt(self.variance(schedule, t)) * z


class GaussianMixture(_Analytic):
    """sum_k weights_k N(means_k, scales_k^2 I) in d dimensions; x has shape (..., d).

    Args (shapes): weights (K,), means (K, d), scales (K,).
    """

    weights: jax.Array
    means: jax.Array
    scales: jax.Array

    def _responsibilities(self, schedule, x, t):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        c = alpha**2 * self.scales**2 + sigma**2  # (K,)
        d = self.means.shape[-1]
        diff = x[..., None, :] - alpha * self.means  # (..., K, d)
        logp = jnp.log(self.weights) - 0.5 * jnp.sum(diff**2, -1) / c - 0.5 * d * jnp.log(c)
        return jax.nn.softmax(logp, axis=-1), diff, c

    def log_prob(self, schedule: Schedule, x, t):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        c = alpha**2 * self.scales**2 + sigma**2
        d = self.means.shape[-1]
        diff = x[..., None, :] - alpha * self.means
        logp = jnp.log(self.weights) - 0.5 * jnp.sum(diff**2, -1) / c - 0.5 * d * jnp.log(2 * jnp.pi * c)
        return jax.scipy.special.logsumexp(logp, axis=-1)

    def x0_eps(self, schedule: Schedule, x, t):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        resp, diff, c = self._responsibilities(schedule, x, t)
        # E[eps | x] = sigma * sum_k r_k diff_k / C_k ; E[x0 | x] = (x - sigma eps) / alpha, computed stably:
        eps = sigma * jnp.sum(resp[..., None] * diff / c[:, None], axis=-2)
        x0 = jnp.sum(resp[..., None] * (self.means + (alpha * self.scales**2 / c)[:, None] * diff), axis=-2)
        return x0, eps

    def sample(self, key, num: int, schedule: Schedule | None = None, t=0.0):
        """Exact samples of the data (or of the marginal at t when a schedule is given)."""
        k1, k2 = jax.random.split(key)
        comp = jax.random.choice(k1, self.weights.shape[0], (num,), p=self.weights)
        z = jax.random.normal(k2, (num, self.means.shape[-1]))
        if schedule is None:
            return self.means[comp] + self.scales[comp, None] * z
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        std = jnp.sqrt(alpha**2 * self.scales[comp] ** 2 + sigma**2)
        return alpha * self.means[comp] + std[:, None] * z
