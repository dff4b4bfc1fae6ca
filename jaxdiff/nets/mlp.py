"""Small flax networks for examples, benchmarks and tests.

``MLPDenoiser`` is an MLP on (x, Fourier features of t); ``as_model`` turns a flax module into the
``fn(x, t_model, params)`` signature that ``jaxdiff.Denoiser`` expects.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["MLPDenoiser", "as_model"]


class MLPDenoiser(nn.Module):
    """MLP denoiser: [x, sin/cos(2^k pi t)] -> SiLU hidden layers -> prediction of x's shape.

    Attributes:
        width: hidden width.
        depth: number of hidden layers.
        time_features: number of Fourier frequencies for t (model time, any scale).
        dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """

    width: int = 512
    depth: int = 4
    time_features: int = 16
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t):
        batch_shape, dim = x.shape[:-1], x.shape[-1]
        freqs = 2.0 ** jnp.arange(self.time_features // 2, dtype=jnp.float32)
        angles = jnp.log1p(jnp.abs(jnp.asarray(t, jnp.float32))) * freqs
        emb = jnp.broadcast_to(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)]), batch_shape + (self.time_features,))
        h = jnp.concatenate([x.astype(self.dtype), emb.astype(self.dtype)], axis=-1)
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.width, dtype=self.dtype)(h))
        return nn.Dense(dim, dtype=self.dtype)(h)


def as_model(module: nn.Module):
    """``fn(x, t_model, params) = module.apply(params, x, t_model)``."""

    def fn(x, t_model, params):
        return module.apply(params, x, t_model)

    return fn
