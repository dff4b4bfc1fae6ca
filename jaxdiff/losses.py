"""Training losses for the example networks (denoising score matching)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.models import Denoiser

__all__ = ["denoising_loss"]


def denoising_loss(denoiser: Denoiser, args, x0, key, t_min=None, t_max=None):
    """E_{t, eps} || eps_hat(alpha_t x0 + sigma_t eps, t) - eps ||^2, t ~ U(t_min, t_max) per sample.

    The noise-prediction loss of Ho et al. (2020), for any schedule and parameterization (the
    prediction is converted to eps by ``Denoiser``). ``x0`` has shape ``(batch, ...)``.
    """
    s = denoiser.schedule
    t_min = s.t_min if t_min is None else t_min
    t_max = s.t_max if t_max is None else t_max
    k_t, k_eps = jax.random.split(key)
    t = jax.random.uniform(k_t, (x0.shape[0],), minval=t_min, maxval=t_max)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)

    def one(x0_i, eps_i, t_i):
        x_t = s.alpha(t_i) * x0_i + s.sigma(t_i) * eps_i
        return jnp.sum((denoiser.eps(x_t[None], t_i, args)[0] - eps_i) ** 2)

    return jnp.mean(jax.vmap(one)(x0, eps, t))
