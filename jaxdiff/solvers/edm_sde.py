"""EDM's stochastic sampler with churn (Karras et al., 2022, arXiv:2206.00364, Algorithm 2).

In the EDM variables y = x/alpha, rho = sigma/alpha, each step first raises the noise level of the current point,

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= rho_i <= S_tmax else 0,   rho_hat = (1 + gamma_i) rho_i,
    y_hat = y_i + sqrt(rho_hat^2 - rho_i^2) S_noise z_i,

then takes a deterministic Euler or Heun step of dy/drho = (y - x0_hat)/rho from (y_hat, rho_hat) to rho_{i+1} (Heun's
corrector is skipped into rho = 0). k-diffusion's ``sample_euler`` / ``sample_heun`` with ``s_churn`` etc. are the
same sampler (its z_i are drawn every step, whether gamma_i > 0 or not). Here it runs in x for any schedule: the
churned point is x_hat = (alpha_hat/alpha_i) x_i + alpha_hat sqrt(rho_hat^2 - rho_i^2) S_noise z_i at the time t_hat
with rho(t_hat) = rho_hat, which must lie inside the schedule (for VP schedules S_tmax below the grid's start rho
keeps it there). With ``noise=jd.BrownianNoise(key)`` z_i is the normalized increment over the grid step: the churn
noise is not a reverse-SDE increment, so this is a documented choice, not an exact integral.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.solvers.base import Coefficients, Layout, Solver, grid

__all__ = ["EDMStochastic"]


@dataclasses.dataclass(frozen=True)
class EDMStochastic(Solver):
    """EDM's stochastic sampler (Algorithm 2) with churn, Heun (default) or Euler steps.

    Args:
        S_churn: total churn (>= 0); gamma_i = min(S_churn / num_steps, sqrt(2) - 1). 0 is the deterministic sampler.
        S_tmin, S_tmax: churn only where S_tmin <= rho_i <= S_tmax (rho = sigma/alpha, EDM's sigma).
        S_noise: standard deviation multiplier of the churn noise (EDM's 1.003 for ImageNet, 1.0 in k-diffusion).
        method: ``"heun"`` (Algorithm 2; 2 evaluations per step, 1 into sigma = 0 when ``final_euler``) or
            ``"euler"`` (k-diffusion ``sample_euler`` with churn).
        final_euler: Heun only: the last step is an Euler step (required into sigma = 0).

    Example:
        >>> ts = jd.timesteps(jd.EDM(), 18, "karras", final="zero")  # doctest: +SKIP
        >>> x0 = jd.sample(den, x_T, ts, jd.EDMStochastic(S_churn=40.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003),
        ...                key=jax.random.key(0))  # doctest: +SKIP
    """

    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float = math.inf
    S_noise: float = 1.0
    method: str = "heun"
    final_euler: bool = True

    prediction = "data"

    def __post_init__(self):
        _checks.real_number("S_churn", self.S_churn, lo=0.0, hint="EDM uses e.g. 40 (ImageNet) or 80; 0 is no churn.")
        _checks.real_number("S_tmin", self.S_tmin, lo=0.0)
        _checks.real_number("S_tmax", self.S_tmax, lo=0.0, hi=math.inf)
        if self.S_tmax < self.S_tmin:
            raise ValueError(f"`S_tmax={self.S_tmax}` is below `S_tmin={self.S_tmin}`: no step would churn. "
                             "Pass S_tmin <= S_tmax (rho = sigma/alpha bounds of the churned steps).")
        _checks.real_number("S_noise", self.S_noise, lo=0.0, hint="EDM's default is 1.0 (1.003 for ImageNet).")
        _checks.choice("method", self.method, ("heun", "euler"))
        _checks.static_bool("final_euler", self.final_euler)

    @property
    def stochastic(self) -> bool:
        return self.S_churn > 0

    @property
    def order(self) -> int:
        return 2 if self.method == "heun" else 1

    def check_pure_noise_start(self) -> None:
        raise ValueError(
            "`EDMStochastic` cannot start at pure noise (alpha(ts[0]) = 0, rho = +inf): EDM's steps are in rho. "
            "Start the grid where alpha > 0, or use `DPMSolverPPSDE()`."
        )

    def check_final_zero(self) -> None:
        if self.method == "heun" and not self.final_euler:
            raise ValueError(
                "`EDMStochastic(final_euler=False)` evaluates the model at sigma = 0 on the last step. Use "
                "`final_euler=True` (EDM's Euler step into sigma = 0) or end the grid at sigma > 0."
            )

    def layout(self, num_steps: int) -> Layout:
        if self.method == "euler":
            return Layout.multistep(num_steps, 1)
        last = int(self.final_euler)
        return Layout(num_evals=2 * num_steps - last, history=2, uses_anchor=True,
                      step_end=(False, True) * (num_steps - last) + (True,) * last)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        rho = jnp.exp(g.log_sigma - g.log_alpha)
        churn = (rho[s] >= self.S_tmin) & (rho[s] <= self.S_tmax)
        gamma = jnp.where(churn, min(self.S_churn / n, math.sqrt(2.0) - 1.0), 0.0)
        lam_hat = g.lam[s] - jnp.log1p(gamma)
        t_hat = jnp.where(gamma > 0, schedule.t_of_lambda(lam_hat), ts[:-1])
        la_h, ls_h = schedule.log_alpha(t_hat), schedule.log_sigma(t_hat)
        alpha_h, sigma_h = jnp.exp(la_h), jnp.exp(ls_h)
        rho_h = jnp.exp(ls_h - la_h)
        # x_hat = (alpha_hat/alpha_i) x_i + alpha_hat rho_i sqrt((1 + gamma)^2 - 1) S_noise z_i
        pre = jnp.stack([jnp.exp(la_h - g.log_alpha[s]),
                         self.S_noise * alpha_h * rho[s] * jnp.sqrt(gamma * (2.0 + gamma))], 1)
        # Euler from (x_hat, t_hat): x = (sigma_t/sigma_hat) x_hat + (alpha_t - sigma_t alpha_hat/sigma_hat) D
        ratio = jnp.exp(g.log_sigma[t] - ls_h)
        d_e = g.alpha[t] - ratio * alpha_h
        zeros, ones = jnp.zeros_like(ratio), jnp.ones_like(ratio)
        if self.method == "euler":
            y = jnp.stack([ratio, d_e], 1)
            return Coefficients(t=t_hat, anchor=jnp.zeros((n, 3), y.dtype), y=y, noise=zeros, pre_noise=pre)
        # Heun: x_t = (sigma_t/sigma_hat) x_hat + alpha_t dt/2 [(1/rho_t - 2/rho_hat) D_hat - D_2/rho_t], dt = rho_t -
        # rho_hat, the slopes (y - D)/rho averaged (finite: rows into rho_t = 0 are replaced by the Euler row)
        rho_t = jnp.where(rho[t] > 0, rho[t], 1.0)
        half = 0.5 * g.alpha[t] * (rho[t] - rho_h)
        a1 = jnp.stack([zeros, ones, zeros, zeros], 1)
        y1 = jnp.stack([ratio, d_e, zeros], 1)
        a2 = jnp.stack([ones, zeros, zeros, zeros], 1)
        y2 = jnp.stack([ratio, -half / rho_t, half * (1.0 / rho_t - 2.0 / rho_h)], 1)
        t_eval = jnp.stack([t_hat, ts[1:]], 1).reshape(-1)
        a = jnp.stack([a1, a2], 1).reshape(2 * n, 4)
        y = jnp.stack([y1, y2], 1).reshape(2 * n, 3)
        pre2 = jnp.stack([pre, jnp.stack([ones, zeros], 1)], 1).reshape(2 * n, 2)
        if self.final_euler:
            t_eval, a, y, pre2 = t_eval[:-1], a[:-1], y[:-1], pre2[:-1]
        span = jnp.stack([g.lam[:-1], g.lam[1:]], 1)
        span = jnp.repeat(span, 2, axis=0)[: t_eval.shape[0]]
        return Coefficients(t=t_eval, anchor=a, y=y, noise=jnp.zeros_like(t_eval), pre_noise=pre2, noise_span=span)
