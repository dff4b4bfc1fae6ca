"""DEIS: diffusion exponential integrator sampler (Zhang & Chen, 2023, arXiv:2204.13902), multistep forms.

In y = x / alpha and rho = sigma / alpha the probability-flow ODE is dy/drho = eps_hat. DEIS
extrapolates eps_hat with the Lagrange polynomial through the last ``order`` evaluations and
integrates it exactly over the step:

    y_{i+1} = y_i + sum_j C_ij eps_{i-j},   C_ij = int_{rho_i}^{rho_{i+1}} l_j(rho) d rho.

Two variants differ in the variable the polynomial is fitted in:

- ``variant="rho"`` ("rhoAB-DEIS" of the paper and of the reference JAX code, ``jax_deis``): l_j is the
  Lagrange basis in rho itself. The integrals are exact (Gauss-Legendre on a polynomial), not the
  reference code's 10,000-point Riemann sum.
- ``variant="logrho"`` (diffusers' ``DEISMultistepScheduler``, ``solver_type="logrho"``): l_j is the Lagrange
  basis in u = log rho, still integrated in rho, C_ij = rho_i int_0^{h_i} l_j(v) e^v dv with v = log(rho/rho_i)
  and h_i = log(rho_{i+1}/rho_i). With l_j = sum_k c_jk v^k this is sum_k c_jk M_k(h), where
  M_0 = e^h - 1 and M_k = h^k e^h - k M_{k-1} (closed form, as diffusers' antiderivatives).

Both are multistep methods of order ``order`` in the step size (the logrho nodes are a smooth
reparametrization of the rho nodes), and both take lower orders during warm-up and, with
``lower_order_final``, in the last steps (diffusers: ``lower_order_final=15``, its "< 15 steps" gate).

The step into sigma = 0 (rho -> 0) is regular in rho; in log rho it is the limit h -> -inf, where
h^k e^h -> 0, so M_k = (-1)^{k+1} k! (diffusers evaluates 0 * log 0 there and gives NaN). That last step
extrapolates the polynomial in log rho to log rho = -inf: finite, but only first-order accurate when its order
is above 1, so keep ``lower_order_final`` (the default) on grids that end at sigma = 0. From pure noise
(alpha = 0, rho = +inf) the first step is the data step x_1 = (sigma_1/sigma_0) x_0 + alpha_1 x0_hat (the limit
of y_1 = y_0 + (rho_1 - rho_0) eps_0, which the noise formulation cannot express), and the polynomials of later
steps drop the infinite node.
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
)

__all__ = ["DEIS"]

_GAUSS_X, _GAUSS_W = np.polynomial.legendre.leggauss(3)  # exact for polynomials of degree <= 5
_VARIANTS = ("rho", "logrho")


def lagrange_integrals(nodes, lo, hi):
    """int_lo^hi l_j(r) dr for the Lagrange basis on ``nodes`` (list of arrays), vectorized."""
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    out = []
    for j, nj in enumerate(nodes):
        total = 0.0
        for xq, wq in zip(_GAUSS_X, _GAUSS_W):
            r = mid + half * xq
            basis = 1.0
            for m, nm in enumerate(nodes):
                if m != j:
                    basis = basis * (r - nm) / (nj - nm)
            total = total + wq * basis
        out.append(half * total)
    return out


def _poly_mul_linear(coefs, root):
    """Coefficients (ascending powers) of p(v) * (v - root), for a list of array coefficients."""
    out = [-root * coefs[0]] + [coefs[k - 1] - root * coefs[k] for k in range(1, len(coefs))] + [coefs[-1]]
    return out


def log_lagrange_integrals(log_nodes, rho_lo, log_lo, log_hi):
    """int_{rho_lo}^{rho_hi} l_j(log r) dr for the Lagrange basis on ``log_nodes`` (list of arrays).

    ``log_nodes[0]`` must be ``log_lo`` (the step starts at the newest node). ``log_hi = -inf`` is the step into
    rho = 0. Vectorized over steps; returns one array per node.
    """
    p = len(log_nodes)
    finite = jnp.isfinite(log_hi)
    h = jnp.where(finite, log_hi - log_lo, -1.0)  # stand-in where rho_hi = 0; those M_k are set below
    eh = jnp.where(finite, jnp.exp(h), 0.0)
    moments = [jnp.where(finite, jnp.expm1(h), -1.0)]
    for k in range(1, p):
        # h^k e^h -> 0 as h -> -inf: M_k -> -k M_{k-1}
        moments.append(jnp.where(finite, h**k * eh, 0.0) - k * moments[-1])
    d = [u - log_lo for u in log_nodes]  # shifted nodes, d[0] = 0
    out = []
    for j in range(p):
        coefs, denom = [jnp.ones_like(h)], 1.0
        for m in range(p):
            if m != j:
                coefs = _poly_mul_linear(coefs, d[m])
                denom = denom * (d[j] - d[m])
        out.append(rho_lo * sum(c * mk for c, mk in zip(coefs, moments)) / denom)
    return out


@dataclasses.dataclass(frozen=True)
class DEIS(Solver):
    """Multistep DEIS of order 1-4 (order 1 is DDIM), in rho ("rhoAB") or log rho (diffusers' "logrho").

    Args:
        order: number of past evaluations in the extrapolation (1-4).
        lower_order_final: True (default), False, or an int n (only for grids shorter than n steps;
            diffusers' ``DEISMultistepScheduler(lower_order_final=True)`` is ``15``).
        variant: ``"rho"`` (default; the paper's rhoAB-DEIS, polynomial in rho) or ``"logrho"`` (diffusers'
            ``DEISMultistepScheduler``, polynomial in log rho). See the module docstring.

    Example:
        >>> solver = DEIS(order=3, variant="logrho", lower_order_final=15)  # diffusers' DEIS
        >>> solver.nfe(10)
        10
    """

    order: int = 3
    lower_order_final: bool | int = True
    variant: str = "rho"

    prediction = "noise"

    def __post_init__(self):
        _checks.static_int("order", self.order, allowed=(1, 2, 3, 4))
        check_lower_order_final(self.lower_order_final)
        _checks.choice("variant", self.variant, _VARIANTS,
                       hint="'rho' fits the polynomial in rho = sigma/alpha (rhoAB-DEIS), 'logrho' in log rho (diffusers).")

    def min_steps(self) -> int:
        return self.order

    def layout(self, num_steps: int) -> Layout:
        return Layout.multistep(num_steps, self.order)

    def coefficients(self, schedule, ts) -> Coefficients:
        g = grid(schedule, ts)
        n = ts.shape[0] - 1
        i = np.arange(n)
        finite = jnp.isfinite(g.log_alpha)
        # rho = sigma/alpha; a stand-in 1 at alpha = 0 (that row is replaced by the data step below)
        log_rho = jnp.where(finite, g.log_sigma - jnp.where(finite, g.log_alpha, 0.0), 0.0)
        rho = jnp.exp(log_rho)
        orders = restart_orders(step_orders(n, self.order, self.lower_order_final), g)
        cols = [jnp.zeros((n,), rho.dtype) for _ in range(self.order)]
        for p in range(1, self.order + 1):
            sel = orders == p
            # nodes at i, i-1, ...; rows without those points use harmless distinct fill-ins (unselected)
            nodes = []
            for j in range(p):
                valid = jnp.asarray(i - j >= 0) & finite[np.maximum(i - j, 0)]
                if self.variant == "rho":
                    nodes.append(jnp.where(valid, rho[np.maximum(i - j, 0)], rho[i] * (2.0 + j)))
                else:
                    nodes.append(jnp.where(valid, log_rho[np.maximum(i - j, 0)], log_rho[i] + (1.0 + j)))
            if self.variant == "rho":
                ints = lagrange_integrals(nodes, rho[i], rho[i + 1])
            else:
                ints = log_lagrange_integrals(nodes, rho[i], log_rho[i], g.log_sigma[i + 1] - g.log_alpha[i + 1])
            for j, c in enumerate(ints):
                cols[j] = cols[j] + jnp.where(sel, c, 0.0)
        alpha_next = g.alpha[i + 1]
        ratio = jnp.exp(g.log_alpha[i + 1] - jnp.where(finite[i], g.log_alpha[i], 0.0))
        y = jnp.concatenate([ratio[:, None], alpha_next[:, None] * jnp.stack(cols, 1)], axis=1)
        y, use_x0 = first_row_from_pure_noise(g, y, self.order)
        return Coefficients(t=ts[:-1], anchor=jnp.zeros((n, 2 + self.order), y.dtype), y=y,
                            noise=jnp.zeros((n,), y.dtype), use_x0=use_x0)
