"""Ancestral and singlestep stochastic samplers of k-diffusion, for every schedule.

k-diffusion writes its samplers in the EDM variables y = x/alpha, rho = sigma/alpha (alpha = 1 there); here they
run in x for any schedule (x = alpha y), with the same model evaluations, so on ``jd.EDM`` / ``jd.VE`` they are
k-diffusion's samplers step for step. The ancestral split of a step from rho_s to rho_t with ``eta``
(k-diffusion's ``get_ancestral_step``) is

    rho_up = rho_t min(1, eta sqrt(1 - e^{-2h})),   rho_down = sqrt(rho_t^2 - rho_up^2),   e^{-h} = rho_t/rho_s:

a deterministic step down to rho_down, then fresh noise of standard deviation rho_up (sigma_t up in x).

- ``EulerAncestral``: an Euler (DDIM) step to rho_down (k-diffusion ``sample_euler_ancestral``).
- ``DPMSolver2Ancestral``: DPM-Solver-2 in rho (midpoint at sqrt(rho_s rho_down)) (``sample_dpm_2_ancestral``).
- ``DPMSolverPP2SAncestral``: DPM-Solver++(2S), midpoint in lambda (``sample_dpmpp_2s_ancestral``).
- ``DPMSolverPPSDESinglestep``: k-diffusion's ``sample_dpmpp_sde`` (DPM-Solver++ stochastic, singlestep with the
  stage at lambda_s + r h, ancestral noise at the stage and at the end); diffusers' ``DPMSolverSDEScheduler``.

The singlestep samplers make two evaluations per step; the step into sigma = 0 is k-diffusion's Euler step (one
evaluation, the denoised prediction) when ``final_euler`` (default; NFE = 2N - 1). None of them can start at pure
noise (rho = +inf: their stage has no limit); start where alpha > 0. With ``noise=jd.BrownianNoise(key)`` each
noise is the normalized increment over the interval k-diffusion's Brownian tree uses (for ``dpmpp_sde``:
[lambda_s, stage] and [lambda_s, lambda_t], overlapping as in k-diffusion).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.solvers.base import Coefficients, Layout, Solver, grid

__all__ = ["EulerAncestral", "DPMSolver2Ancestral", "DPMSolverPP2SAncestral", "DPMSolverPPSDESinglestep"]


def _pure_noise_error(name: str) -> ValueError:
    return ValueError(
        f"`{name}` cannot start at pure noise (alpha(ts[0]) = 0, rho = sigma/alpha = +inf): its stage point has no "
        "limit there. Start the grid where alpha > 0 (e.g. `jd.timesteps(s, n, t_start=0.999)`), or use "
        "`DPMSolverPPSDE()` / `DDPM()`, whose steps from alpha = 0 are exact."
    )


def _split(eta: float, log_e):
    """(up, down) fractions of rho_t for the ancestral split, from log e^{-h} (-inf into sigma = 0)."""
    one_m = -jnp.expm1(2.0 * log_e)  # 1 - e^{-2h}
    up = jnp.minimum(1.0, eta * jnp.sqrt(jnp.maximum(one_m, 0.0)))
    down = jnp.sqrt(jnp.maximum(1.0 - up**2, 0.0))
    return up, down


class _Base(Solver):
    prediction = "data"
    stochastic = True

    def check_pure_noise_start(self) -> None:
        raise _pure_noise_error(type(self).__name__)

    def _check_eta(self):
        _checks.real_number("eta", self.eta, lo=0.0, hi=1.0,
                            hint="1 is k-diffusion's default ancestral step, 0 the deterministic sampler.")
        _checks.real_number("s_noise", self.s_noise, lo=0.0, hint="k-diffusion's noise multiplier, usually 1.0.")

    def _terms(self, g, s, t):
        log_e = g.log_sigma[t] + g.log_alpha[s] - g.log_sigma[s] - g.log_alpha[t]
        up, down = _split(float(self.eta), log_e)
        ratio = jnp.exp(g.log_sigma[t] - g.log_sigma[s])
        return log_e, up, down, ratio


@dataclasses.dataclass(frozen=True)
class EulerAncestral(_Base):
    """Euler ancestral sampling (k-diffusion ``sample_euler_ancestral``, diffusers ``EulerAncestralDiscrete``).

    x_t = down (sigma_t/sigma_s) x_s + alpha_t (1 - down e^{-h}) x0_hat + s_noise sigma_t up z.

    Args:
        eta: in [0, 1]; 0 is the deterministic Euler (DDIM) step.
        s_noise: noise multiplier (k-diffusion's ``s_noise``).

    Example:
        >>> x0 = jd.sample(den, x_T, ts, jd.EulerAncestral(), key=jax.random.key(0))  # doctest: +SKIP
    """

    eta: float = 1.0
    s_noise: float = 1.0

    order = 1

    def __post_init__(self):
        self._check_eta()

    def layout(self, num_steps: int) -> Layout:
        return Layout.multistep(num_steps, 1)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        log_e, up, down, ratio = self._terms(g, s, t)
        y = jnp.stack([down * ratio, g.alpha[t] * (1.0 - down * jnp.exp(log_e))], 1)
        noise = self.s_noise * g.sigma[t] * up
        return Coefficients(t=ts[:-1], anchor=jnp.zeros((n, 3), y.dtype), y=y, noise=noise)


class _TwoStage(_Base):
    """Two evaluations per step (stage, end); the last step into sigma = 0 is one Euler evaluation."""

    order = 2

    def check_final_zero(self) -> None:
        if not self.final_euler:
            raise ValueError(
                f"`{type(self).__name__}(final_euler=False)` puts a stage at sigma = 0 on the last step. Use "
                "`final_euler=True` (k-diffusion's Euler step into sigma = 0) or end the grid at sigma > 0."
            )

    def layout(self, num_steps: int) -> Layout:
        if self.final_euler:
            return Layout(num_evals=2 * num_steps - 1, history=2, uses_anchor=True,
                          step_end=(False, True) * (num_steps - 1) + (True,))
        return Layout(num_evals=2 * num_steps, history=2, uses_anchor=True, step_end=(False, True) * num_steps)

    def _rows(self, schedule, ts, lam_m, stage_ratio, stage_d0, stage_noise, end):
        """Assemble anchor/y rows: stage (eval at x_s) then end (eval at the stage point)."""
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        b0, b_lag0, b_lag1, end_noise = end
        zeros, ones = jnp.zeros_like(b0), jnp.ones_like(b0)
        a1 = jnp.stack([zeros, ones, zeros, zeros], 1)  # anchor <- x_s
        y1 = jnp.stack([stage_ratio, stage_d0, zeros], 1)
        a2 = jnp.stack([ones, zeros, zeros, zeros], 1)  # keep the anchor
        y2 = jnp.stack([b0, b_lag0, b_lag1], 1)
        t_mid = schedule.t_of_lambda(lam_m)
        t_eval = jnp.stack([ts[:-1], t_mid], 1).reshape(-1)
        a = jnp.stack([a1, a2], 1).reshape(2 * n, 4)
        y = jnp.stack([y1, y2], 1).reshape(2 * n, 3)
        noise = jnp.stack([stage_noise, end_noise], 1).reshape(-1)
        lam = g.lam
        span = jnp.stack([jnp.stack([lam[:-1], lam_m], 1), jnp.stack([lam[:-1], lam[1:]], 1)], 1).reshape(2 * n, 2)
        if self.final_euler:
            # last step: one evaluation at x_s, the first-order ancestral (Euler) step, as k-diffusion into sigma = 0
            log_e, up, down, ratio = self._terms(g, np.array([n - 1]), np.array([n]))
            last_y = jnp.concatenate([down * ratio, g.alpha[n:] * (1.0 - down * jnp.exp(log_e)), zeros[:1]])
            t_eval = t_eval[:-1]
            a = a[:-1]  # its anchor row keeps anchor <- x_s, the base of the Euler step
            y = y[:-1].at[-1].set(last_y)
            noise = noise[:-1].at[-1].set(self.s_noise * g.sigma[n] * up[0])
            span = span[:-1].at[-1].set(jnp.stack([lam[n - 1], lam[n]]))
        return Coefficients(t=t_eval, anchor=a, y=y, noise=noise, noise_span=span)


@dataclasses.dataclass(frozen=True)
class DPMSolver2Ancestral(_TwoStage):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion ``sample_dpm_2_ancestral``).

    Down to rho_down by the midpoint rule in rho with the stage at rho_m = sqrt(rho_s rho_down), then noise
    sigma_t up z. Second order in the deterministic part; two evaluations per step.

    Args:
        eta: in [0, 1] (1: k-diffusion's default).
        s_noise: noise multiplier.
        final_euler: take the last step with one Euler evaluation (required into sigma = 0).

    Example:
        >>> ts = jd.timesteps(jd.EDM(), 10, "karras", final="zero")  # doctest: +SKIP
        >>> x0 = jd.sample(den, x_T, ts, jd.DPMSolver2Ancestral(), key=jax.random.key(0))  # 19 NFE  # doctest: +SKIP
    """

    eta: float = 1.0
    s_noise: float = 1.0
    final_euler: bool = True

    def __post_init__(self):
        self._check_eta()
        _checks.static_bool("final_euler", self.final_euler)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        log_e, up, down, ratio = self._terms(g, s, t)
        # rho_down / rho_s = down e^{-h}; the stage at rho_m = rho_s sqrt(down e^{-h}): e_m = rho_m / rho_s
        safe = jnp.where(down > 0, down, 1.0)
        log_dn = jnp.where(jnp.isfinite(log_e), log_e, -1.0) + jnp.log(safe)
        e_m = jnp.exp(0.5 * log_dn)
        lam_m = g.lam[s] - 0.5 * log_dn
        sig_m = jnp.exp(schedule.log_sigma(schedule.t_of_lambda(lam_m)))
        alp_m = jnp.exp(schedule.log_alpha(schedule.t_of_lambda(lam_m)))
        stage_ratio = sig_m / g.sigma[s]
        stage_d0 = alp_m * (1.0 - e_m)
        c = (down * jnp.exp(log_e) - 1.0) / e_m  # (rho_down - rho_s) / rho_m
        end = (down * ratio, -g.alpha[t] * c, g.alpha[t] * c * (1.0 - e_m), self.s_noise * g.sigma[t] * up)
        return self._rows(schedule, ts, lam_m, stage_ratio, stage_d0, jnp.zeros_like(up), end)


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2SAncestral(_TwoStage):
    """Ancestral sampling with DPM-Solver++(2S) steps (k-diffusion ``sample_dpmpp_2s_ancestral``).

    With h' = lambda_down - lambda_s (the step to rho_down): stage x_m = (sigma_m/sigma_s) x_s + alpha_m (1 -
    e^{-h'/2}) D0 at lambda_s + h'/2, then x_t = down (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h'}) D_m + sigma_t up z.

    Args:
        eta: in [0, 1] (1: k-diffusion's default; 0: the deterministic DPM-Solver++(2S)).
        s_noise: noise multiplier.
        final_euler: take the last step with one Euler evaluation (required into sigma = 0).

    Example:
        >>> x0 = jd.sample(den, x_T, ts, jd.DPMSolverPP2SAncestral(eta=1.0), key=jax.random.key(0))  # doctest: +SKIP
    """

    eta: float = 1.0
    s_noise: float = 1.0
    final_euler: bool = True

    def __post_init__(self):
        self._check_eta()
        _checks.static_bool("final_euler", self.final_euler)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        log_e, up, down, ratio = self._terms(g, s, t)
        safe = jnp.where(down > 0, down, 1.0)
        log_dn = jnp.where(jnp.isfinite(log_e), log_e, -1.0) + jnp.log(safe)  # -h'
        lam_m = g.lam[s] - 0.5 * log_dn
        t_m = schedule.t_of_lambda(lam_m)
        stage_ratio = jnp.exp(schedule.log_sigma(t_m) - g.log_sigma[s])
        stage_d0 = jnp.exp(schedule.log_alpha(t_m)) * -jnp.expm1(0.5 * log_dn)
        end = (down * ratio, g.alpha[t] * -jnp.expm1(log_dn), jnp.zeros_like(up), self.s_noise * g.sigma[t] * up)
        return self._rows(schedule, ts, lam_m, stage_ratio, stage_d0, jnp.zeros_like(up), end)


@dataclasses.dataclass(frozen=True)
class DPMSolverPPSDESinglestep(_TwoStage):
    """DPM-Solver++ SDE, singlestep (k-diffusion ``sample_dpmpp_sde``; diffusers ``DPMSolverSDEScheduler``).

    Stage at lambda_m = lambda_s + r h: an ancestral DPM-Solver++(1) step there (split with eta over [s, m]), then
    the end: an ancestral step over [s, t] with D = (1 - 1/(2r)) D0 + 1/(2r) D_m,

        x_t = down (sigma_t/sigma_s) x_s + alpha_t (1 - down e^{-h}) D + sigma_t up z.

    Args:
        eta: in [0, 1] (1: k-diffusion's default).
        s_noise: noise multiplier.
        r: stage position in (0, 1) (k-diffusion's default 1/2).
        final_euler: take the last step with one Euler evaluation (required into sigma = 0).

    Example:
        >>> x0 = jd.sample(den, x_T, ts, jd.DPMSolverPPSDESinglestep(), noise=jd.BrownianNoise(key))  # doctest: +SKIP
    """

    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5
    final_euler: bool = True

    def __post_init__(self):
        self._check_eta()
        _checks.real_number("r", self.r, lo=0.0, hi=1.0, lo_closed=False, hi_closed=False,
                            hint="The stage sits at lambda_s + r h; k-diffusion uses 1/2.")
        _checks.static_bool("final_euler", self.final_euler)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        s, t = np.arange(n), np.arange(1, n + 1)
        r = float(self.r)
        log_e, up, down, ratio = self._terms(g, s, t)
        h = jnp.where(jnp.isfinite(log_e), -log_e, 1.0)
        lam_m = g.lam[s] + r * h
        t_m = schedule.t_of_lambda(lam_m)
        la_m, ls_m = schedule.log_alpha(t_m), schedule.log_sigma(t_m)
        up1, down1 = _split(float(self.eta), -r * h)
        stage_ratio = down1 * jnp.exp(ls_m - g.log_sigma[s])
        stage_d0 = jnp.exp(la_m) * (1.0 - down1 * jnp.exp(-r * h))
        stage_noise = self.s_noise * jnp.exp(ls_m) * up1
        fac = 1.0 / (2.0 * r)
        c = g.alpha[t] * (1.0 - down * jnp.exp(log_e))
        end = (down * ratio, c * fac, c * (1.0 - fac), self.s_noise * g.sigma[t] * up)
        return self._rows(schedule, ts, lam_m, stage_ratio, stage_d0, stage_noise, end)
