"""DPM-Solver-v3 (Zheng, Lu, Bao, Zhu, NeurIPS 2023, arXiv:2310.13268): ODE steps built on
*empirical model statistics* (EMS) of the network.

In lambda = log(alpha/sigma) the probability-flow ODE is dx/dlambda = (log alpha)' x - sigma eps.
For per-coordinate functions l, s, b of lambda (the EMS, arrays of the data shape), write

    f = (sigma eps - l x) / alpha = -x0 + (1 - l) x / alpha,
    g_s(lambda) = e^{-int_s s} f - int_s e^{-int_s^r s} b dr,

so that (x/alpha)' = -l (x/alpha) - f. The linear part is integrated exactly and g, whose
lambda-derivative is what remains of the model's nonlinearity, is extrapolated by a polynomial
through past evaluations. With L = int l, S = int s, I = int e^{L+S}, B = int e^{-S} b and
C = int e^{L+S} B (cumulative trapezoids on the EMS grid), one step from s to t is

    x_t = (alpha_t/alpha_s) e^{L_s-L_t} x_s - alpha_t e^{-L_t-S_s} (I_t - I_s) g_0
          - alpha_t e^{-L_t} (C_t - C_s - B_s (I_t - I_s))
          - alpha_t e^{L_s-L_t} sum_k E_k g^(k),   E_k = int_s^t e^{(L+S) - (L+S)_s} (lambda - lambda_s)^k / k!

with g^(k) from the Vandermonde system through the last ``order`` points, or from Neville
divided differences (``pseudo``: the k-th derivative from k+1 points only). l = 1, s = b = 0
(``EMS.degenerate``) is DPM-Solver++ with exact phi-function weights. The corrector (as
UniC) re-solves the step just taken with the evaluation at its end; f is unchanged by it (the
reference keeps sigma eps - l x fixed), so it costs no model call.

The optimal statistics (paper Sec. 3.4), per coordinate and with expectations over noised data:

    l = E[diag(sigma d eps / dx)]              (minimises E||d(sigma eps - l x)/dx||_F^2)
    s, b = argmin E||f' - s f - b||^2           (f' = df/dlambda along the ODE)

``compute_ems`` estimates them (Hutchinson probes for the diagonal, ``jax.jvp`` for f').

Differences from the reference code (thu-ml/DPM-Solver-v3): the sampling grid is not snapped
to the EMS grid; the statistics are interpolated linearly in lambda and every integral is a
trapezoid on the union of both grids (identical to the reference when the grid lies on the EMS
grid). The corrector is skipped at the indices in ``disable_corrector`` (the reference's
``half`` flag tests ``t > 0.5`` in code but ``t <= 0.5`` in the paper; pick the steps yourself).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.solvers.base import Coefficients, Layout, Solver, step_orders

__all__ = ["EMS", "DPMSolverV3", "compute_ems"]


def _concrete(x, what: str) -> np.ndarray:
    return _checks.require_concrete(x, (
        f"DPMSolverV3 builds its per-coordinate coefficients in float64 numpy and needs a concrete {what}: "
        "close over the grid and the denoiser (e.g. `jax.jit(lambda x: jd.sample(den, x, ts, solver))`) instead "
        "of passing them as traced arguments."
    ))


@dataclasses.dataclass(frozen=True, eq=False)
class EMS:
    """Empirical model statistics on an increasing lambda grid.

    Attributes:
        lam: ``(N + 1,)`` strictly increasing half log-SNR values (noise to data).
        l, s, b: ``(N + 1, *e)`` statistics; ``e`` is the data shape without batch dimensions
            (or any shape that broadcasts against the state, ``()`` for scalars).
    """

    lam: np.ndarray
    l: np.ndarray
    s: np.ndarray
    b: np.ndarray

    def __post_init__(self):
        for name in ("lam", "l", "s", "b"):
            object.__setattr__(self, name, _concrete(getattr(self, name), f"`EMS.{name}`"))
        lam = self.lam
        if lam.ndim != 1 or lam.size < 2 or not np.all(np.diff(lam) > 0):
            raise ValueError("`EMS.lam` must be a strictly increasing 1-D grid of at least 2 half log-SNR values.")
        if not np.all(np.isfinite(lam)):
            raise ValueError("`EMS.lam` must be finite: the statistics cover a bounded lambda range.")
        shapes = {n: getattr(self, n).shape for n in ("l", "s", "b")}
        if len(set(shapes.values())) != 1 or shapes["l"][:1] != lam.shape:
            raise ValueError(f"`EMS.l`, `s`, `b` must all have shape (len(lam), *e) = ({lam.size}, ...); got {shapes}.")
        for n in ("l", "s", "b"):
            if not np.all(np.isfinite(getattr(self, n))):
                raise ValueError(f"`EMS.{n}` has non-finite entries.")

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-coordinate shape ``e``."""
        return self.l.shape[1:]

    @classmethod
    def degenerate(cls, lam, shape: tuple[int, ...] = ()) -> "EMS":
        """l = 1, s = b = 0: DPM-Solver-v3 reduces to DPM-Solver++ (multistep, exact phi weights)."""
        lam = np.asarray(lam, np.float64)
        ones = np.ones(lam.shape + tuple(shape))
        return cls(lam, ones, 0 * ones, 0 * ones)

    @classmethod
    def load_reference(cls, statistics_dir: str, schedule, t_start: float, t_end: float) -> "EMS":
        """Statistics shipped with the reference code (``l.npz`` and ``sb.npz`` in one directory).

        Their grid is uniform in lambda from ``lambda(t_start)`` to ``lambda(t_end)`` (the
        reference's ``t_T`` and ``t_0``, e.g. 1.0 and 1e-3). The arrays keep the reference's
        layout, channels first ``(N + 1, C, H, W)``: transpose them for a channels-last model.
        """
        import os

        l = np.load(os.path.join(statistics_dir, "l.npz"))["l"]
        sb = np.load(os.path.join(statistics_dir, "sb.npz"))
        lam_T, lam_0 = (float(schedule.lambda_(jnp.asarray(t))) for t in (t_start, t_end))
        return cls(np.linspace(lam_T, lam_0, l.shape[0]), l, sb["s"], sb["b"])


def _cumtrapz(y, x):
    """Cumulative trapezoid along axis 0, starting at 0."""
    dx = np.diff(x).reshape((-1,) + (1,) * (y.ndim - 1))
    return np.concatenate([np.zeros_like(y[:1]), np.cumsum(0.5 * dx * (y[1:] + y[:-1]), axis=0)], axis=0)


def _cumtrapz_exp(a, x, w=None):
    """Cumulative trapezoid of w e^a, with a shifted by its max for range (as the reference)."""
    a_max = a.max(axis=0, keepdims=True)
    y = np.exp(a - a_max) * (1.0 if w is None else w)
    return _cumtrapz(y, x) * np.exp(a_max)


def _interp_rows(x_new, x, y):
    """Piecewise-linear interpolation of the rows of ``y`` (along axis 0) at ``x_new``."""
    j = np.clip(np.searchsorted(x, x_new, side="right") - 1, 0, x.size - 2)
    w = ((x_new - x[j]) / (x[j + 1] - x[j])).reshape((-1,) + (1,) * (y.ndim - 1))
    return (1 - w) * y[j] + w * y[j + 1]


def _derivative_weights(lams: np.ndarray, pseudo: bool) -> np.ndarray:
    """Q with g^(k) = sum_m Q[k-1, m] g_m (k = 1..n) for points lams[0..n] (lams[0] = expansion point)."""
    n = lams.size - 1
    basis = np.eye(n + 1)
    if pseudo:  # Neville divided differences: the k-th from points 0..k only
        table = [list(basis)]
        for i in range(1, n + 1):
            table.append([(table[i - 1][j] - table[i - 1][j + 1]) / (lams[j] - lams[i + j]) for j in range(n - i + 1)])
        return np.stack([table[i][0] * math.factorial(i) for i in range(1, n + 1)])
    R = np.stack([(lams[1:] - lams[0]) ** i for i in range(1, n + 1)], axis=1)  # R[m-1, i-1]
    sol = np.linalg.solve(R, basis[1:] - basis[0])  # (n, n + 1): Taylor coefficients of each g_m
    return sol * np.array([math.factorial(i) for i in range(1, n + 1)])[:, None]


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverV3(Solver):
    """DPM-Solver-v3: multistep predictor-corrector with per-coordinate EMS (see the module docstring).

    Args:
        ems: the statistics (``compute_ems``, ``EMS.load_reference`` or ``EMS.degenerate``).
        order: predictor order 1, 2 or 3 (the reference recommends 3 unconditional, 2 guided).
        predictor_pseudo: pseudo-order predictor (the reference's ``p_pseudo``; its recipe for 5 NFE).
        use_corrector: correct each point with the evaluation made there (no extra NFE).
        corrector_pseudo: corrector of order + 1 with pseudo derivatives (``c_pseudo``, default on);
            otherwise a corrector of the predictor's order.
        lower_order_final: True (default), False, or an int n (only for grids of fewer than n steps).
        disable_corrector: steps p whose result x_{p+1} is not corrected (as UniPC and diffusers).

    The grid ``ts`` must be concrete (closed over, not a jit argument) and its lambda values must lie
    in the EMS range (the step into sigma = 0 is not covered: end at ``t_min``).

    Example:
        >>> ems = jd.compute_ems(den, data, key, lam=np.linspace(-5.0, 6.0, 301))  # doctest: +SKIP
        >>> x0 = jd.sample(den, x_T, ts, solver=jd.DPMSolverV3(ems))  # doctest: +SKIP
    """

    ems: EMS
    order: int = 3
    predictor_pseudo: bool = False
    use_corrector: bool = True
    corrector_pseudo: bool = True
    lower_order_final: bool | int = True
    disable_corrector: tuple[int, ...] = ()
    prediction: ClassVar[str] = "data"

    def __post_init__(self):
        if not isinstance(self.ems, EMS):
            raise ValueError(f"`ems` must be a `jaxdiff.EMS`, got {type(self.ems).__name__}.")
        if self.order not in (1, 2, 3):
            raise ValueError(f"`order={self.order!r}` is not supported; use 1, 2 or 3.")
        object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))

    def check_state(self, x) -> None:
        e, shape = self.ems.shape, tuple(jnp.shape(x))
        tail = shape[len(shape) - len(e):] if e else ()
        if len(e) > len(shape) or any(a != b and a != 1 for a, b in zip(e, tail)):
            raise ValueError(
                f"The EMS have the per-coordinate shape {e}, which does not broadcast against the trailing "
                f"dimensions of the state {tuple(jnp.shape(x))}. Compute them for this data layout (a channels-first "
                "reference EMS needs transposing for a channels-last model)."
            )

    def layout(self, num_steps: int) -> Layout:
        return Layout(num_evals=num_steps, history=self.order + 1, uses_anchor=True, step_end=(True,) * num_steps)

    def _tables(self, lam_ts):
        """EMS and their integrals on the union of the EMS grid and the sampling grid."""
        ems = self.ems
        lo, hi = ems.lam[0], ems.lam[-1]
        tol = 1e-9 * max(1.0, hi - lo)
        if not np.all(np.isfinite(lam_ts)) or lam_ts.min() < lo - tol or lam_ts.max() > hi + tol:
            raise ValueError(
                f"The grid's lambda values [{lam_ts.min():.4g}, {lam_ts.max():.4g}] leave the EMS range "
                f"[{lo:.4g}, {hi:.4g}]: DPMSolverV3 does not extrapolate its statistics (and cannot step into "
                "sigma = 0). Build `ts` between the EMS end points, e.g. with final='t_min'."
            )
        lam_ts = np.clip(lam_ts, lo, hi)
        grid = np.union1d(ems.lam, lam_ts)
        l, s, b = (_interp_rows(grid, ems.lam, v) for v in (ems.l, ems.s, ems.b))
        L, S = _cumtrapz(l, grid), _cumtrapz(s, grid)
        I = _cumtrapz_exp(L + S, grid)
        B = _cumtrapz_exp(-S, grid, b)
        C = _cumtrapz_exp(L + S, grid, B)
        idx = np.searchsorted(grid, lam_ts)
        return dict(grid=grid, L=L, S=S, I=I, B=B, C=C), idx, lam_ts

    def coefficients(self, schedule, ts) -> Coefficients:
        with jax.ensure_compile_time_eval():  # numpy values also while a jit traces the sampler
            ts_np = _concrete(ts, "time grid `ts`")
            lam_ts = _concrete(schedule.lambda_(jnp.asarray(ts)), "time grid `ts` (and schedule)")
            alpha = np.exp(_concrete(schedule.log_alpha(jnp.asarray(ts)), "time grid `ts` (and schedule)"))
        tab, idx, lam_ts = self._tables(lam_ts)
        n = ts_np.size - 1
        k = self.order + 1
        e = self.ems.shape
        orders = step_orders(n, self.order, self.lower_order_final)
        grid, L, S, I, B, C = (tab[name] for name in ("grid", "L", "S", "I", "B", "C"))

        def update(s, t, pts, pseudo):
            """(A, {point: V}, const) for the step from grid point s to t with g through ``pts`` (pts[0] = s)."""
            i_s, i_t = idx[s], idx[t]
            A = alpha[t] / alpha[s] * np.exp(L[i_s] - L[i_t])
            dI = I[i_t] - I[i_s]
            const = -alpha[t] * np.exp(-L[i_t]) * (C[i_t] - C[i_s] - B[i_s] * dI)
            V = {pts[0]: alpha[t] * np.exp(-L[i_t] - S[i_s]) * dI}  # on g_0 = f_s
            if len(pts) > 1:
                Q = _derivative_weights(lam_ts[list(pts)], pseudo)
                seg = slice(i_s, i_t + 1)
                a = (L + S)[seg] - (L + S)[i_s]
                x = grid[seg]
                for kk in range(1, len(pts)):
                    w = ((x - grid[i_s]) ** kk / math.factorial(kk)).reshape((-1,) + (1,) * len(e))
                    E = _cumtrapz_exp(a, x, w)[-1]
                    W = alpha[t] * np.exp(L[i_s] - L[i_t]) * E
                    for m, p in enumerate(pts):
                        V[p] = V.get(p, 0.0) + W * Q[kk - 1, m]
            # x_t = A x_s - sum_p V_p g_p + const, with g_p = G_p f_p + H_p and f = -h
            coef, c0 = {}, const
            for p, v in V.items():
                G = np.exp(S[i_s] - S[idx[p]])
                H = -np.exp(S[i_s]) * (B[idx[p]] - B[i_s])
                coef[p] = v * G  # on h_p
                c0 = c0 - v * H
            return A, coef, c0

        y_rows = np.zeros((n, 1 + k) + e)
        y_off = np.zeros((n,) + e)
        anchor = np.zeros((n, 2 + k) + e)
        a_off = np.zeros((n,) + e)
        anchor[:, 1] = 1.0  # default: anchor <- y (no correction)
        for p in range(n):
            pts = tuple(range(p, p - int(orders[p]), -1))  # s = p, then older points
            A, coef, c0 = update(p, p + 1, pts, self.predictor_pseudo)
            y_rows[p, 0] = A
            for q, v in coef.items():
                y_rows[p, 1 + (p - q)] += v  # lag of point q at evaluation p
            y_off[p] = c0
            # corrector at evaluation p + 1 of the step p -> p + 1, with the order of that step
            c_order = int(orders[p]) + int(self.corrector_pseudo)
            if p + 1 < n and self.use_corrector and p not in self.disable_corrector and c_order > 1:
                older = tuple(range(p - 1, p + 1 - c_order, -1))
                pts_c = (p, p + 1) + older
                A, coef, c0 = update(p, p + 1, pts_c, self.corrector_pseudo)
                anchor[p + 1] = 0.0
                anchor[p + 1, 0] = A
                for q, v in coef.items():
                    anchor[p + 1, 2 + (p + 1 - q)] += v
                a_off[p + 1] = c0
        l_ts = _interp_rows(lam_ts, self.ems.lam, self.ems.l)
        mix = (l_ts - 1.0) / alpha.reshape((-1,) + (1,) * len(e))  # h = x0 + (l - 1) y / alpha = -f
        return Coefficients(
            t=jnp.asarray(ts_np[:-1]),
            anchor=jnp.asarray(anchor),
            y=jnp.asarray(y_rows),
            noise=jnp.zeros((n,)),
            mix=jnp.asarray(mix[:-1]),
            offset=jnp.asarray(np.stack([a_off, y_off], axis=1)),
        )


def compute_ems(
    denoiser,
    data,
    key,
    lam,
    *,
    args: Any = None,
    num_probes: int = 1,
    batch_size: int = 512,
) -> EMS:
    """Estimate the EMS of ``denoiser`` on the grid ``lam`` from data samples (paper Sec. 3.4).

    At every grid point, the data are noised (x = alpha x0 + sigma z) and

    * l = E[v * (sigma d eps/dx) v] with Rademacher probes v (Hutchinson's diagonal estimate;
      exact for a diagonal Jacobian),
    * f = (sigma eps - l x)/alpha and its derivative along the ODE, f', through ``jax.jvp``
      (l' from finite differences on the grid), and per coordinate the least-squares line
      f' ~ s f + b.

    Per sample and grid point: ``num_probes`` model JVPs, then one model call and one JVP. To spread the
    model calls over devices, shard ``data`` along its first axis and pass ``batch_size >= K``:
    the jitted statistics then run partitioned, with the same result.

    Args:
        denoiser: the model (its guidance, if any, is included in the statistics).
        data: ``(K, *e)`` data samples (the paper uses 1024-4096).
        key: PRNG key.
        lam: increasing half log-SNR grid (the paper uses 120-1200 points).
        args: model arguments.
        num_probes: Hutchinson probes per sample.
        batch_size: samples per model call.
    """
    lam = _concrete(lam, "`lam`")
    if lam.ndim != 1 or lam.size < 3 or not np.all(np.diff(lam) > 0):
        raise ValueError("`lam` must be a strictly increasing 1-D grid of at least 3 values.")
    data = jnp.asarray(data)
    if data.ndim < 1 or data.shape[0] < 2:
        raise ValueError("`data` must be (K, *e) with K >= 2 samples.")
    sched = denoiser.schedule
    dtype = jnp.result_type(data.dtype, jnp.float32)

    def at(lm):
        t = sched.t_of_lambda(lm)
        return t, sched.alpha(t).astype(dtype), sched.sigma(t).astype(dtype)

    def noised(x0, lm, key):  # x_lambda = alpha x0 + sigma z
        t, alpha, sigma = at(lm)
        return t, alpha, sigma, alpha * x0 + sigma * jax.random.normal(key, x0.shape, dtype)

    def noise_part(x, lm):  # sigma eps / alpha, a function of (x, lambda)
        t, alpha, sigma = at(lm)
        return sigma * denoiser.eps(x, t, args) / alpha

    @jax.jit
    def diag_stats(x0, lm, key):
        kz, kv = jax.random.split(key)
        t, alpha, sigma, x = noised(x0, lm, kz)

        def probe(kp):
            v = jax.random.rademacher(kp, x.shape, dtype)
            _, jv = jax.jvp(lambda y: sigma * denoiser.eps(y, t, args), (x,), (v,))
            return jnp.sum(v * jv, axis=0)

        return jnp.sum(jax.vmap(probe)(jax.random.split(kv, num_probes)), axis=0)

    @jax.jit
    def line_stats(x0, lm, l, dl, key):
        t, alpha, sigma, x = noised(x0, lm, key)
        dlog_alpha = jax.jvp(lambda u: sched.log_alpha(sched.t_of_lambda(u)), (lm,), (jnp.ones_like(lm),))[1]
        eps = denoiser.eps(x, t, args)
        dx = dlog_alpha.astype(dtype) * x - sigma * eps
        m, dm = jax.jvp(noise_part, (x, lm), (dx, jnp.ones_like(lm)))
        l, dl = l[None], dl[None]  # per coordinate, against the batch of samples
        f = m - l * x / alpha
        df = dm - (dl * x + l * dx - l * x * dlog_alpha.astype(dtype)) / alpha
        return jnp.stack([jnp.sum(f, 0), jnp.sum(df, 0), jnp.sum(f * f, 0), jnp.sum(f * df, 0)])

    num = data.shape[0]
    batches = [data[i : i + batch_size] for i in range(0, num, batch_size)]
    k_diag, k_line = jax.random.split(key)
    ls = []
    for j, lm in enumerate(lam):
        keys = jax.random.split(jax.random.fold_in(k_diag, j), len(batches))
        acc = sum(np.asarray(diag_stats(xb, jnp.asarray(lm, dtype), kb), np.float64) for xb, kb in zip(batches, keys))
        ls.append(acc / (num * num_probes))
    l = np.stack(ls)
    dl = np.gradient(l, lam, axis=0)
    ss, bs = [], []
    for j, lm in enumerate(lam):
        keys = jax.random.split(jax.random.fold_in(k_line, j), len(batches))
        acc = sum(
            np.asarray(line_stats(xb, jnp.asarray(lm, dtype), jnp.asarray(l[j], dtype), jnp.asarray(dl[j], dtype), kb),
                       np.float64)
            for xb, kb in zip(batches, keys)
        ) / num
        mean_f, mean_df, var = acc[0], acc[1], acc[2] - acc[0] ** 2
        cov = acc[3] - acc[0] * acc[1]
        # a coordinate whose f does not vary (e.g. Gaussian data with the optimal l) has s = 0
        big = var > 1e-10 * (acc[2] + 1e-30)
        s = np.where(big, cov / np.where(big, var, 1.0), 0.0)
        ss.append(s)
        bs.append(mean_df - s * mean_f)
    return EMS(lam, l, np.stack(ss), np.stack(bs))
