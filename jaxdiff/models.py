"""Denoiser: one model, any parameterization, guidance and thresholding.

A model is ``fn(x, t_model, args) -> prediction``; ``args`` is any pytree (parameters,
conditioning, ...) and ``t_model = schedule.model_time(t)``. ``Denoiser`` converts the
prediction to the two quantities solvers use, the data prediction ``x0`` and the noise
prediction ``eps``, related by x = alpha x0 + sigma eps.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff.schedules import Schedule

__all__ = ["Denoiser", "CFG", "DynamicThreshold", "PREDICTIONS"]

PREDICTIONS = ("epsilon", "x0", "v", "score", "velocity")


class CFG(struct.PyTreeNode):
    """Classifier-free guidance (Ho & Salimans, 2022): out = uncond + scale (cond - uncond).

    With guidance, ``args`` is the pair ``(cond_args, uncond_args)``. Both branches run as one
    batched call (``vmap`` over the leaves that differ; leaves that are the same object, such as
    shared network parameters, are not copied). ``scale`` is an array leaf, so it can be vmapped.

    Example:
        >>> den = Denoiser(fn, VPLinear(), "epsilon", guidance=CFG(7.5))  # doctest: +SKIP
        >>> jd.sample(den, x_T, ts, args=((params, text), (params, null_text)))  # doctest: +SKIP
    """

    scale: jax.Array = 1.0

    def __call__(self, fn: Callable, x, t_model, args):
        if not (isinstance(args, (tuple, list)) and len(args) == 2):
            raise ValueError(
                "With `guidance=CFG(...)`, `args` must be the pair `(cond_args, uncond_args)`; "
                f"got {type(args).__name__}. Pass e.g. `args=((params, cond), (params, null_cond))`."
            )
        cond, uncond = args
        leaves_c, tree_c = jax.tree.flatten(cond)
        leaves_u, tree_u = jax.tree.flatten(uncond)
        if tree_c != tree_u:
            raise ValueError(f"`cond_args` and `uncond_args` must have the same structure; got {tree_c} and {tree_u}.")
        shared = [a is b for a, b in zip(leaves_c, leaves_u)]
        stacked = [
            a if s else jnp.stack([jnp.asarray(a), jnp.asarray(b)]) for a, b, s in zip(leaves_c, leaves_u, shared)
        ]
        axes = [None if s else 0 for s in shared]
        stacked_args = jax.tree.unflatten(tree_c, stacked)
        axes_args = jax.tree.unflatten(tree_c, axes)
        out = jax.vmap(lambda a: fn(x, t_model, a), in_axes=(axes_args,))(stacked_args)
        return out[1] + self.scale * (out[0] - out[1])


class DynamicThreshold(struct.PyTreeNode):
    """Imagen dynamic thresholding (Saharia et al., 2022) of the data prediction.

    Per sample (over all axes but the first, the batch): s = clip(quantile(|x0|, ratio), 1, max_value),
    then x0 <- clip(x0, -s, s) / s. This is diffusers' rule; the official DPM-Solver uses
    s = max(quantile, max_value), which is the same for the default ``max_value = 1``.
    Valid only with data-prediction solvers (DPM-Solver++, UniPC, DDIM).
    """

    ratio: float = struct.field(pytree_node=False, default=0.995)
    max_value: jax.Array = 1.0

    def __call__(self, x0):
        if x0.ndim < 2:
            raise ValueError(f"Dynamic thresholding needs a batch axis first; got `x0` of shape {x0.shape}.")
        s = jnp.quantile(jnp.abs(x0.reshape(x0.shape[0], -1)), self.ratio, axis=1)
        s = jnp.clip(s, 1.0, self.max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s


class Denoiser(struct.PyTreeNode):
    """A diffusion model with its schedule and parameterization.

    Conversions (x = alpha x0 + sigma eps):

    - ``"epsilon"``: eps = out; ``"x0"``: x0 = out;
    - ``"v"`` (Salimans & Ho, 2022): v = alpha eps - sigma x0, so x0 = (alpha x - sigma v)/(alpha^2 + sigma^2);
    - ``"score"``: grad log p_t = -eps / sigma;
    - ``"velocity"`` (flow matching): v = dx/dt = alpha' x0 + sigma' eps, solved for (x0, eps).

    Times: ``t`` is a scalar (sampling) or one time per sample, shape ``(B,)`` for ``x`` of shape ``(B, ...)``
    (training); the model then receives ``t_model`` of shape ``(B,)`` and the schedule coefficients are
    reshaped to ``(B, 1, ..., 1)``.

    Args:
        fn: ``fn(x, t_model, args) -> prediction`` with the shape of ``x``.
        schedule: the noise schedule the model was trained with.
        prediction: one of ``PREDICTIONS``.
        guidance: ``CFG(scale)`` or None.
        threshold: ``DynamicThreshold()`` or None (data-prediction solvers only).

    Example:
        >>> den = jd.Denoiser(lambda x, t, a: x * 0, jd.VPLinear(), "epsilon")
        >>> den.x0(jnp.ones(2), 0.5, None).shape
        (2,)
    """

    fn: Callable = struct.field(pytree_node=False)
    schedule: Schedule
    prediction: str = struct.field(pytree_node=False, default="epsilon")
    guidance: CFG | None = None
    threshold: DynamicThreshold | None = None

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"Unknown `prediction={self.prediction!r}`; expected one of {PREDICTIONS}.")
        if not isinstance(self.schedule, Schedule):
            raise ValueError(f"`schedule` must be a jaxdiff Schedule, got {type(self.schedule).__name__}.")

    def raw(self, x, t, args: Any):
        """The model output (with guidance applied) at continuous time t (scalar, or shape ``(B,)``)."""
        _check_time(x, t)
        t_model = self.schedule.model_time(t)
        if self.guidance is None:
            out = self.fn(x, t_model, args)
        else:
            out = self.guidance(self.fn, x, t_model, args)
        if jnp.shape(out) != jnp.shape(x):
            raise ValueError(
                f"The model returned shape {jnp.shape(out)} for `x` of shape {jnp.shape(x)}; "
                "a denoiser must return a prediction with the shape of `x`."
            )
        return out

    def _coefficients(self, t, dtype, ndim):
        s = self.schedule
        alpha, sigma = s.alpha(t).astype(dtype), s.sigma(t).astype(dtype)
        return _per_sample(alpha, ndim), _per_sample(sigma, ndim)

    def x0_and_eps(self, x, t, args: Any):
        """Both predictions from one model call, in at least float32.

        Args:
            x: the noisy state x_t, shape ``(B, ...)`` (any shape the model takes when t is a scalar).
            t: continuous time, a scalar or one time per sample, shape ``(B,)`` (as in training); the model
                then receives ``t_model`` of shape ``(B,)`` and the coefficients broadcast over x's trailing axes.
            args: the model's third argument (parameters, per-sample conditioning, ...).

        Returns:
            ``(x0, eps)``, each with the shape of ``x``.

        Raises:
            ValueError: ``t`` is neither a scalar nor of shape ``(x.shape[0],)``, or the model output's shape
                differs from ``x``'s.
        """
        dtype = jnp.result_type(x.dtype, jnp.float32)
        out = self.raw(x, t, args).astype(dtype)
        x = x.astype(dtype)
        alpha, sigma = self._coefficients(t, dtype, x.ndim)
        p = self.prediction
        if p == "epsilon":
            eps = out
            x0 = (x - sigma * eps) / alpha
        elif p == "x0":
            x0 = out
            eps = (x - alpha * x0) / sigma
        elif p == "v":
            norm = alpha**2 + sigma**2
            x0 = (alpha * x - sigma * out) / norm
            eps = (sigma * x + alpha * out) / norm
        elif p == "score":
            eps = -sigma * out
            x0 = (x - sigma * eps) / alpha
        else:  # velocity
            s = self.schedule
            d_alpha, d_sigma = jax.jvp(lambda tt: (s.alpha(tt), s.sigma(tt)), (t,), (jnp.ones_like(t),))[1]
            d_alpha, d_sigma = _per_sample(d_alpha.astype(dtype), x.ndim), _per_sample(d_sigma.astype(dtype), x.ndim)
            det = alpha * d_sigma - sigma * d_alpha
            x0 = (d_sigma * x - sigma * out) / det
            eps = (alpha * out - d_alpha * x) / det
        if self.threshold is not None:
            x0 = self.threshold(x0)
            eps = (x - alpha * x0) / sigma
        return x0, eps

    def x0(self, x, t, args: Any = None):
        """Data prediction E[x_0 | x_t = x]."""
        return self.x0_and_eps(x, t, args)[0]

    def eps(self, x, t, args: Any = None):
        """Noise prediction E[eps | x_t = x]."""
        return self.x0_and_eps(x, t, args)[1]

    def score(self, x, t, args: Any = None):
        """Score grad_x log p_t(x) = -eps / sigma_t."""
        eps = self.eps(x, t, args)
        return -eps / _per_sample(self.schedule.sigma(t), eps.ndim)


def _check_time(x, t):
    """t is a scalar or one time per sample, shape (B,) for x of shape (B, ...)."""
    if jnp.ndim(t) == 0:
        return
    if jnp.ndim(t) != 1 or jnp.ndim(x) < 1 or jnp.shape(t)[0] != jnp.shape(x)[0]:
        raise ValueError(
            f"`t` must be a scalar or one time per sample; got `t` of shape {jnp.shape(t)} for `x` of shape "
            f"{jnp.shape(x)}. Pass a scalar, or `t` of shape ({jnp.shape(x)[0] if jnp.ndim(x) else 'B'},) "
            "for `x` of shape (B, ...)."
        )


def _per_sample(c, ndim: int):
    """Coefficients of a per-sample t (shape (B,)) reshaped to (B, 1, ..., 1); scalars unchanged."""
    # explicit reshape: the suite (and careful users) run with jax_numpy_rank_promotion="raise"
    if jnp.ndim(c) == 0:
        return c
    return c.reshape(c.shape + (1,) * (ndim - 1))
