"""Heun's second-order method in EDM variables (Karras et al., 2022, Algorithm 1).

With y = x / alpha and rho = sigma / alpha the probability-flow ODE reads dy/drho = eps_hat(x, t)
for every schedule (for EDM/VE, alpha = 1 and rho = sigma). Euler in these variables is DDIM
(``jaxdiff.Euler``); Heun averages the slopes at both ends:

    y' = y_i + (rho_{i+1} - rho_i) eps_i,   y_{i+1} = y_i + (rho_{i+1} - rho_i) (eps_i + eps(y', t_{i+1})) / 2.

Two evaluations per step; the last step is an Euler step when ``final_euler`` (EDM's rule for a
final sigma = 0, where the second slope is undefined): NFE = 2N - 1.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdiff.solvers.base import Coefficients, Layout, Solver, grid

__all__ = ["Heun"]


@dataclasses.dataclass(frozen=True)
class Heun(Solver):
    """EDM's Heun sampler (deterministic, churn-free).

    Args:
        final_euler: take the last step with Euler (required when the grid ends at sigma = 0).

    Example:
        >>> ts = jd.timesteps(jd.EDM(), 18, "karras", final="zero")  # doctest: +SKIP
        >>> x0 = jd.sample(den, x_T, ts, solver=Heun())               # 35 NFE  # doctest: +SKIP
    """

    final_euler: bool = True

    prediction = "noise"
    order = 2

    def layout(self, num_steps: int) -> Layout:
        m = 2 * num_steps - int(self.final_euler)
        return Layout(num_evals=m, history=2, uses_anchor=True, step_end=(False, True) * num_steps if not self.final_euler
                      else (False, True) * (num_steps - 1) + (True,))

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        ratio = jnp.exp(g.log_alpha[t] - g.log_alpha[s])
        # alpha_t (rho_t - rho_s), written with logs so alpha_s -> 0 stays finite where it can
        slope = g.sigma[t] - jnp.exp(g.log_alpha[t] + g.log_sigma[s] - g.log_alpha[s])
        zeros = jnp.zeros_like(ratio)
        ones = jnp.ones_like(ratio)
        # stage 1 (at x_i): anchor <- y; y <- Euler predictor
        a1 = jnp.stack([zeros, ones, zeros, zeros], 1)
        b1 = jnp.stack([ratio, slope, zeros], 1)
        # stage 2 (at the predictor): anchor <- Heun corrector; y <- anchor
        a2 = jnp.stack([ratio, zeros, 0.5 * slope, 0.5 * slope], 1)
        b2 = jnp.stack([ones, zeros, zeros], 1)
        t_eval = jnp.stack([ts[:-1], ts[1:]], 1).reshape(-1)
        a = jnp.stack([a1, a2], 1).reshape(2 * n, 4)
        b = jnp.stack([b1, b2], 1).reshape(2 * n, 3)
        if self.final_euler:
            t_eval, a, b = t_eval[:-1], a[:-1], b[:-1]
        return Coefficients(t=t_eval, anchor=a, y=b, noise=jnp.zeros_like(t_eval))
