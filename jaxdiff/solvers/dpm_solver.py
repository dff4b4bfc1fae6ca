"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), orders 1-3.

Exact exponential integrators of the probability-flow ODE in lambda = log(alpha/sigma) with a
polynomial model of the prediction D(lambda) (Lu et al., 2022a, arXiv:2206.00927; 2022b,
arXiv:2211.01095). With hh = -h (data) or +h (noise), h = lambda_t - lambda_s:

    x_t = ratio x_s - scale (phi_1 D0 + phi_2 D1 + phi_3 D2),   phi_1 = expm1(hh), phi_{k+1} = phi_k/hh - 1/k!

``method="multistep"`` (Adams-type, 1 NFE per step) estimates D1 ~ h D' and D2 ~ h^2 D'' from past
evaluations; ``method="singlestep"`` (DPM-Solver-fast) groups grid intervals into blocks of
``order`` intervals whose inner grid points serve as the intermediate stages, with diffusers'
order list (with a logSNR grid this is the official DPM-Solver-fast). NFE = number of steps.

Third-order multistep: the reference implementations (official repo and diffusers) use
D2 = (D1_0 - D1_1)/(r0 + r1), which estimates h^2 D''/2 while the phi_3 term needs h^2 D'';
the method is then only second order. ``third_order="corrected"`` (default) doubles D2 and is
third order; ``"reference"`` reproduces diffusers bit for bit.

From pure noise (alpha = 0, h = +inf) the rows are the limits: the first step is x_1 = (sigma_1/sigma_0) x_0
+ alpha_1 D_0 with the data prediction (DPM-Solver's noise formulation has no finite step there, so its
first evaluation stores x0: ``Coefficients.use_x0``), multistep orders restart after it (the 1/r factors
of the infinite past step vanish), and singlestep blocks start after it (a block from lambda = -inf could
only take one first-order step over all its intervals).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.solvers.base import (
    Coefficients,
    Layout,
    Solver,
    check_lower_order_final,
    first_row_from_pure_noise,
    grid,
    lag_vectors,
    lower_order_final_active,
    pure_noise_start,
    restart_orders,
    step_orders,
    step_terms,
)

__all__ = ["DPMSolverPP", "DPMSolver"]

_METHODS = ("multistep", "singlestep")
_SOLVER_TYPES = ("midpoint", "heun")
_THIRD_ORDER = ("corrected", "reference")


def singlestep_orders(num_steps: int, order: int, lower_order_final) -> np.ndarray:
    """Stage orders per grid interval for singlestep blocks (diffusers' ``get_order_list``)."""
    block = list(range(1, order + 1))
    full, rest = divmod(num_steps, order)
    if lower_order_final_active(lower_order_final, num_steps) and order > 1:
        if rest == 0:
            # the last full block becomes [1..order-1] + [1]
            orders = block * (full - 1) + block[:-1] + [1]
        else:
            orders = block * full + block[:rest]
    else:
        orders = block * full + block[:rest]
    return np.asarray(orders[:num_steps])


@dataclasses.dataclass(frozen=True)
class DPMSolverPP(Solver):
    """DPM-Solver++ (data prediction): 2M is the default sampler of jaxdiff.

    Args:
        order: 1, 2 or 3.
        method: ``"multistep"`` or ``"singlestep"``.
        solver_type: ``"midpoint"`` or ``"heun"`` (diffusers' names; official ``dpmsolver``/``taylor``),
            how the first-derivative term is weighted at second order.
        lower_order_final: use lower orders in the last steps: True, False, or an int n meaning
            "when the grid has fewer than n steps" (diffusers 15, the default; the official code 10).
            The step into sigma = 0 is always first order.
        denoise_to_zero: one extra evaluation at the last time returning the data prediction.
        third_order: ``"corrected"`` (true third order) or ``"reference"`` (diffusers' second-order form).

    Example:
        >>> x0 = jd.sample(den, x_T, jd.timesteps(s, 10), solver=DPMSolverPP(order=2))  # doctest: +SKIP
    """

    order: int = 2
    method: str = "multistep"
    solver_type: str = "midpoint"
    lower_order_final: bool | int = 15
    denoise_to_zero: bool = False
    third_order: str = "corrected"

    prediction = "data"

    def __post_init__(self):
        _check_order(self.order, (1, 2, 3))
        for name, value, allowed in (
            ("method", self.method, _METHODS),
            ("solver_type", self.solver_type, _SOLVER_TYPES),
            ("third_order", self.third_order, _THIRD_ORDER),
        ):
            _checks.choice(name, value, allowed)
        check_lower_order_final(self.lower_order_final)
        _checks.static_bool("denoise_to_zero", self.denoise_to_zero)

    def min_steps(self) -> int:
        return self.order

    def check_final_zero(self) -> None:
        if self.denoise_to_zero:
            raise ValueError(
                f"`{type(self).__name__}(denoise_to_zero=True)` evaluates the model once more at `ts[-1]`, but the grid "
                "already ends at sigma = 0, where the last step returns the data prediction and a noise or score "
                "model is undefined. Drop `denoise_to_zero`, or end the grid at sigma > 0 (`final='sigma_min'`)."
            )

    def _orders(self, num_steps: int) -> np.ndarray:
        if self.method == "multistep":
            return step_orders(num_steps, self.order, self.lower_order_final)
        return singlestep_orders(num_steps, self.order, self.lower_order_final)

    def layout(self, num_steps: int) -> Layout:
        ends = (True,) * num_steps
        if self.denoise_to_zero:
            ends = ends[:-1] + (False, True)
        return Layout(
            num_evals=num_steps + int(self.denoise_to_zero),
            history=self.order,
            uses_anchor=self.method == "singlestep",
            step_end=ends,
        )

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        k = self.order
        p = np.arange(n)
        z0 = pure_noise_start(g)
        if self.method == "multistep":
            # from pure noise the history restarts after point 0 (the limit of the rows; see restart_orders)
            y_rows = self._multistep_rows(g, p, restart_orders(self._orders(n), g))
            anchor = jnp.zeros((n, 2 + k), y_rows.dtype)
        else:
            y_rows, anchor = self._singlestep(g, p, self._orders(n))
            if n > 1:
                # from pure noise the first interval is a block of its own: the blocks after it start at
                # finite lambda, where a block from lambda = -inf could only take a first-order step
                shifted = np.concatenate([[1], singlestep_orders(n - 1, self.order, self.lower_order_final)])
                y_b, anchor_b = self._singlestep(g, p, shifted)
                y_rows, anchor = jnp.where(z0, y_b, y_rows), jnp.where(z0, anchor_b, anchor)
        y_rows = _first_order_into_zero(g, y_rows, self.prediction, k)
        use_x0 = None
        if self.prediction == "noise":
            y_rows, use_x0 = first_row_from_pure_noise(g, y_rows, k)
        if self.method == "singlestep":
            anchor = anchor.at[-1, 0].set(jnp.where(g.sigma[-1] == 0, 0.0, anchor[-1, 0]))
            anchor = anchor.at[-1, 1].set(jnp.where(g.sigma[-1] == 0, 1.0, anchor[-1, 1]))
        t = ts[:-1]
        if self.denoise_to_zero:
            t, anchor, y_rows = _append_denoise_row(g, ts, t, anchor, y_rows, self.prediction, k)
            if use_x0 is not None:
                use_x0 = jnp.concatenate([use_x0, jnp.zeros((1,), bool)])
        return Coefficients(t=t, anchor=anchor, y=y_rows, noise=jnp.zeros_like(t), use_x0=use_x0)

    def _singlestep(self, g, p, orders):
        """Rows and anchor rows for singlestep blocks with the given stage orders (static)."""
        n, k = p.shape[0], self.order
        start = p - (orders - 1)
        y_rows = self._singlestep_rows(g, p, start, orders)
        # a block starts (anchor <- current point) where the stage order is 1
        new_block = jnp.asarray(orders == 1)
        anchor = jnp.zeros((n, 2 + k), y_rows.dtype)
        anchor = anchor.at[:, 0].set(jnp.where(new_block, 0.0, 1.0)).at[:, 1].set(jnp.where(new_block, 1.0, 0.0))
        return y_rows, anchor

    def _multistep_rows(self, g, p, orders):
        k = self.order
        terms = step_terms(g, p, p + 1, self.prediction)
        lag0 = -terms.scale_phi1
        cols = [lag0, jnp.zeros_like(lag0), jnp.zeros_like(lag0)]
        scale_phi2 = terms.scale_phi1 / terms.hh - terms.scale
        scale_phi3 = scale_phi2 / terms.hh - 0.5 * terms.scale
        h = terms.h
        h1 = jnp.where(jnp.asarray(p >= 1), g.lam[p] - g.lam[np.maximum(p - 1, 0)], h)
        h2 = jnp.where(jnp.asarray(p >= 2), g.lam[np.maximum(p - 1, 0)] - g.lam[np.maximum(p - 2, 0)], h)
        q0, q1 = h / h1, h / h2  # 1/r0, 1/r1 (0 when a past step was infinite)
        is2, is3 = jnp.asarray(orders == 2), jnp.asarray(orders == 3)
        # order 2: D1 = q0 (L0 - L1)
        c = -0.5 * terms.scale_phi1 if self.solver_type == "midpoint" else -scale_phi2
        cols[0] = cols[0] + jnp.where(is2, c * q0, 0.0)
        cols[1] = cols[1] + jnp.where(is2, -c * q0, 0.0)
        if k >= 3:
            w = q1 / (q0 + q1)
            kk = q0 * q1 / (q0 + q1) * (2.0 if self.third_order == "corrected" else 1.0)
            d1 = ((1 + w) * q0, -((1 + w) * q0 + w * q1), w * q1)
            d2 = (kk * q0, -kk * (q0 + q1), kk * q1)
            for j in range(3):
                cols[j] = cols[j] + jnp.where(is3, -scale_phi2 * d1[j] - scale_phi3 * d2[j], 0.0)
        base = terms.ratio
        return jnp.concatenate([base[:, None], lag_vectors(*cols[:k], k=k)], axis=1)

    def _singlestep_rows(self, g, p, start, orders):
        k = self.order
        terms = step_terms(g, start, p + 1, self.prediction)
        h = terms.h
        scale_phi2 = terms.scale_phi1 / terms.hh - terms.scale
        scale_phi3 = scale_phi2 / terms.hh - 0.5 * terms.scale
        is1, is2, is3 = (jnp.asarray(orders == j) for j in (1, 2, 3))
        zero = jnp.zeros_like(h)
        # stage order 1: D0 = L0
        cols = [jnp.where(is1, -terms.scale_phi1, 0.0), zero, zero]
        if k >= 2:
            # stage order 2: D0 = L1 (block start), D1 = (L0 - L1) / r0, r0 = (lam_p - lam_b)/h
            r0 = jnp.where(is2, (g.lam[p] - g.lam[start]) / h, 1.0)
            c = -0.5 * terms.scale_phi1 if self.solver_type == "midpoint" else -scale_phi2
            cols[0] = cols[0] + jnp.where(is2, c / r0, 0.0)
            cols[1] = cols[1] + jnp.where(is2, -terms.scale_phi1 - c / r0, 0.0)
        if k >= 3:
            # stage order 3: D0 = L2, D1_0 = (L1 - L2)/r1, D1_1 = (L0 - L2)/r0
            r0 = jnp.where(is3, (g.lam[p] - g.lam[start]) / h, 2.0)
            r1 = jnp.where(is3, (g.lam[np.maximum(p - 1, 0)] - g.lam[start]) / h, 1.0)
            d1_0 = (0.0, 1 / r1, -1 / r1)
            d1_1 = (1 / r0, 0.0, -1 / r0)
            if self.solver_type == "midpoint":
                extra = [-scale_phi2 * d1_1[j] for j in range(3)]
            else:
                d1 = [(r0 * d1_0[j] - r1 * d1_1[j]) / (r0 - r1) for j in range(3)]
                d2 = [2.0 * (d1_1[j] - d1_0[j]) / (r0 - r1) for j in range(3)]
                extra = [-scale_phi2 * d1[j] - scale_phi3 * d2[j] for j in range(3)]
            extra[2] = extra[2] - terms.scale_phi1
            for j in range(3):
                cols[j] = cols[j] + jnp.where(is3, extra[j], 0.0)
        return jnp.concatenate([terms.ratio[:, None], lag_vectors(*cols[:k], k=k)], axis=1)


@dataclasses.dataclass(frozen=True)
class DPMSolver(DPMSolverPP):
    """DPM-Solver (noise prediction, Lu et al., 2022a): same options as ``DPMSolverPP``.

    Not compatible with dynamic thresholding, which acts on the data prediction.
    """

    prediction = "noise"


def _check_order(order, allowed):
    _checks.static_int("order", order, allowed=allowed)


def _first_order_into_zero(g, y_rows, prediction, k):
    """The step into sigma = 0 is first order (x -> alpha_t x0), decided on the grid values."""
    last = step_terms(g, np.array([g.t.shape[0] - 2]), np.array([g.t.shape[0] - 1]), prediction)
    first = jnp.concatenate([last.ratio, -last.scale_phi1, jnp.zeros((k - 1,), y_rows.dtype)])
    return y_rows.at[-1].set(jnp.where(g.sigma[-1] == 0, first, y_rows[-1]))


def _append_denoise_row(g, ts, t, anchor, y_rows, prediction, k):
    """One more evaluation at the last time whose output is the data prediction."""
    if prediction == "data":
        row = jnp.concatenate([jnp.zeros((1,)), jnp.ones((1,)), jnp.zeros((k - 1,))])
    else:
        a, s = g.alpha[-1], g.sigma[-1]
        row = jnp.concatenate([jnp.stack([1.0 / a, -s / a]), jnp.zeros((k - 1,))])
    anchor_row = jnp.zeros((1, anchor.shape[1])).at[0, 1].set(1.0)
    return (
        jnp.concatenate([t, ts[-1:]]),
        jnp.concatenate([anchor, anchor_row.astype(anchor.dtype)]),
        jnp.concatenate([y_rows, row[None].astype(y_rows.dtype)]),
    )
