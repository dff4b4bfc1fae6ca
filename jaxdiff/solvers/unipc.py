"""UniPC: unified predictor-corrector (Zhao et al., 2023, arXiv:2302.04867).

UniP-p is a multistep exponential integrator of order p; UniC reuses the model evaluation at
the predicted point x_t (needed for the next step anyway) to correct x_t, raising the order by
one at no extra NFE. With hh = -h (data) or +h (noise), B(h) = hh (``"bh1"``) or expm1(hh)
(``"bh2"``), r_k = (lambda_{s_k} - lambda_s)/h and D1_k = (D_k - D_s)/r_k:

    x_t = ratio x_s - scale phi_1 D_s - scale B(h) sum_k rho_k D1_k,

with rho solving the Vandermonde system R rho = b, R_ik = r_k^(i-1), b_i = i! h_phi_(i+1)(hh) / B(h)
(the paper's Eq. 8 / the reference's h_phi recursion); the order-2 predictor uses rho = 1/2 and
the order-1 corrector rho = 1/2 exactly, as in the reference code and diffusers.

The history holds evaluations at *predicted* points, as in the reference. The step into
sigma = 0 is first order without corrector, which is why diffusers' bh1 returns NaN there and
this implementation does not.

From pure noise (alpha = 0, h = +inf) the rows are the limits: the predictor is the data step
x_1 = (sigma_1/sigma_0) x_0 + alpha_1 D_0, the bh2 corrector (B(h) -> -1, rho = 1/2) becomes
x_1 = (sigma_1/sigma_0) x_0 + alpha_1 (D_0 + D_1)/2, the trapezoid in r = e^lambda (second order), and
later steps drop the infinite node (their r would be -inf). bh1's corrector (B(h) = h) and the noise
formulation's (B(h) = e^h - 1) have no finite limit: that one step is left uncorrected.
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
    restart_orders,
    step_orders,
    step_terms,
)

__all__ = ["UniPC"]

_VARIANTS = ("bh1", "bh2")


def _step_indices(name: str, value) -> tuple[int, ...]:
    """A tuple of step indices (Python ints >= 0), from any iterable of them."""
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(_checks.message(name, value, "a tuple of step indices (ints)", "E.g. `(0, 1)`.")) from None
    for i in items:
        _checks.static_int(name, i, minimum=0, hint=f"`{name}` lists step indices, e.g. `(0, 1)`.")
    return tuple(int(i) for i in items)


def _rhos(r_cols, b_vals, order: int, corrector: bool):
    """Solve R rho = b row-wise for a fixed order (R is at most 3x3), with the reference's special cases."""
    if corrector and order == 1:
        return [0.5 * jnp.ones_like(b_vals[0])]
    if not corrector and order == 2:
        return [0.5 * jnp.ones_like(b_vals[0])]
    size = order if corrector else order - 1
    if size == 0:
        return []
    # R[i][k] = r_k^i for i, k < size; columns are the r values (predictor: past points only).
    mat = jnp.stack([jnp.stack([r**i for r in r_cols[:size]], axis=-1) for i in range(size)], axis=-2)
    rhs = jnp.stack(b_vals[:size], axis=-1)
    sol = jnp.linalg.solve(mat, rhs[..., None])[..., 0]
    return [sol[..., j] for j in range(size)]


@dataclasses.dataclass(frozen=True)
class UniPC(Solver):
    """UniPC with UniC corrector; ``order`` is the predictor order (corrected order is order + 1).

    Args:
        order: predictor order 1, 2 or 3.
        variant: ``"bh2"`` (B(h) = expm1(hh), diffusers' default) or ``"bh1"`` (B(h) = hh).
        prediction: ``"data"`` (x0, default) or ``"noise"`` (eps) formulation.
        lower_order_final: True (default; ungated as in the UniPC code and diffusers), False, or an
            int n (only when the grid has fewer than n steps).
        disable_corrector: step indices whose corrector is skipped (diffusers' ``disable_corrector``:
            helps with large guidance scales).
        use_corrector: False turns UniC off everywhere (plain UniP).

    Example:
        >>> x0 = jd.sample(den, x_T, ts, solver=UniPC(order=2, variant="bh2"))  # doctest: +SKIP
    """

    order: int = 2
    variant: str = "bh2"
    prediction: str = "data"
    lower_order_final: bool | int = True
    disable_corrector: tuple[int, ...] = ()
    use_corrector: bool = True

    def __post_init__(self):
        _checks.static_int("order", self.order, allowed=(1, 2, 3))
        _checks.choice("variant", self.variant, _VARIANTS)
        _checks.choice("prediction", self.prediction, ("data", "noise"))
        check_lower_order_final(self.lower_order_final)
        _checks.static_bool("use_corrector", self.use_corrector)
        object.__setattr__(self, "disable_corrector", _step_indices("disable_corrector", self.disable_corrector))

    def min_steps(self) -> int:
        return self.order

    def layout(self, num_steps: int) -> Layout:
        return Layout(num_evals=num_steps, history=self.order + 1, uses_anchor=True, step_end=(True,) * num_steps)

    def _b_terms(self, terms, size: int):
        """b_i = i! * h_phi_(i+1) / B(h) for i = 1..size, with the reference's h_phi recursion.

        At an infinite step (from alpha = 0; only first-order rows, where only B(h) is used) B(h) is its
        limit: -1 for bh2 in the data formulation, and infinite otherwise (those correctors are disabled).
        """
        hh = terms.hh
        b_h = hh if self.variant == "bh1" else jnp.expm1(hh)  # with hh's finite stand-in where h is infinite
        h_phi_k = jnp.expm1(hh) / hh - 1.0
        out, factorial = [], 1
        for i in range(1, size + 1):
            out.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        # the b_i above only enter rows of order >= 2, never an infinite step; B(h) itself takes its limit there
        limit = -1.0 if (self.variant == "bh2" and self.prediction == "data") else 0.0
        return out, jnp.where(terms.finite, b_h, limit)

    def _update(self, g, s_idx, orders, corrector: bool):
        """Rows (ratio, lag coefficients) of the update from grid s to s+1 using evaluations up to s (+ s+1).

        Lags refer to the history *after* the newest evaluation: for the predictor lag 0 = D_s; for the
        corrector lag 0 = D_t (at the predicted point), lag 1 = D_s.
        """
        k = self.order + 1
        terms = step_terms(g, s_idx, s_idx + 1, self.prediction)
        off = 1 if corrector else 0  # lag of D_s
        cols = [jnp.zeros_like(terms.h) for _ in range(k)]
        cols[off] = -terms.scale_phi1
        b_vals, b_h = self._b_terms(terms, 3)
        for p in range(1, self.order + 1):
            rows = orders == p
            # past points s-1, ..., s-(p-1): r_m = (lam_{s-m} - lam_s)/h, at lag off + m
            r_cols, lag_of_r = [], []
            for m in range(1, p):
                prev = np.maximum(s_idx - m, 0)
                # rows without that point (warm-up, or a restart after pure noise) get a distinct fill-in
                valid = jnp.asarray(s_idx - m >= 0) & jnp.isfinite(g.lam[prev])
                r_cols.append(jnp.where(valid, (jnp.where(valid, g.lam[prev], 0.0) - g.lam[s_idx]) / terms.h, -float(m)))
                lag_of_r.append(off + m)
            if corrector:
                r_cols.append(jnp.ones_like(terms.h))
                lag_of_r.append(0)
            rhos = _rhos(r_cols, b_vals, p, corrector)
            sel = jnp.asarray(rows)
            for rho, r, lag in zip(rhos, r_cols, lag_of_r):
                # - scale B(h) rho (D_lag - D_s) / r
                c = -terms.scale * b_h * rho / r
                cols[lag] = cols[lag] + jnp.where(sel, c, 0.0)
                cols[off] = cols[off] - jnp.where(sel, c, 0.0)
        return terms.ratio, cols

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        k = self.order + 1
        # from pure noise the history restarts after point 0 (the limit of the rows; see restart_orders)
        orders = restart_orders(step_orders(n, self.order, self.lower_order_final), g)
        p = np.arange(n)
        # Predictor rows: step p from x_p (the corrected anchor) to the predicted x_{p+1}.
        ratio_p, cols_p = self._update(g, p, orders, corrector=False)
        zero_final = g.sigma[-1] == 0
        last_first_order = jnp.zeros((n,), bool).at[-1].set(zero_final)
        terms = step_terms(g, p, p + 1, self.prediction)
        cols_p[0] = jnp.where(last_first_order, -terms.scale_phi1, cols_p[0])
        for j in range(1, k):
            cols_p[j] = jnp.where(last_first_order, 0.0, cols_p[j])
        y_rows = jnp.concatenate([ratio_p[:, None], jnp.stack(cols_p, axis=1)], axis=1)

        # Corrector at evaluation p (p >= 1) corrects x_p using the step p-1 -> p with its order.
        anchor = jnp.zeros((n, 2 + k), y_rows.dtype).at[:, 1].set(1.0)  # default: anchor <- y (no correction)
        if n > 1:
            q = np.arange(n - 1)  # correct the step q -> q+1 at evaluation q+1
            ratio_c, cols_c = self._update(g, q, orders[:-1], corrector=True)
            enabled = jnp.asarray(np.array([self.use_corrector and i not in self.disable_corrector for i in q]))
            if self.variant == "bh1" or self.prediction == "noise":
                # no finite limit of B(h) from alpha = 0: that step stays uncorrected
                enabled = enabled & jnp.isfinite(g.lam[q + 1] - g.lam[q])
            corr = jnp.concatenate([ratio_c[:, None], jnp.zeros((n - 1, 1)), jnp.stack(cols_c, axis=1)], axis=1)
            keep = anchor[1:]
            anchor = anchor.at[1:].set(jnp.where(enabled[:, None], corr.astype(keep.dtype), keep))
        use_x0 = None
        if self.prediction == "noise":
            y_rows, use_x0 = first_row_from_pure_noise(g, y_rows, k)
        return Coefficients(t=ts[:-1], anchor=anchor, y=y_rows, noise=jnp.zeros((n,), y_rows.dtype), use_x0=use_x0)
