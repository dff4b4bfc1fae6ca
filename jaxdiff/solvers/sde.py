"""Stochastic samplers of the reverse diffusion SDE.

- ``DPMSolverPPSDE`` (Lu et al., 2022b; diffusers ``sde-dpmsolver++``): the exact solution of the
  linear part of the reverse SDE in data prediction,
  x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z,
  with D = D0 (order 1) or D0 + D1/2 (midpoint) / the heun weight (order 2, multistep).
- ``EulerMaruyama``: Euler-Maruyama on the reverse SDE dx = [f x - g^2 score] dt + g dW-bar, with
  f = d log(alpha)/dt and g^2 = d sigma^2/dt - 2 f sigma^2 (Song et al., 2021), for any schedule.

Both need a ``key``; results are deterministic given it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.solvers.base import Coefficients, Layout, Solver, check_lower_order_final, grid, step_orders

__all__ = ["DPMSolverPPSDE", "EulerMaruyama"]


@dataclasses.dataclass(frozen=True)
class DPMSolverPPSDE(Solver):
    """SDE-DPM-Solver++ (multistep), order 1 or 2; diffusers' ``algorithm_type="sde-dpmsolver++"``.

    Args:
        order: 1 or 2.
        solver_type: ``"midpoint"`` or ``"heun"``.
        lower_order_final: True (default), False, or an int n (only for grids shorter than n steps).
    """

    order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool | int = True

    prediction = "data"
    stochastic = True

    def __post_init__(self):
        _checks.static_int("order", self.order, allowed=(1, 2))
        _checks.choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_lower_order_final(self.lower_order_final)

    def min_steps(self) -> int:
        return self.order

    def layout(self, num_steps: int) -> Layout:
        return Layout.multistep(num_steps, self.order)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        # e^{-h} = sigma_t alpha_s / (alpha_t sigma_s): 0 into sigma = 0, no infinities
        e = jnp.exp(g.log_sigma[t] + g.log_alpha[s] - g.log_sigma[s] - g.log_alpha[t])
        one_m = -jnp.expm1(2.0 * jnp.log(jnp.where(e > 0, e, 1.0))) * (e > 0) + (e == 0)  # 1 - e^{-2h}
        base = jnp.exp(g.log_sigma[t] - g.log_sigma[s]) * e
        d0 = g.alpha[t] * one_m
        noise = g.sigma[t] * jnp.sqrt(one_m)
        cols = [d0]
        if self.order == 2:
            orders = step_orders(n, 2, self.lower_order_final)
            h = g.lam[t] - g.lam[s]
            finite = jnp.isfinite(h)
            h = jnp.where(finite, h, 1.0)
            h_prev = jnp.where(jnp.asarray(s >= 1), g.lam[s] - g.lam[np.maximum(s - 1, 0)], h)
            q0 = h / h_prev  # 1 / r0
            if self.solver_type == "midpoint":
                c = 0.5 * d0
            else:
                c = g.alpha[t] * (one_m / (-2.0 * h) + 1.0)
            second = jnp.asarray(orders == 2) & finite
            cols = [d0 + jnp.where(second, c * q0, 0.0), jnp.where(second, -c * q0, 0.0)]
        y = jnp.concatenate([base[:, None], jnp.stack(cols, 1)], axis=1)
        return Coefficients(t=ts[:-1], anchor=jnp.zeros((n, 2 + self.order), y.dtype), y=y, noise=noise)


@dataclasses.dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse-time SDE (first order in the mean, weak order 1)."""

    prediction = "noise"
    stochastic = True
    order = 1

    def check_pure_noise_start(self) -> None:
        raise ValueError(
            "`EulerMaruyama` cannot start at pure noise (alpha(ts[0]) = 0): the reverse SDE's drift f x - g^2 score "
            "is infinite there (f = dlog alpha/dt = -inf). Use `DDPM()` or `DPMSolverPPSDE()`, whose exact Gaussian "
            "transitions are finite from alpha = 0, or start the grid where alpha > 0."
        )

    def layout(self, num_steps: int) -> Layout:
        return Layout.multistep(num_steps, 1)

    def coefficients(self, schedule, ts) -> Coefficients:
        s_t = ts[:-1]
        dt = ts[1:] - ts[:-1]  # negative
        f = jax.vmap(jax.grad(schedule.log_alpha))(s_t)
        d_var = jax.vmap(jax.grad(lambda u: schedule.sigma(u) ** 2))(s_t)
        sigma = schedule.sigma(s_t)
        g2 = d_var - 2.0 * f * sigma**2
        # x + [f x - g^2 score] dt, score = -eps / sigma
        y = jnp.stack([1.0 + f * dt, g2 / sigma * dt], axis=1)
        noise = jnp.sqrt(jnp.maximum(g2 * (-dt), 0.0))
        return Coefficients(t=s_t, anchor=jnp.zeros((s_t.shape[0], 3), y.dtype), y=y, noise=noise)
