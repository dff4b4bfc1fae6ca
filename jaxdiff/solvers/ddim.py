"""DDIM (Song et al., 2021, arXiv:2010.02502) and DDPM ancestral sampling as its eta = 1 case.

x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps + c z,  c = eta sigma_t sqrt(1 - e^{-2h}),
with x0, eps the model's predictions at (x_s, s). eta = 0 is the deterministic DDIM, identical to
first-order DPM-Solver(++); eta = 1 is DDPM's ancestral step with the posterior variance
beta~_t (diffusers ``DDPMScheduler``, ``variance_type="fixed_small"``), written for any schedule.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.solvers.base import Coefficients, Layout, Solver, grid

__all__ = ["DDIM", "DDPM", "Euler"]


def _sqrt(v):
    """sqrt(max(v, 0)) with a zero (not infinite) derivative at 0: the first step from alpha = 0 with eta = 1
    and the step into sigma = 0 both take sqrt(0)."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class DDIM(Solver):
    """DDIM with stochasticity ``eta`` in [0, 1] (0: deterministic probability-flow step).

    Example:
        >>> x0 = jd.sample(den, x_T, ts, solver=DDIM())  # doctest: +SKIP
    """

    eta: float = 0.0

    prediction = "data"
    order = 1

    def __post_init__(self):
        _checks.real_number("eta", self.eta, lo=0.0, hi=1.0,
                            hint="0 is the deterministic DDIM, 1 DDPM's ancestral step (static: a Python float).")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def layout(self, num_steps: int) -> Layout:
        return Layout.multistep(num_steps, 1)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        s, t = np.arange(ts.shape[0] - 1), np.arange(1, ts.shape[0])
        # e = e^{-h} = sigma_t alpha_s / (alpha_t sigma_s), written so that sigma_t = 0 or alpha_s = 0 give 0
        e = jnp.exp(g.log_sigma[t] + g.log_alpha[s] - g.log_sigma[s] - g.log_alpha[t])
        one_m = jnp.where(e > 0, -jnp.expm1(2.0 * jnp.log(jnp.where(e > 0, e, 1.0))), 1.0)  # 1 - e^2, no cancellation
        noise = self.eta * g.sigma[t] * _sqrt(one_m)
        # sqrt(sigma_t^2 - noise^2) = sigma_t sqrt(1 - eta^2 + eta^2 e^2): no difference of nearly equal squares
        eps_coef = g.sigma[t] * _sqrt((1.0 - self.eta**2) + self.eta**2 * e**2)  # multiplies eps = (x - alpha_s x0)/sigma_s
        ratio = eps_coef / g.sigma[s]
        y = jnp.stack([ratio, g.alpha[t] - g.alpha[s] * ratio], axis=1)
        anchor = jnp.zeros((s.shape[0], 3), y.dtype)
        return Coefficients(t=ts[:-1], anchor=anchor, y=y, noise=noise)


@dataclasses.dataclass(frozen=True)
class DDPM(DDIM):
    """DDPM ancestral sampling (Ho et al., 2020): ``DDIM(eta=1)``."""

    eta: float = 1.0


@dataclasses.dataclass(frozen=True)
class Euler(DDIM):
    """Euler's method on dy/drho = eps_hat with y = x/alpha, rho = sigma/alpha (EDM's Euler sampler).

    In these variables Euler's step is exactly deterministic DDIM, for every schedule.
    """

    eta: float = 0.0
