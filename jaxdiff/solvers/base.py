"""The solver protocol, shared by every sampler in ``jaxdiff.solvers``.

Every solver here is a *linear scheme over model evaluations*: the sampler makes M model
evaluations D_k = D(y_k, t_k) (data or noise prediction), and every new point is a linear
combination of an anchor point, the current point and the last K evaluations (plus Gaussian
noise for SDE solvers). Per evaluation k the driver computes

    D_k       = model(y_k, t_k)                                   (pushed into a K-slot history)
    anchor'   = a_0 anchor + a_1 y_k + sum_j a_{2+j} D_{k-j}      (only when ``uses_anchor``)
    y_{k+1}   = b_0 base + sum_j b_{1+j} D_{k-j} + noise_k z_k    (base = anchor' or y_k)

(DPM-Solver-v3 generalises this by coordinate: its rows are arrays of the data shape, the
history keeps D_k + mix_k y_k, and both updates get a constant term; see ``Coefficients``.)

Noise-prediction solvers may mark rows whose evaluation stores the data prediction x0 instead of eps
(``use_x0``): their step from pure noise (alpha = 0, lambda = -inf), where the noise formulation has no
finite coefficients, is the limit of the data formulation, x_1 = (sigma_1/sigma_0) x_0 + alpha_1 x0_hat.

Multistep methods (DPM-Solver++ 2M/3M, DDIM, DEIS) use base = y_k; predictor-correctors (UniPC)
keep the corrected point as the anchor; singlestep/Runge-Kutta methods keep the start of the
step as the anchor while their stages run. A solver is therefore mostly data: it states its
layout (``Layout``: M, K, which evaluations end a grid step) and builds the coefficient rows
(``Coefficients``) for a time grid with vectorized array code, once per grid. Lower-order warm-up,
lower-order final steps and the step into sigma = 0 are just different rows; the driver
(``jaxdiff.sample``) owns the ``lax.scan``, the history buffer, keys and trajectories.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Solver",
    "Layout",
    "Coefficients",
    "Grid",
    "grid",
    "step_orders",
    "step_terms",
    "lower_order_final_active",
    "pure_noise_start",
    "restart_orders",
    "data_step",
]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape of a solver run on a grid of ``num_steps`` steps."""

    num_evals: int  # M, model evaluations (= NFE)
    history: int  # K, evaluations kept
    uses_anchor: bool
    step_end: tuple[bool, ...]  # (M,): evaluation k produces the next grid point

    @classmethod
    def multistep(cls, num_steps: int, history: int) -> "Layout":
        """One evaluation per step, no anchor: the layout of every multistep method."""
        return cls(num_evals=num_steps, history=history, uses_anchor=False, step_end=(True,) * num_steps)


class Coefficients(NamedTuple):
    """Per-evaluation coefficient rows; history columns are in lag order (lag 0 = newest).

    Rows are scalars per column, or arrays of a data shape ``e`` (trailing dimensions of the
    state) for solvers whose coefficients differ per coordinate (DPM-Solver-v3): ``anchor`` is
    then ``(M, 2 + K, *e)`` and ``y`` is ``(M, 1 + K, *e)``.
    """

    t: jax.Array  # (M,) evaluation times
    anchor: jax.Array  # (M, 2 + K[, *e]) on [anchor, y, D lag 0..K-1]
    y: jax.Array  # (M, 1 + K[, *e]) on [base, D lag 0..K-1]
    noise: jax.Array  # (M,) standard deviation of the added Gaussian noise
    mix: jax.Array | None = None  # (M[, *e]): the history stores D_k + mix_k y_k instead of D_k
    offset: jax.Array | None = None  # (M, 2[, *e]): constants added to anchor' and to y_{k+1}
    use_x0: jax.Array | None = None  # (M,) bool, noise solvers: evaluation k stores x0 instead of eps
    # stochastic solvers: each evaluation k gets one standard normal z_k (independent draws, fed noise, or a
    # Brownian increment; see ``jaxdiff.sample``); ``noise`` scales it after the update, ``pre_noise`` before the
    # evaluation (EDM churn); a row uses at most one of the two
    pre_noise: jax.Array | None = None  # (M, 2): y_k <- pre_noise[0] y_k + pre_noise[1] z_k before evaluating
    noise_span: jax.Array | None = None  # (M, 2) lambda interval whose Brownian increment z_k is (default: the step's)


class Grid(NamedTuple):
    """Schedule quantities at the grid points (all shape (N + 1,))."""

    t: jax.Array
    log_alpha: jax.Array
    log_sigma: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    lam: jax.Array


def grid(schedule, ts) -> Grid:
    la, ls = schedule.log_alpha(ts), schedule.log_sigma(ts)
    return Grid(ts, la, ls, jnp.exp(la), jnp.exp(ls), la - ls)


def pure_noise_start(g: Grid) -> jax.Array:
    """Whether the grid starts at alpha = 0 (lambda = -inf): a traced bool, decided on the grid values."""
    return jnp.isneginf(g.log_alpha[0])


def restart_orders(orders, g: Grid) -> jax.Array:
    """Multistep orders when the history restarts after a first point at alpha = 0.

    The polynomial through a node at lambda = -inf (or rho = sigma/alpha = +inf) degenerates to the one
    through the remaining nodes: the limit of every Adams/Vandermonde row with one infinite node is the row
    of one order lower without it. So step p (from grid point p) uses at most p points when point 0 is pure
    noise, and step 0 is first order.
    """
    orders = jnp.asarray(orders)
    p = jnp.arange(orders.shape[0])
    return jnp.where(pure_noise_start(g), jnp.minimum(orders, jnp.maximum(p, 1)), orders)


def data_step(g: Grid, s, t):
    """(ratio, x0 coefficient) of the first-order data-prediction step from grid index s to t.

    x_t = (sigma_t/sigma_s) x_s + (alpha_t - alpha_s sigma_t/sigma_s) x0_hat(x_s): DDIM, finite at alpha_s = 0
    (where it is the limit of every solver's first step) and into sigma_t = 0.
    """
    ratio = jnp.exp(g.log_sigma[t] - g.log_sigma[s])
    return ratio, g.alpha[t] - jnp.exp(g.log_sigma[t] + g.log_alpha[s] - g.log_sigma[s])


def check_lower_order_final(value) -> None:
    """``lower_order_final`` is True, False or a positive int (a static grid-length threshold)."""
    if isinstance(value, (bool, np.bool_)):
        return
    from jaxdiff import _checks

    _checks.static_int("lower_order_final", value, minimum=1,
                       hint="Pass True, False, or an int n (lower orders only on grids of fewer than n steps).")


def first_row_from_pure_noise(g: Grid, y_rows, k: int):
    """Replace row 0 of a noise solver by the data step from alpha = 0 where the grid starts there.

    Returns the rows and the ``use_x0`` flags (eval 0 stores x0 there).
    """
    ratio, c = data_step(g, 0, 1)
    row = jnp.concatenate([jnp.stack([ratio, c]), jnp.zeros((k - 1,), y_rows.dtype)]).astype(y_rows.dtype)
    z0 = pure_noise_start(g)
    rows = y_rows.at[0].set(jnp.where(z0, row, y_rows[0]))
    use_x0 = jnp.zeros((y_rows.shape[0],), bool).at[0].set(z0)
    return rows, use_x0


def lower_order_final_active(lower_order_final, num_steps: int) -> bool:
    if isinstance(lower_order_final, bool):
        return lower_order_final
    return num_steps < lower_order_final


def step_orders(num_steps: int, order: int, lower_order_final) -> np.ndarray:
    """Multistep order per step: warm-up min(order, i + 1), and min(., num_steps - i) at the end.

    ``lower_order_final`` is True (always), False (never) or an int n (only when num_steps < n;
    diffusers uses 15, the official DPM-Solver code 10).
    """
    i = np.arange(num_steps)
    orders = np.minimum(order, i + 1)
    if lower_order_final_active(lower_order_final, num_steps):
        orders = np.minimum(orders, num_steps - i)
    return orders


class Solver(abc.ABC):
    """Base class: subclasses are frozen dataclasses of static configuration.

    Class attributes:
        prediction: ``"data"`` (x0) or ``"noise"`` (eps): what is kept in the history.
        stochastic: whether the solver needs a PRNG ``key``.
    """

    prediction: ClassVar[str] = "data"
    stochastic: ClassVar[bool] = False

    @abc.abstractmethod
    def layout(self, num_steps: int) -> Layout:
        """Static shape of a run on ``num_steps`` steps."""

    @abc.abstractmethod
    def coefficients(self, schedule, ts) -> Coefficients:
        """Coefficient rows for the grid ``ts`` (lag-ordered history columns)."""

    def min_steps(self) -> int:
        """Smallest grid this solver accepts."""
        return 1

    def check_state(self, x) -> None:
        """Trace-time check that the solver can integrate a state shaped like ``x`` (raise ValueError)."""

    def check_final_zero(self) -> None:
        """Trace-time check for a concrete grid that ends at sigma = 0 (raise ValueError if unsupported)."""

    def check_pure_noise_start(self) -> None:
        """Trace-time check for a concrete grid that starts at alpha = 0 (raise ValueError if unsupported).

        ODE solvers take the limit of their first step there (see ``jaxdiff.sample``); a solver whose step
        has no limit at alpha = 0 overrides this with an error that names the solvers that work.
        """

    def check_invertible(self) -> None:
        """Trace-time check that the solver can run backwards (data -> noise) on an increasing grid.

        Deterministic solvers whose rows are written for any sign of h (every exponential integrator here) can;
        stochastic ones cannot (their noise has no inverse): ``jaxdiff.invert`` calls this first.
        """
        if self.stochastic:
            raise ValueError(
                f"`{type(self).__name__}` is stochastic: its steps add fresh noise, which running the grid backwards "
                "cannot undo, so it has no inversion. Invert with a deterministic solver (`DDIM()`, "
                "`DPMSolverPP(order=2)`, `UniPC()`), then sample with any solver."
            )

    def nfe(self, num_steps: int) -> int:
        """Model evaluations for a grid of ``num_steps`` steps."""
        return self.layout(num_steps).num_evals


# ----------------------------------------------------------------------------------------------
# Exponential-integrator algebra shared by DDIM, DPM-Solver(++), UniPC and DEIS.
#
# With hh = -h for data prediction and hh = +h for noise prediction (h = lambda_t - lambda_s),
# one step from s to t reads x_t = ratio x_s - scale (phi_1 D0 + phi_2 D1 + phi_3 D2 + ...), where
# ratio = sigma_t/sigma_s (data) or alpha_t/alpha_s (noise), scale = alpha_t (data) or sigma_t (noise),
# phi_1 = expm1(hh), phi_{k+1} = phi_k / hh - 1/k!, D0 = D(s), D1 ~ h D', D2 ~ h^2 D''.


class StepTerms(NamedTuple):
    ratio: jax.Array
    scale: jax.Array
    scale_phi1: jax.Array  # scale * phi_1, finite also when sigma_t = 0 or alpha_s = 0
    hh: jax.Array  # finite stand-in where h is infinite (those rows are first order)
    h: jax.Array  # h, with the stand-in 1 where it is infinite
    finite: jax.Array  # whether h is finite (False from alpha = 0 or into sigma = 0)


def step_terms(g: Grid, s, t, prediction: str) -> StepTerms:
    """Exponential-integrator terms for steps from grid index s to t (integer numpy arrays)."""
    if prediction == "data":
        ratio = jnp.exp(g.log_sigma[t] - g.log_sigma[s])
        scale = g.alpha[t]
        # alpha_t e^{-h} = sigma_t alpha_s / sigma_s, which is 0 when sigma_t = 0 or alpha_s = 0.
        cross = jnp.exp(g.log_sigma[t] + g.log_alpha[s] - g.log_sigma[s])
        sign = -1.0
    else:
        # alpha_s = 0 (pure noise) has no finite noise-formulation step (those rows are replaced by the data
        # step); a stand-in log alpha_s keeps exp() finite there, so no inf * 0 reaches gradients
        la_s = jnp.where(jnp.isfinite(g.log_alpha[s]), g.log_alpha[s], 0.0)
        ratio = jnp.exp(g.log_alpha[t] - la_s)
        scale = g.sigma[t]
        cross = jnp.exp(g.log_alpha[t] + g.log_sigma[s] - la_s)
        sign = 1.0
    h = g.lam[t] - g.lam[s]
    finite = jnp.isfinite(h)
    h_safe = jnp.where(finite, h, 1.0)
    hh = sign * h_safe
    scale_phi1 = jnp.where(finite, scale * jnp.expm1(hh), cross - scale)
    return StepTerms(ratio, scale, scale_phi1, hh, h_safe, finite)


def lag_vectors(*cols, k: int):
    """Stack per-lag coefficient columns into an (rows, k) array, padding absent lags with 0."""
    rows = jnp.shape(cols[0])[0]
    out = [jnp.asarray(c) for c in cols] + [jnp.zeros((rows,), jnp.asarray(cols[0]).dtype)] * (k - len(cols))
    return jnp.stack(out, axis=1)
