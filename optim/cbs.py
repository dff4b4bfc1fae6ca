"""Consensus-based sampling (Carrillo, Hoffmann, Stuart, Vaes 2022) as an optax-style transform.

The exact Ornstein-Uhlenbeck step toward the alpha-weighted consensus with the ensemble's weighted
covariance as noise. It shares the state, keys, checks and the consensus with ``optim.cbo`` (see
``optim._cbo_base``; its defaults are ``DEFAULTS["cbs"]`` there) and runs under ``optim.cbo_minimize``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from optim import _cbo_base as B
from optim import _consensus as C
from optim import _validate as V
from optim._cbo_base import DEFAULTS

__all__ = ["cbs"]

_S = DEFAULTS["cbs"]


@dataclasses.dataclass(frozen=True, eq=False)
class _CBSUpdate(B._Update):
    """Consensus-based sampling: exact OU step toward c with covariance noise (asymmetric root).

    x <- c + e^{-dt}(x - c) + sqrt((1 - e^{-2 dt}) / lam) * sum_j sqrt(w_j) (x_j - c) xi_ij,
    lam = 1/(1 + alpha) (sampling) or 1 (optimization); sum_j sqrt(w_j)(x_j - c) xi_ij has the
    alpha-weighted covariance of the ensemble, so no matrix square root is needed. Members
    with zero weight (non-finite loss or position) enter neither the mean nor the spread.
    """

    def step(self, ctx: B.Context):
        w, alpha = ctx.weights, ctx.alpha
        total = jnp.sum(w)
        root_w = jnp.sqrt(w / jnp.where(total > 0, total, 1))
        xi = B.particle_normals(ctx.step_key, ctx.count, ctx.n, (ctx.n,), ctx.dtype, None)  # (N, N): i, member j
        beta = jnp.exp(-jnp.asarray(ctx.cfg.dt, alpha.dtype))
        inv_lam = 1.0 + alpha if ctx.cfg.cbs_mode == "sampling" else jnp.ones_like(alpha)
        noise_scale = jnp.sqrt((1.0 - beta**2) * inv_lam)

        def leaf(x, p, c):
            centred = jnp.where(C._bcast(w > 0, p), p - c[None], 0)
            spread = jnp.tensordot(xi.astype(x.dtype), centred * C._bcast(root_w, p).astype(x.dtype), axes=(1, 0))
            return (beta - 1.0).astype(x.dtype) * (x - c[None]) + noise_scale.astype(x.dtype) * spread

        return jax.tree.map(leaf, ctx.params, ctx.points, ctx.consensus)


def cbs(
    mode: str = _S["mode"],
    dt: float = _S["dt"],
    alpha: float = _S["alpha"],
    alpha_growth: float = _S["alpha_growth"],
    alpha_max: float = _S["alpha_max"],
    *,
    alpha_schedule: str | Callable[[jax.Array], jax.Array] = "multiply",
    ess_target: float = 0.5,
    key: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Consensus-based sampling (Carrillo, Hoffmann, Stuart, Vaes 2022).

    Each step is the exact Ornstein-Uhlenbeck update toward the consensus c with the
    alpha-weighted ensemble covariance C:

    .. math::

        x_i \leftarrow c + e^{-dt}(x_i - c) + \sqrt{(1 - e^{-2dt})\,\lambda^{-1}}\; C^{1/2}\xi_i,
        \qquad \lambda = (1 + \alpha)^{-1}\ \text{(sampling)},\ 1\ \text{(optimization)}.

    ``C^{1/2} xi_i`` is drawn as ``sum_j sqrt(w_j) (x_j - c) xi_ij`` with ``xi_i ~ N(0, I_N)`` (the
    "asymmetric root" of ConsensusBasedX: the same covariance, no eigendecomposition). In
    sampling mode a Gaussian target ``exp(-f)`` is a fixed point for any alpha; in optimization
    mode the ensemble contracts onto a minimizer. Cost O(N^2 d) per step; one device only.

    Args:
      mode: ``"sampling"`` (the ensemble approximates exp(-f)) or ``"optimization"``.
      dt: time step (exact in the drift, so large steps are stable).
      alpha, alpha_growth, alpha_max, alpha_schedule, ess_target, key: as in :func:`cbo`; the
        default keeps alpha = 1 fixed, the natural choice for sampling.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`CBOState`.

    Example:
      >>> import jax, jax.numpy as jnp, optim
      >>> tx = optim.cbs("sampling")
      >>> x = jax.random.normal(jax.random.key(0), (100, 2))
      >>> step, state = tx.update(None, tx.init(x), x, value=0.5 * jnp.sum(x**2, axis=1))

    References:
      Carrillo, Hoffmann, Stuart, Vaes, `Consensus-based sampling
      <https://arxiv.org/abs/2106.02519>`_, Stud. Appl. Math. 2022.
    """
    V.choice("mode", mode, B.CBS_MODES)
    cfg = B.config(noise="covariance", dt=dt, alpha=alpha, alpha_growth=alpha_growth, alpha_max=alpha_max,
                   alpha_schedule=alpha_schedule, ess_target=ess_target, cbs_mode=mode)
    return B.make(cfg, key, _CBSUpdate)
