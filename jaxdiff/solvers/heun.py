"""Heun's second-order method in EDM variables (Karras et al., 2022, Algorithm 1).

With y = x / alpha and rho = sigma / alpha the probability-flow ODE reads dy/drho = eps_hat(x, t)
for every schedule (for EDM/VE, alpha = 1 and rho = sigma). Euler in these variables is DDIM
(``jaxdiff.Euler``); Heun averages the slopes at both ends:

    y' = y_i + (rho_{i+1} - rho_i) eps_i,   y_{i+1} = y_i + (rho_{i+1} - rho_i) (eps_i + eps(y', t_{i+1})) / 2.

Two evaluations per step; the last step is an Euler step when ``final_euler`` (EDM's rule for a
final sigma = 0, where the second slope is undefined): NFE = 2N - 1.

From pure noise (alpha = 0, rho = +inf) the first step has no limit in (y, rho); it is Heun's method in
the data variables u = x/sigma, r = alpha/sigma = 1/rho instead (du/dr = x0_hat, an interval [0, r_1]):
the Euler predictor is the data step x' = (sigma_1/sigma_0) x_0 + alpha_1 x0_hat(x_0), the corrector the
trapezoid x_1 = (sigma_1/sigma_0) x_0 + alpha_1 (x0_hat(x_0) + x0_hat(x', t_1)) / 2. Same NFE.

``form="flow"`` is Heun's method on the velocity in the schedule's own (x, t) instead, as diffusers'
``FlowMatchHeunDiscreteScheduler`` does for flows (on ``RectifiedFlow``, t = sigma and the velocity
dx/dt = eps - x0 is what a flow model predicts):

    v(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0_hat,
    x' = x_i + dt v(x_i, t_i),   x_{i+1} = x_i + dt (v(x_i, t_i) + v(x', t_{i+1})) / 2,   dt = t_{i+1} - t_i,

with alpha', sigma' from the schedule (``jax.jvp``). It is regular at alpha = 0, so it starts at t = 1 with no
special first step (the eps form above takes the data-variable limit there). Both forms are second order;
which is more accurate depends on the problem (measured from t = 1 on ``RectifiedFlow``, Gaussian data, uniform
grid of 8/16/32 steps: flow form 5.3e-2/1.3e-2/3.0e-3, eps form 3.5e-2/1.0e-2/2.7e-3; the parity study behind
issue 13 saw the flow form ahead on its data). Use it with schedules whose
alpha and sigma are differentiable on the grid (``RectifiedFlow``, ``VPLinear``, ``VPCosine``, ``EDM``); it needs
``final_euler`` into sigma = 0, where sigma'/sigma is infinite.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.solvers.base import Coefficients, Layout, Solver, data_step, grid, pure_noise_start

__all__ = ["Heun"]


@dataclasses.dataclass(frozen=True)
class Heun(Solver):
    """EDM's Heun sampler (deterministic, churn-free).

    Args:
        final_euler: take the last step with Euler (required when the grid ends at sigma = 0).
        form: ``"edm"`` (default; Karras et al.'s Heun on dy/drho = eps_hat) or ``"flow"`` (Heun on the velocity
            dx/dt in the schedule's time, diffusers' ``FlowMatchHeunDiscreteScheduler``); see the module docstring.

    Example:
        >>> ts = jd.timesteps(jd.EDM(), 18, "karras", final="zero")  # doctest: +SKIP
        >>> x0 = jd.sample(den, x_T, ts, solver=Heun())               # 35 NFE  # doctest: +SKIP
        >>> ts = jd.timesteps(jd.RectifiedFlow(), 28, "flow", shift=3.0)  # doctest: +SKIP
        >>> x0 = jd.sample(flow_den, x_T, ts, solver=Heun(form="flow"))  # from t = 1  # doctest: +SKIP
    """

    final_euler: bool = True
    form: str = "edm"

    order = 2

    def __post_init__(self):
        _checks.static_bool("final_euler", self.final_euler)
        _checks.choice("form", self.form, ("edm", "flow"),
                       hint="'edm' averages eps in (x/alpha, sigma/alpha); 'flow' averages the velocity in (x, t).")

    @property
    def prediction(self) -> str:
        # the flow form combines x0 predictions (velocity = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0)
        return "data" if self.form == "flow" else "noise"

    def check_final_zero(self) -> None:
        if not self.final_euler:
            raise ValueError(
                "`Heun(final_euler=False)` evaluates the model at the last grid point, but `ts[-1]` is sigma = 0, "
                "where the noise prediction is undefined. Use `Heun()` (a final Euler step, EDM's rule) or end the "
                "grid at sigma > 0 (`final='sigma_min'`)."
            )

    def layout(self, num_steps: int) -> Layout:
        m = 2 * num_steps - int(self.final_euler)
        return Layout(num_evals=m, history=2, uses_anchor=True, step_end=(False, True) * num_steps if not self.final_euler
                      else (False, True) * (num_steps - 1) + (True,))

    def coefficients(self, schedule, ts) -> Coefficients:
        if self.form == "flow":
            return self._flow_coefficients(schedule, ts)
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        z0 = pure_noise_start(g)
        first = jnp.asarray(s == 0) & z0
        finite_s = jnp.isfinite(g.log_alpha[s])
        la_s = jnp.where(finite_s, g.log_alpha[s], 0.0)  # stand-in at alpha = 0, where the data step is used
        ratio = jnp.exp(g.log_alpha[t] - la_s)
        # alpha_t (rho_t - rho_s), written with logs so alpha_s -> 0 stays finite where it can
        slope = g.sigma[t] - jnp.exp(g.log_alpha[t] + g.log_sigma[s] - la_s)
        # the step from alpha = 0: the same two stages in (u, r) with x0 (see the module docstring)
        ratio_d, slope_d = data_step(g, 0, 1)
        ratio, slope = jnp.where(first, ratio_d, ratio), jnp.where(first, slope_d, slope)
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
        use_x0 = jnp.zeros((2 * n,), bool).at[:2].set(z0)
        if self.final_euler:
            t_eval, a, b, use_x0 = t_eval[:-1], a[:-1], b[:-1], use_x0[:-1]
        return Coefficients(t=t_eval, anchor=a, y=b, noise=jnp.zeros_like(t_eval), use_x0=use_x0)

    def _flow_coefficients(self, schedule, ts) -> Coefficients:
        n = ts.shape[0] - 1
        ones = jnp.ones_like(ts)
        alpha, d_alpha = jax.jvp(schedule.alpha, (ts,), (ones,))
        sigma, d_sigma = jax.jvp(schedule.sigma, (ts,), (ones,))
        # v = r x + c x0_hat; r = sigma'/sigma is only used at points with sigma > 0 (final_euler at sigma = 0)
        pos = sigma > 0
        r = jnp.where(pos, d_sigma / jnp.where(pos, sigma, 1.0), 0.0)
        c = d_alpha - alpha * r
        dt = ts[1:] - ts[:-1]
        r0, c0, r1, c1 = r[:-1], c[:-1], r[1:], c[1:]
        zeros = jnp.zeros_like(dt)
        ones_n = jnp.ones_like(dt)
        # stage 1 (at x_i): anchor <- y; y <- Euler predictor x_i + dt v_i
        a1 = jnp.stack([zeros, ones_n, zeros, zeros], 1)
        b1 = jnp.stack([1.0 + dt * r0, dt * c0, zeros], 1)
        # stage 2 (at the predictor x'): anchor <- x_i + dt (v_i + v(x')) / 2; y <- anchor
        a2 = jnp.stack([1.0 + 0.5 * dt * r0, 0.5 * dt * r1, 0.5 * dt * c1, 0.5 * dt * c0], 1)
        b2 = jnp.stack([ones_n, zeros, zeros], 1)
        t_eval = jnp.stack([ts[:-1], ts[1:]], 1).reshape(-1)
        a = jnp.stack([a1, a2], 1).reshape(2 * n, 4)
        b = jnp.stack([b1, b2], 1).reshape(2 * n, 3)
        if self.final_euler:
            t_eval, a, b = t_eval[:-1], a[:-1], b[:-1]
        return Coefficients(t=t_eval, anchor=a, y=b, noise=jnp.zeros_like(t_eval))
