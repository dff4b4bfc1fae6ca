"""Brownian-consistent noise for the SDE samplers: one Brownian path, queried at any grid.

Which Brownian motion. Write the reverse diffusion SDE (Song et al., 2021) in the variables
z = x alpha / sigma^2 and u = alpha^2 / sigma^2 = e^{2 lambda} (the signal-to-noise ratio, increasing from 0 at pure
noise to +inf at the data). It becomes

    dz = x0_hat(x, t) du + dB(u),

with B a standard Brownian motion in the clock u (the reverse-time Wiener process W of the SDE, time-changed:
dB = (alpha / sigma^2) g dW, g^2 = d sigma^2/dt - 2 sigma^2 d log alpha/dt). This is the process ``BrownianNoise``
samples. Every jaxdiff SDE sampler draws, per model evaluation, one standard normal z_k; with ``BrownianNoise`` it is
the normalized increment z_k = (B(u_b) - B(u_a)) / sqrt(u_b - u_a) over the evaluation's interval (``noise_span``,
by default the grid step), so grids of 20 and 80 steps see the same path. For SDE-DPM-Solver++
(``DPMSolverPPSDE``, eta = 1) the noise term sigma_t sqrt(1 - e^{-2h}) z_k is then exactly the stochastic integral of
the linear part, sigma_t e^{-lambda_t} (B(u_t) - B(u_s)); for the other samplers it is the documented approximation
"the step's increment, normalized", which keeps each step's noise exactly N(0, 1) and its strong order for additive
noise.

The tree. B is simulated by bisection in lambda over ``lambda_range`` (a Brownian bridge in u at each midpoint; the
split points do not have to be dyadic in u) down to ``tol`` in lambda, the draw at each node keyed by its position
in the tree (as diffrax's ``VirtualBrownianTree``): B(u) is a pure function of ``key`` and u, and exact Brownian
motion at the resolution ``tol``. Outside the range the path continues with one bridge from B(0) = 0 below and one
free increment above.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff import _checks

__all__ = ["BrownianNoise"]


def _frac_std2(a, q, b):
    """For u = e^{2 lambda}, a <= q <= b: (u_q - u_a)/(u_b - u_a) and the bridge variance / u_a, written with expm1."""
    num = jnp.expm1(2.0 * (q - a))
    den = jnp.expm1(2.0 * (b - a))
    den = jnp.where(den > 0, den, 1.0)
    frac = num / den
    # (u_q - u_a)(u_b - u_q)/(u_b - u_a) = u_a expm1(2(q-a)) e^{2(q-a)} expm1(2(b-q)) / expm1(2(b-a))
    var = frac * jnp.exp(2.0 * (q - a)) * jnp.expm1(2.0 * (b - q))  # in this order: no overflow in float32
    return frac, jnp.maximum(var, 0.0)


class BrownianNoise(struct.PyTreeNode):
    """One Brownian path B(u) in the signal-to-noise clock u = alpha^2/sigma^2, for ``jaxdiff.sample(..., noise=)``.

    See the module docstring for the SDE it drives (dz = x0_hat du + dB, z = x alpha / sigma^2). The same ``key``
    gives the same path at every grid: a sample at 20 steps and one at 80 steps converge to the same strong
    solution.

    Args:
        key: a PRNG key (``jax.random.key``); the path is a pure function of it.
        tol: bisection tolerance in lambda (half log-SNR); the path is exact Brownian motion on the dyadic points of
            ``lambda_range`` finer than ``tol``. Static; depth = ceil(log2(range / tol)) levels per query.
        lambda_range: (lo, hi) of the tree in lambda (static); queries outside it are still valid (see above).

    Example:
        >>> noise = jd.BrownianNoise(jax.random.key(0))  # doctest: +SKIP
        >>> x20 = jd.sample(den, x_T, jd.timesteps(s, 20), jd.DPMSolverPPSDE(), noise=noise)  # doctest: +SKIP
        >>> x80 = jd.sample(den, x_T, jd.timesteps(s, 80), jd.DPMSolverPPSDE(), noise=noise)  # same path
    """

    key: jax.Array
    tol: float = struct.field(pytree_node=False, default=1e-6)
    lambda_range: tuple = struct.field(pytree_node=False, default=(-20.0, 20.0))

    def __post_init__(self):
        _checks.prng_key("key", self.key)
        _checks.real_number("tol", self.tol, lo=0.0, lo_closed=False,
                            hint="It is the bisection tolerance in lambda (half log-SNR), e.g. 1e-6.")
        lr = self.lambda_range
        if not (isinstance(lr, tuple) and len(lr) == 2 and all(isinstance(v, (int, float)) for v in lr)
                and math.isfinite(lr[0]) and math.isfinite(lr[1]) and lr[0] < lr[1]):
            raise ValueError(_checks.message("lambda_range", lr, "a tuple (lo, hi) of finite Python floats, lo < hi",
                                             "The default (-20.0, 20.0) covers every usual schedule."))

    @property
    def depth(self) -> int:
        lo, hi = self.lambda_range
        return max(1, math.ceil(math.log2((hi - lo) / self.tol)))

    def path(self, lam, shape, dtype=jnp.float32):
        """B(u) at u = e^{2 lam} for a scalar ``lam`` (-inf gives B(0) = 0; +inf is not a point of the path)."""
        lo, hi = (jnp.asarray(v, dtype) for v in self.lambda_range)
        lam = jnp.asarray(lam, dtype)
        k = self.key
        normal = lambda i, key: jax.random.normal(jax.random.fold_in(key, i), shape, dtype)  # noqa: E731
        u_lo = jnp.exp(2.0 * lo)
        w_lo = jnp.sqrt(u_lo) * normal(0, k)
        w_hi = w_lo + jnp.sqrt(jnp.exp(2.0 * hi) - u_lo) * normal(1, k)

        def level(_, c):
            a, b, wa, wb, key = c
            m = 0.5 * (a + b)
            frac, var = _frac_std2(a, m, b)
            wm = wa + frac * (wb - wa) + jnp.exp(a) * jnp.sqrt(var) * normal(0, key)
            left = lam <= m
            return (jnp.where(left, a, m), jnp.where(left, m, b), jnp.where(left, wa, wm), jnp.where(left, wm, wb),
                    jnp.where(left, jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)))

        lam_in = jnp.clip(lam, lo, hi)
        a, b, wa, wb, key = jax.lax.fori_loop(0, self.depth, level, (lo, hi, w_lo, w_hi, jax.random.fold_in(k, 4)))
        frac, var = _frac_std2(a, lam_in, b)
        inside = wa + frac * (wb - wa) + jnp.exp(a) * jnp.sqrt(var) * normal(0, key)
        # below the range: the bridge from B(0) = 0 to B(u_lo); above: a free increment from B(u_hi)
        lam_b = jnp.minimum(lam, lo)
        u = jnp.exp(2.0 * lam_b)
        below = (u / u_lo) * w_lo + jnp.sqrt(jnp.maximum(u * (u_lo - u) / u_lo, 0.0)) * normal(2, k)
        lam_a = jnp.where(jnp.isfinite(lam), jnp.maximum(lam, hi), hi)
        above = w_hi + jnp.sqrt(jnp.exp(2.0 * hi) * jnp.expm1(2.0 * (lam_a - hi))) * normal(3, k)
        return jnp.where(lam < lo, below, jnp.where(lam > hi, above, inside))

    def increment(self, lam_a, lam_b, shape, dtype=jnp.float32):
        """The normalized increment (B(u_b) - B(u_a)) / sqrt(u_b - u_a), a standard normal of ``shape``.

        Zero where the interval is empty or reaches u = +inf (sigma = 0), where every sampler's noise
        coefficient is zero.
        """
        lam_a, lam_b = jnp.asarray(lam_a, dtype), jnp.asarray(lam_b, dtype)
        ok = jnp.isfinite(lam_b) & (lam_b > lam_a)
        a = jnp.where(ok, lam_a, -1.0)
        b = jnp.where(ok, lam_b, 0.0)
        dw = self.path(b, shape, dtype) - self.path(a, shape, dtype)
        # u_b - u_a = e^{2b} (1 - e^{2(a - b)}); a = -inf gives e^{2b}
        du = jnp.exp(2.0 * b) * -jnp.expm1(2.0 * (a - b))
        return jnp.where(ok, dw / jnp.sqrt(jnp.where(ok, du, 1.0)), 0.0)
