"""PNDM: pseudo numerical methods for diffusion models (Liu et al., 2022, arXiv:2202.09778).

Every PNDM step is DDIM's "transfer" x -> (alpha_n/alpha_c) x + alpha_n (rho_n - rho_c) e' (rho =
sigma/alpha) with a combined noise estimate e'. After a warm-up, e' is the Adams-Bashforth
combination of the estimates at past grid points: (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24.

- ``"F"`` (F-PNDM): three pseudo-RK4 warm-up steps (4 NFE each: e1 at t, e2 and e3 at the midpoint,
  e4 at the next point, e' = (e1 + 2 e2 + 2 e3 + e4)/6), then fourth-order PLMS; NFE = N + 9.
- ``"S"`` (S-PNDM): one pseudo improved-Euler step (2 NFE), then (3 e_i - e_{i-1})/2; NFE = N + 1.
- ``"PLMS"`` (iPNDM, as in DEIS): Adams-Bashforth of orders 1, 2, 3 during warm-up, then 4; NFE = N.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdiff.solvers.base import Coefficients, Layout, Solver, grid

__all__ = ["PNDM"]

_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_VARIANTS = ("F", "S", "PLMS")


@dataclasses.dataclass(frozen=True)
class PNDM(Solver):
    """PNDM sampler; ``variant`` is ``"F"``, ``"S"`` or ``"PLMS"`` (see the module docstring)."""

    variant: str = "PLMS"

    prediction = "noise"

    def __post_init__(self):
        if self.variant not in _VARIANTS:
            raise ValueError(f"Unknown `variant={self.variant!r}`; expected one of {_VARIANTS}.")

    @property
    def order(self) -> int:
        return 2 if self.variant == "S" else 4

    def _warmup(self, num_steps: int) -> tuple[int, int]:
        """(warm-up steps, evaluations per warm-up step)."""
        if self.variant == "F":
            return min(3, num_steps), 4
        if self.variant == "S":
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
        k = 1 + int(max(np.max(np.diff(starts), initial=1) * (min(self.order, num_steps) - 1), 0))
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

        def transfer(c, nxt):
            """(ratio, slope) of the DDIM step from time c to nxt (arrays of times)."""
            la_c, la_n = schedule.log_alpha(c), schedule.log_alpha(nxt)
            ls_c, ls_n = schedule.log_sigma(c), schedule.log_sigma(nxt)
            return jnp.exp(la_n - la_c), jnp.exp(ls_n) - jnp.exp(la_n + ls_c - la_c)

        ratio, slope = transfer(ts[:-1], ts[1:])
        mid = 0.5 * (ts[:-1] + ts[1:])
        ratio_mid, slope_mid = transfer(ts[:-1], mid)
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
            a_ab = jnp.zeros((steps.size, 2 + k), ratio.dtype).at[:, 1].set(1.0)  # anchor <- y (unused without warm-up)
            cols = jnp.zeros((steps.size, k), ratio.dtype)
            for j in range(self.order):
                lag = starts[steps] - starts[np.maximum(steps - j, 0)]
                w = np.array([_AB[o][j] if j < o else 0.0 for o in orders])
                onehot = (lag[:, None] == np.arange(k)[None, :]) & (w != 0)[:, None]
                cols = cols + jnp.asarray(onehot) * (jnp.asarray(w) * slope[steps])[:, None]
            b_ab = jnp.concatenate([ratio[steps][:, None], cols], axis=1)
            t_eval = jnp.concatenate([jnp.stack(t_eval), t_all[warm:]]) if warm else t_all
            a_all = jnp.concatenate([jnp.stack(a_rows), a_ab]) if warm else a_ab
            b_all = jnp.concatenate([jnp.stack(b_rows), b_ab]) if warm else b_ab
        else:
            t_eval, a_all, b_all = jnp.stack(t_eval), jnp.stack(a_rows), jnp.stack(b_rows)
        return Coefficients(t=t_eval, anchor=a_all, y=b_all, noise=jnp.zeros_like(t_eval))
