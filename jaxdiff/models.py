"""Denoiser: one model, any parameterization, guidance and thresholding.

A model is ``fn(x, t_model, args) -> prediction``; ``args`` is any pytree (parameters,
conditioning, ...) and ``t_model = schedule.model_time(t)``. ``Denoiser`` converts the
prediction to the two quantities solvers use, the data prediction ``x0`` and the noise
prediction ``eps``, related by x = alpha x0 + sigma eps.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import _checks
from jaxdiff.schedules import Schedule

__all__ = ["Denoiser", "CFG", "DynamicThreshold", "PREDICTIONS"]

PREDICTIONS = ("epsilon", "x0", "v", "score", "velocity")


class CFG(struct.PyTreeNode):
    """Classifier-free guidance (Ho & Salimans, 2022): out = uncond + scale (cond - uncond).

    With guidance, ``args`` is the pair ``(cond_args, uncond_args)``, two pytrees of the same structure and
    leaf shapes. Both branches run as one batched call: ``vmap`` over the leaves that differ, while leaves
    that are *the same object* in both (shared network parameters) are passed once, not stacked. When the
    whole pair is one object (``args=(p, p)``) guidance has no effect and the model runs once.

    The sharing rule is about Python object identity, which ``jax.jit`` does not preserve: if the pair is
    built *outside* a jitted function and passed in as an argument, every leaf arrives as its own tracer and
    shared parameters are stacked (twice their memory, and the model then runs with batched weights). Build
    the pair *inside* the jitted function from one set of parameters, as in the example, or pass the
    parameters once and close over them.

    ``scale`` is an array leaf (differentiable, and ``vmap`` over it samples several scales at once); it must
    be a scalar per call.

    Raises:
        ValueError: at trace time, when ``args`` is not a pair, the two halves differ in structure or in a
            leaf's shape, or ``scale`` is not a scalar.

    Example:
        >>> den = Denoiser(fn, VPLinear(), "epsilon", guidance=CFG(7.5))  # doctest: +SKIP
        >>> @jax.jit  # doctest: +SKIP
        ... def run(params, text, null_text, x_T):
        ...     return jd.sample(den, x_T, ts, args=((params, text), (params, null_text)))  # params shared
    """

    scale: jax.Array = 1.0

    def __call__(self, fn: Callable, x, t_model, args):
        if not (isinstance(args, (tuple, list)) and len(args) == 2):
            raise ValueError(
                "With `guidance=CFG(...)`, `args` must be the pair `(cond_args, uncond_args)`; "
                f"got {_checks.show(args)}. Pass e.g. `args=((params, cond), (params, null_cond))`."
            )
        if jnp.ndim(self.scale) != 0:
            raise ValueError(
                f"`CFG.scale` must be a scalar, got shape {jnp.shape(self.scale)}. For several scales, vmap the "
                "sampler over them: `jax.vmap(lambda w: jd.sample(den.replace(guidance=jd.CFG(w)), ...))(scales)`."
            )
        cond, uncond = args
        if cond is uncond:  # one object twice: the guided output is the model output
            return fn(x, t_model, cond)
        paths_c, tree_c = jax.tree_util.tree_flatten_with_path(cond)
        leaves_u, tree_u = jax.tree.flatten(uncond)
        if tree_c != tree_u:
            raise ValueError(f"`cond_args` and `uncond_args` must have the same structure; got {tree_c} and {tree_u}.")
        leaves_c = [leaf for _, leaf in paths_c]
        shared = [a is b for a, b in zip(leaves_c, leaves_u)]
        for (path, a), b, same in zip(paths_c, leaves_u, shared):
            if not same and jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"`cond_args{jax.tree_util.keystr(path)}` has shape {jnp.shape(a)} but `uncond_args"
                    f"{jax.tree_util.keystr(path)}` has shape {jnp.shape(b)}; the two branches run as one batched "
                    "call, so each leaf must have the same shape in both (e.g. a null embedding shaped like the "
                    "text embedding)."
                )
        if all(shared):
            return fn(x, t_model, cond)
        stacked = [
            a if s else jnp.stack([jnp.asarray(a), jnp.asarray(b)]) for a, b, s in zip(leaves_c, leaves_u, shared)
        ]
        axes = [None if s else 0 for s in shared]
        stacked_args = jax.tree.unflatten(tree_c, stacked)
        axes_args = jax.tree.unflatten(tree_c, axes)
        out = jax.vmap(lambda a: fn(x, t_model, a), in_axes=(axes_args,))(stacked_args)
        if not hasattr(out, "shape") or isinstance(out, (dict, list, tuple)):
            _check_output(out, x)  # raises the model-output TypeError
        return out[1] + self.scale * (out[0] - out[1])


class DynamicThreshold(struct.PyTreeNode):
    """Imagen dynamic thresholding (Saharia et al., 2022) of the data prediction.

    Per sample (over all axes but the first, the batch): s = clip(quantile(|x0|, ratio), 1, max_value),
    then x0 <- clip(x0, -s, s) / s. This is diffusers' rule; the official DPM-Solver uses
    s = max(quantile, max_value), which is the same for the default ``max_value = 1``.
    Valid only with data-prediction solvers (DPM-Solver++, UniPC, DDIM).

    Args:
        ratio: the quantile, in (0, 1] (static).
        max_value: the largest threshold, >= 1 (s is clipped to [1, max_value]; 1 means plain clipping
            to [-1, 1]); an array leaf.

    Raises:
        ValueError: ``ratio`` outside (0, 1]; at call time (trace time), a concrete ``max_value`` below 1, or
            a data prediction without a batch axis or with no elements per sample.
    """

    ratio: float = struct.field(pytree_node=False, default=0.995)
    max_value: jax.Array = 1.0

    def __post_init__(self):
        _checks.real_number("DynamicThreshold.ratio", self.ratio, lo=0.0, hi=1.0, lo_closed=False,
                            hint="It is the quantile of |x0| per sample, e.g. 0.995.")

    def __call__(self, x0):
        # checked here, not in the constructor: JAX rebuilds this pytree with gradients as `max_value`
        v = _checks.concrete(self.max_value)
        if v is not None and v.dtype.kind in "fiu" and not (v.size and np.all(v >= 1.0)):
            raise ValueError(_checks.message(
                "DynamicThreshold.max_value", self.max_value, "a number >= 1",
                "The threshold s is clipped to [1, max_value] and x0 is divided by s (Imagen uses 1; "
                "latent models use larger values)."))
        if x0.ndim < 2 or x0.shape[0] == 0 or math.prod(x0.shape[1:]) == 0:
            raise ValueError(
                f"Dynamic thresholding needs a batch axis first and at least one sample with one element; got `x0` of "
                f"shape {x0.shape}. It takes a quantile per sample: pass states shaped (batch, ...)."
            )
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
        if not callable(self.fn):
            raise TypeError(f"`fn` must be the model, a function `fn(x, t_model, args)`, got {_checks.show(self.fn)}.")
        _check_signature(self.fn)
        if self.guidance is not None and not isinstance(self.guidance, CFG):
            raise TypeError(f"`guidance` must be `jaxdiff.CFG(scale)` or None, got {_checks.show(self.guidance)}.")
        if self.threshold is not None and not isinstance(self.threshold, DynamicThreshold):
            raise TypeError(
                f"`threshold` must be `jaxdiff.DynamicThreshold(...)` or None, got {_checks.show(self.threshold)}."
            )

    def raw(self, x, t, args: Any):
        """The model output (with guidance applied) at continuous time t (scalar, or shape ``(B,)``)."""
        _checks.float_array("x", x)
        _check_time(x, t)
        t_model = self.schedule.model_time(t)
        if self.guidance is None:
            out = self.fn(x, t_model, args)
        else:
            out = self.guidance(self.fn, x, t_model, args)
        _check_output(out, x)
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
            TypeError: ``x`` is not one real floating array, or the model returns something else than one.
        """
        _checks.float_array("x", x)
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


_CONTRACT = (
    "A model is `fn(x, t_model, args) -> prediction`: `x` the noisy state, `t_model` the schedule's model "
    "time (`schedule.model_time(t)`), `args` whatever `jd.sample(..., args=...)` passes (parameters, "
    "conditioning; None by default)."
)


@functools.lru_cache(maxsize=256)
def _signature_error(fn) -> str | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and C callables: nothing to inspect
        return None
    try:
        sig.bind(None, None, None)
    except TypeError:
        return f"`fn` must accept three positional arguments, but its signature is {sig}. {_CONTRACT} " \
            "Wrap a two-argument model: `jd.Denoiser(lambda x, t, args: fn(x, t), ...)`."
    return None


def _check_signature(fn):
    """TypeError at construction for a model that cannot be called as ``fn(x, t_model, args)``."""
    try:
        err = _signature_error(fn)
    except TypeError:  # unhashable callable: inspect it without the cache
        err = _signature_error.__wrapped__(fn)
    if err:
        raise TypeError(err)


def _check_output(out, x):
    """The model returned one real floating array shaped like ``x`` (checked at trace time)."""
    if not hasattr(out, "shape") or isinstance(out, (dict, list, tuple)):
        raise TypeError(
            f"The model must return one array with the shape of `x` {jnp.shape(x)}, got {_checks.show(out)}. "
            "Return the prediction itself (e.g. `out['sample']` for a model that returns a dict)."
        )
    dtype = jnp.result_type(out)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"The model returned dtype {dtype} (shape {jnp.shape(out)}); a prediction must be a real floating-point "
            "array (float16, bfloat16, float32 or float64). Complex or integer outputs cannot be converted without "
            "losing information."
        )
    if jnp.shape(out) != jnp.shape(x):
        raise ValueError(
            f"The model returned shape {jnp.shape(out)} for `x` of shape {jnp.shape(x)}; "
            "a denoiser must return a prediction with the shape of `x`."
        )


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
