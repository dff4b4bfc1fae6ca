"""PNDM: pseudo numerical methods for diffusion models (Liu et al., 2022, arXiv:2202.09778).

Every PNDM step is DDIM's "transfer" x -> (alpha_n/alpha_c) x + alpha_n (rho_n - rho_c) e' (rho =
sigma/alpha) with a combined noise estimate e'. After a warm-up, e' is the Adams-Bashforth
combination of the estimates at past grid points: (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24.

- ``"F"`` (F-PNDM): three pseudo-RK4 warm-up steps (4 NFE each: e1 at t, e2 and e3 at the midpoint,
  e4 at the next point, e' = (e1 + 2 e2 + 2 e3 + e4)/6), then fourth-order PLMS; NFE = N + 9.
- ``"S"`` (S-PNDM): one pseudo improved-Euler step (2 NFE), then (3 e_i - e_{i-1})/2; NFE = N + 1.
- ``"PLMS"`` (iPNDM, as in DEIS): Adams-Bashforth of orders 1, 2, 3 during warm-up, then 4; NFE = N.
- ``"PLMS-diffusers"`` (the PLMS sampler of Stable Diffusion: CompVis/latent-diffusion's ``PLMSSampler``,
  diffusers' ``PNDMScheduler(skip_prk_steps=True)``): one pseudo improved-Euler step (2 NFE, e' = (e1 + e2)/2
  with e2 at the Euler predictor; e2 is not kept), then Adams-Bashforth of orders 2, 3, 4 on the estimates at
  the grid points; NFE = N + 1.

v prediction: every estimate here is the model's eps at the point where it was evaluated, converted with that
point's alpha and sigma. diffusers' ``PNDMScheduler`` converts v to eps inside its transfer, after combining the
estimates, with the alpha of the step's start; on the improved-Euler start it converts the predictor's v with the
alpha of the previous grid point, so its v-prediction PLMS does not converge to the probability-flow solution
(measured on Gaussian data: error 0.37 against the exact solution where jaxdiff's is 0.027, and jaxdiff's v run
equals its eps run to rounding). jaxdiff keeps the exact conversion, so v and eps models give the same sample.

From pure noise (alpha = 0, rho = +inf) the transfer has no limit in eps. The first step then transfers
with the data prediction instead, x -> (sigma_n/sigma_c) x + (alpha_n - alpha_c sigma_n/sigma_c) x0', the
same stages and weights on x0 estimates (for the pseudo-RK warm-ups: their scheme in u = x/sigma and
r = alpha/sigma), and the Adams-Bashforth history restarts after it (its orders count from step 1).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.solvers.base import Coefficients, Layout, Solver, grid, pure_noise_start

__all__ = ["PNDM"]

_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_VARIANTS = ("F", "S", "PLMS", "PLMS-diffusers")


@dataclasses.dataclass(frozen=True)
class PNDM(Solver):
    """PNDM sampler; ``variant`` is ``"F"``, ``"S"``, ``"PLMS"`` or ``"PLMS-diffusers"`` (see the module docstring).

    Grids need at least 4 steps for ``"F"`` and 2 for ``"S"`` (the warm-up plus one Adams-Bashforth step).
    ``"PLMS-diffusers"`` on diffusers' ``PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=True)`` grid is
    ``jd.timesteps(s, n, "leading_ddim", final="zero", steps_offset=...)``; with ``set_alpha_to_one=False`` and
    ``steps_offset=0`` diffusers ends with a zero-length (identity) step, see ``jaxdiff.timesteps``.
    The pseudo-RK warm-up is inaccurate on coarse grids that start near alpha = 0 (its eps transfers
    multiply stage differences by alpha_n/alpha_c): prefer ``"PLMS"`` below about 10 steps.

    Example:
        >>> PNDM("PLMS-diffusers").nfe(50)  # Stable Diffusion's PLMS
        51
    """

    variant: str = "PLMS"

    prediction = "noise"

    def __post_init__(self):
        _checks.choice("variant", self.variant, _VARIANTS)

    @property
    def order(self) -> int:
        return 2 if self.variant == "S" else 4

    def min_steps(self) -> int:
        # F-PNDM is three pseudo-RK4 warm-up steps then Adams-Bashforth, S-PNDM one pseudo improved-Euler step
        # then AB2: shorter grids are only the warm-up, whose eps transfers amplify the stage mismatch by
        # alpha_n/alpha_c (measured 1e3 off on 2 logSNR steps of VPLinear, where DDIM is 1.9 off)
        return {"F": 4, "S": 2, "PLMS": 1, "PLMS-diffusers": 1}[self.variant]

    def _warmup(self, num_steps: int) -> tuple[int, int]:
        """(warm-up steps, evaluations per warm-up step)."""
        if self.variant == "F":
            return min(3, num_steps), 4
        if self.variant in ("S", "PLMS-diffusers"):
            return min(1, num_steps), 2
        return 0, 1

    def _eval_index(self, num_steps: int) -> np.ndarray:
        """Index of the evaluation at the start of each grid step."""
        warm, per = self._warmup(num_steps)
        return np.concatenate([np.arange(warm) * per, warm * per + np.arange(num_steps - warm)])

    def layout(self, num_steps: int) -> Layout:
        warm, per = self._warmup(num_steps)
        m = warm * per + num_steps - warm
        starts = self._eval_index(num_steps)
        # the oldest estimate an Adams-Bashforth step of this order reaches back to
        back = [starts[i] - starts[max(i - self.order + 1, 0)] for i in range(warm, num_steps)]
        k = 1 + int(max(back, default=0))
        k = max(k, per if warm else 1)  # a pseudo-RK warm-up step combines its own `per` evaluations
        ends = np.zeros(m, bool)
        ends[np.concatenate([starts[1:] - 1, [m - 1]])] = True
        return Layout(num_evals=m, history=k, uses_anchor=warm > 0, step_end=tuple(bool(e) for e in ends))

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        lay = self.layout(n)
        k = lay.history
        warm, per = self._warmup(n)
        starts = self._eval_index(n)

        z0 = pure_noise_start(g)

        def transfer(c, nxt):
            """(ratio, slope) of the DDIM step from time c to nxt (arrays of times), in eps."""
            la_c, la_n = schedule.log_alpha(c), schedule.log_alpha(nxt)
            ls_c, ls_n = schedule.log_sigma(c), schedule.log_sigma(nxt)
            la_c = jnp.where(jnp.isfinite(la_c), la_c, 0.0)  # alpha = 0: the data transfer below is used
            return jnp.exp(la_n - la_c), jnp.exp(ls_n) - jnp.exp(la_n + ls_c - la_c)

        def transfer_x0(c, nxt):
            """(ratio, slope) of the same step in x0: finite from alpha = 0 (the first step from pure noise)."""
            la_c, la_n = schedule.log_alpha(c), schedule.log_alpha(nxt)
            ls_c, ls_n = schedule.log_sigma(c), schedule.log_sigma(nxt)
            return jnp.exp(ls_n - ls_c), jnp.exp(la_n) - jnp.exp(ls_n + la_c - ls_c)

        def first_step(eps_form, x0_form):
            """Row values with step 0 transferred in x0 when the grid starts at alpha = 0."""
            return tuple(jnp.where(jnp.asarray(np.arange(n) == 0) & z0, b, a) for a, b in zip(eps_form, x0_form))

        mid = 0.5 * (ts[:-1] + ts[1:])
        ratio, slope = first_step(transfer(ts[:-1], ts[1:]), transfer_x0(ts[:-1], ts[1:]))
        ratio_mid, slope_mid = first_step(transfer(ts[:-1], mid), transfer_x0(ts[:-1], mid))
        t_eval, a_rows, b_rows = [], [], []
        zero = jnp.zeros((), ratio.dtype)

        one = jnp.ones((), ratio.dtype)

        def row(lead, lags):
            """[lead..., D lag 0..k-1] with lag coefficients from a {lag: value} dict."""
            hist = [zero] * k
            for lag, c in lags.items():
                hist[lag] = c
            return jnp.stack(list(lead) + hist)

        for i in range(warm):  # pseudo Runge-Kutta warm-up: anchor = x_i during the stages
            keep, take_y = row((one, zero), {}), row((zero, one), {})
            done = row((one,), {})  # y <- anchor
            if self.variant == "F":
                rk4 = {0: slope[i] / 6, 1: slope[i] / 3, 2: slope[i] / 3, 3: slope[i] / 6}
                stages = [
                    (ts[i], take_y, row((ratio_mid[i],), {0: slope_mid[i]})),
                    (mid[i], keep, row((ratio_mid[i],), {0: slope_mid[i]})),
                    (mid[i], keep, row((ratio[i],), {0: slope[i]})),
                    (ts[i + 1], row((ratio[i], zero), rk4), done),
                ]
            else:
                stages = [
                    (ts[i], take_y, row((ratio[i],), {0: slope[i]})),
                    (ts[i + 1], row((ratio[i], zero), {0: slope[i] / 2, 1: slope[i] / 2}), done),
                ]
            for t_e, a, b in stages:
                t_eval.append(t_e)
                a_rows.append(a)
                b_rows.append(b)
        t_all = ts[:-1]
        if warm < n:
            steps = np.arange(warm, n)
            orders = np.minimum(self.order, steps + 1)
            # from pure noise the Adams-Bashforth history restarts after step 0 (which holds x0)
            orders = jnp.where(z0, jnp.minimum(orders, np.maximum(steps, 1)), orders)
            a_ab = jnp.zeros((steps.size, 2 + k), ratio.dtype).at[:, 1].set(1.0)  # anchor <- y (unused without warm-up)
            cols = jnp.zeros((steps.size, k), ratio.dtype)
            table = jnp.asarray([[_AB[o][j] if j < o else 0.0 for j in range(4)] for o in range(1, 5)], ratio.dtype)
            for j in range(self.order):
                lag = starts[steps] - starts[np.maximum(steps - j, 0)]
                w = table[orders - 1, j]
                onehot = jnp.asarray(lag[:, None] == np.arange(k)[None, :]) & (w != 0)[:, None]
                cols = cols + onehot * (w * slope[steps])[:, None]
            b_ab = jnp.concatenate([ratio[steps][:, None], cols], axis=1)
            t_eval = jnp.concatenate([jnp.stack(t_eval), t_all[warm:]]) if warm else t_all
            a_all = jnp.concatenate([jnp.stack(a_rows), a_ab]) if warm else a_ab
            b_all = jnp.concatenate([jnp.stack(b_rows), b_ab]) if warm else b_ab
        else:
            t_eval, a_all, b_all = jnp.stack(t_eval), jnp.stack(a_rows), jnp.stack(b_rows)
        use_x0 = jnp.zeros((lay.num_evals,), bool).at[: max(per, 1) if warm else 1].set(z0)
        return Coefficients(t=t_eval, anchor=a_all, y=b_all, noise=jnp.zeros_like(t_eval), use_x0=use_x0)
