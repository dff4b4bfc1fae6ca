"""Stochastic multistep samplers of the reverse diffusion SDE, and Euler-Maruyama.

- ``DPMSolverPPSDE`` (Lu et al., 2022b, arXiv:2211.01095; diffusers ``sde-dpmsolver++``; k-diffusion
  ``dpmpp_2m_sde`` / ``dpmpp_3m_sde``): data prediction, exact in the linear part of the SDE. With h = lambda_t -
  lambda_s, h_eta = (1 + eta) h and D the polynomial extrapolation of past data predictions,

      x_t = (sigma_t/sigma_s) e^{-eta h} x_s + alpha_t [(1 - e^{-h_eta}) D0 + c_2 D1 + c_3 D2]
            + sigma_t sqrt(1 - e^{-2 eta h}) z,

  eta = 1 is the reverse SDE (diffusers), eta = 0 the probability-flow ODE (DPM-Solver++ 2M), in between
  k-diffusion's interpolation. Orders 1, 2 (``solver_type`` midpoint: c_2 = (1 - e^{-h_eta})/2, heun: c_2 =
  phi_2 = 1 + expm1(-h_eta)/h_eta) and 3 (k-diffusion's 3M SDE: c_2 D1 - phi_3 D2, phi_3 = phi_2/h_eta - 1/2,
  with its D1, D2 extrapolations).
- ``DPMSolverSDE`` (diffusers ``sde-dpmsolver``): the noise-prediction form,
  x_t = (alpha_t/alpha_s) x_s - 2 sigma_t expm1(h) (eps0 + c D1) + sigma_t sqrt(expm1(2h)) z.
- ``EulerMaruyama``: Euler-Maruyama on the reverse SDE dx = [f x - g^2 score] dt + g dW-bar, with
  f = d log(alpha)/dt and g^2 = d sigma^2/dt - 2 f sigma^2 (Song et al., 2021), for any schedule.

All need a ``key`` (or ``noise=``); results are deterministic given it. With ``noise=jd.BrownianNoise(key)``
the SDE-DPM-Solver++ noise term (eta = 1) is the exact stochastic integral of its linear part (see
``jaxdiff.brownian``); the other noise terms are the normalized increment over the step.

Measured: diffusers' third-order ``sde-dpmsolver++`` weights D2 by ((1 - e^{-2h} - 2h)/(2h)^2 - 1/2), whose
-1/2 has the wrong sign (the exact integral of 2 e^{-2(h - r)} r^2/2 gives +1/2; k-diffusion's 3M SDE has +1/2),
so it is not offered; ``DPMSolverPPSDE(order=3)`` follows k-diffusion.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.solvers.base import (
    Coefficients,
    Layout,
    Solver,
    check_lower_order_final,
    grid,
    restart_orders,
    step_orders,
    step_terms,
)

__all__ = ["DPMSolverPPSDE", "DPMSolverSDE", "EulerMaruyama"]


def _sqrt(v):
    """sqrt(max(v, 0)) with a finite derivative at 0 (steps into sigma = 0 and eta = 0 take sqrt(0))."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def _prev_h(g, s, back: int, h):
    """h of the step ``back`` steps before the one from grid index s (stand-in h where it does not exist)."""
    a, b = np.maximum(s - back, 0), np.maximum(s - back + 1, 0)
    prev = g.lam[b] - g.lam[a]
    ok = jnp.asarray(s >= back) & jnp.isfinite(prev)
    return jnp.where(ok, prev, h)


@dataclasses.dataclass(frozen=True)
class DPMSolverPPSDE(Solver):
    """SDE-DPM-Solver++ (multistep, data prediction), orders 1-3, with k-diffusion's ``eta``.

    Args:
        order: 1, 2 (diffusers ``sde-dpmsolver++``, k-diffusion ``dpmpp_2m_sde``) or 3 (k-diffusion
            ``dpmpp_3m_sde``).
        solver_type: ``"midpoint"`` or ``"heun"``, the weight of the first-derivative term; default None is
            ``"midpoint"`` at order <= 2 and ``"heun"`` (phi_2, as k-diffusion's 3M) at order 3.
        eta: 1 (default) samples the reverse SDE, 0 the probability-flow ODE, in between k-diffusion's ``eta``
            (the deterministic part decays with h (1 + eta), the noise has variance 1 - e^{-2 eta h}).
        lower_order_final: lower orders in the last steps: True, False, or an int n (only for grids of fewer than
            n steps). Default 15, diffusers' rule; k-diffusion uses False. The step into sigma = 0 is always
            first order (it is the denoised prediction).

    Example:
        >>> x0 = jd.sample(den, x_T, ts, jd.DPMSolverPPSDE(order=2), key=jax.random.key(0))  # doctest: +SKIP
    """

    order: int = 2
    solver_type: str | None = None
    eta: float = 1.0
    lower_order_final: bool | int = 15

    prediction = "data"

    def __post_init__(self):
        _checks.static_int("order", self.order, allowed=(1, 2, 3))
        if self.solver_type is not None:
            _checks.choice("solver_type", self.solver_type, ("midpoint", "heun"))
        _checks.real_number("eta", self.eta, lo=0.0,
                            hint="1 samples the reverse SDE, 0 the probability-flow ODE (a static Python float).")
        check_lower_order_final(self.lower_order_final)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    @property
    def kind(self) -> str:
        """The first-derivative weighting actually used."""
        return self.solver_type or ("heun" if self.order == 3 else "midpoint")

    def min_steps(self) -> int:
        return self.order

    def layout(self, num_steps: int) -> Layout:
        return Layout.multistep(num_steps, self.order)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        # log e^{-h} = log(sigma_t alpha_s / (alpha_t sigma_s)): -inf into sigma = 0 and from alpha = 0, never +inf
        log_e = g.log_sigma[t] + g.log_alpha[s] - g.log_sigma[s] - g.log_alpha[t]
        eta = float(self.eta)
        log_base = g.log_sigma[t] - g.log_sigma[s] + (eta * log_e if eta > 0 else 0.0)
        base = jnp.exp(log_base)
        d0 = g.alpha[t] * -jnp.expm1((1.0 + eta) * log_e)  # alpha_t (1 - e^{-h_eta})
        noise = g.sigma[t] * _sqrt(-jnp.expm1(2.0 * eta * log_e)) if eta > 0 else jnp.zeros_like(base)
        h = g.lam[t] - g.lam[s]
        finite = jnp.isfinite(h)
        h = jnp.where(finite, h, 1.0)
        orders = jnp.where(finite, restart_orders(step_orders(n, self.order, self.lower_order_final), g), 1)
        cols = [d0] + [jnp.zeros_like(d0)] * (self.order - 1)
        if self.order >= 2:
            x = (1.0 + eta) * h
            phi2 = 1.0 + jnp.expm1(-x) / x
            q0 = h / _prev_h(g, s, 1, h)  # 1/r0
            c2 = g.alpha[t] * (phi2 if self.kind == "heun" else 0.5 * -jnp.expm1(-x))
            second = orders == 2
            cols[0] = cols[0] + jnp.where(second, c2 * q0, 0.0)
            cols[1] = cols[1] - jnp.where(second, c2 * q0, 0.0)
        if self.order == 3:
            q1 = h / _prev_h(g, s, 2, h)  # 1/r1
            r0, r1 = 1.0 / q0, 1.0 / q1
            w = r0 / (r0 + r1)
            phi3 = phi2 / x - 0.5
            # d1_0 = q0 (D0 - D1), d1_1 = q1 (D1 - D2); D1 ~ d1_0 (1 + w) - w d1_1, D2 ~ (d1_0 - d1_1)/(r0 + r1)
            d10 = (q0, -q0, 0.0)
            d11 = (0.0, q1, -q1)
            third = orders == 3
            for j in range(3):
                e1 = (1.0 + w) * d10[j] - w * d11[j]
                e2 = (d10[j] - d11[j]) / (r0 + r1)
                cols[j] = cols[j] + jnp.where(third, g.alpha[t] * (phi2 * e1 - phi3 * e2), 0.0)
        y = jnp.concatenate([base[:, None], jnp.stack(cols, 1)], axis=1)
        return Coefficients(t=ts[:-1], anchor=jnp.zeros((n, 2 + self.order), y.dtype), y=y, noise=noise)


@dataclasses.dataclass(frozen=True)
class DPMSolverSDE(Solver):
    """SDE-DPM-Solver (multistep, noise prediction), orders 1-2; diffusers ``algorithm_type="sde-dpmsolver"``.

    x_t = (alpha_t/alpha_s) x_s - 2 sigma_t expm1(h) eps_0 - c D1 + sigma_t sqrt(expm1(2h)) z, with c =
    sigma_t expm1(h) (midpoint) or 2 sigma_t (expm1(h)/h - 1) (heun), D1 = (eps_0 - eps_1) h / h_prev.

    Args:
        order: 1 or 2.
        solver_type: ``"midpoint"`` or ``"heun"``.
        lower_order_final: True, False or an int n (default 15, diffusers' rule).

    Raises:
        ValueError: at trace time for a grid ending at sigma = 0 (the noise form's last step would add noise of
            standard deviation alpha_t sigma_s/alpha_s there; diffusers refuses it too) or starting at alpha = 0.

    Example:
        >>> x0 = jd.sample(den, x_T, ts, jd.DPMSolverSDE(order=2), key=jax.random.key(0))  # doctest: +SKIP
    """

    order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool | int = 15

    prediction = "noise"
    stochastic = True

    def __post_init__(self):
        _checks.static_int("order", self.order, allowed=(1, 2))
        _checks.choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_lower_order_final(self.lower_order_final)

    def check_final_zero(self) -> None:
        raise ValueError(
            "`DPMSolverSDE` (noise prediction) cannot end at sigma = 0: its last step would add noise of standard "
            "deviation alpha_t sigma_s / alpha_s. End the grid at sigma > 0 (`final='sigma_min'`) or use "
            "`DPMSolverPPSDE()`, whose data-prediction step into sigma = 0 is the denoised prediction."
        )

    def check_pure_noise_start(self) -> None:
        raise ValueError(
            "`DPMSolverSDE` (noise prediction) cannot start at pure noise (alpha(ts[0]) = 0): its step has the "
            "factor alpha_t/alpha_s. Use `DPMSolverPPSDE()` or start the grid where alpha > 0."
        )

    def min_steps(self) -> int:
        return self.order

    def layout(self, num_steps: int) -> Layout:
        return Layout.multistep(num_steps, self.order)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        st = step_terms(g, s, t, "noise")  # scale_phi1 = sigma_t expm1(h)
        noise = g.sigma[t] * _sqrt(jnp.expm1(2.0 * st.h))
        cols = [-2.0 * st.scale_phi1]
        if self.order == 2:
            orders = step_orders(n, 2, self.lower_order_final)
            q0 = st.h / _prev_h(g, s, 1, st.h)
            if self.solver_type == "midpoint":
                c = st.scale_phi1
            else:
                c = 2.0 * (st.scale_phi1 / st.h - st.scale)
            second = jnp.asarray(orders == 2) & st.finite
            cols = [cols[0] - jnp.where(second, c * q0, 0.0), jnp.where(second, c * q0, 0.0)]
        y = jnp.concatenate([st.ratio[:, None], jnp.stack(cols, 1)], axis=1)
        return Coefficients(t=ts[:-1], anchor=jnp.zeros((n, 2 + self.order), y.dtype), y=y, noise=noise)


@dataclasses.dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse-time SDE (first order in the mean, weak order 1; strong order 1 for this
    additive-noise SDE).

    Example:
        >>> x0 = jd.sample(den, x_T, ts, jd.EulerMaruyama(), key=jax.random.key(0))  # doctest: +SKIP
    """

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
