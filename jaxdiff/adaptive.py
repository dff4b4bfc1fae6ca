"""Adaptive step size DPM-Solver (DPM-Solver-12 and DPM-Solver-23): ``jaxdiff.sample_adaptive``.

Lu et al., 2022, "DPM-Solver", NeurIPS (arXiv:2206.00927), Section 3.3 and Algorithms 6-7; the official
``dpm_solver_adaptive`` in LuChengTHU/dpm-solver (``dpm_solver_pytorch.py``). Each attempt steps from s to t with
lambda_t = lambda_s + h using an embedded pair of singlestep DPM-Solvers that share their model evaluations:

- order 2 (DPM-Solver-12): DPM-Solver-1 (DDIM) and DPM-Solver-2 (r1 = 1/2): 2 evaluations per attempt;
- order 3 (DPM-Solver-23): DPM-Solver-2 (r1 = 1/3) and DPM-Solver-3 (r1 = 1/3, r2 = 2/3): 3 evaluations.

The error of an attempt is E = max over the batch (axis 0) of the RMS over the other axes of
(x_high - x_low) / delta, with delta = max(atol, rtol max(|x_low|, |x_prev|)) elementwise. The attempt is
accepted when E <= 1 (then x <- x_high, x_prev <- x_low, s <- t); after every attempt
h <- min(theta h E^(-1/order), lambda(t_end) - lambda_s). Sampling stops when |s - t_end| <= t_err.

Why a separate driver and not a solver for ``jaxdiff.sample``: ``sample`` runs one ``lax.scan`` over coefficient
rows precomputed for a fixed grid; here the grid is not known in advance (each step size depends on the
previous error, so on the data), so the rows are computed on the fly inside a ``lax.while_loop``, and the number
of model calls is data dependent (reported in ``AdaptiveStats``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.models import Denoiser

__all__ = ["sample_adaptive", "AdaptiveStats", "FORMS"]

#: the two variants: "data" (DPM-Solver++'s updates, the official default) and "noise" (DPM-Solver's)
FORMS = ("data", "noise")


class AdaptiveStats(NamedTuple):
    """Counters of ``sample_adaptive`` (per vmapped instance under ``vmap``)."""

    nfe: jax.Array  # shape=(), int32: model evaluations, rejected attempts included (order per attempt)
    accepted: jax.Array  # shape=(), int32: accepted steps
    rejected: jax.Array  # shape=(), int32: rejected attempts
    t: jax.Array  # shape=(), float: the time reached (t_end unless max_steps stopped the loop)
    reached_end: jax.Array  # shape=(), bool: False when `max_steps` attempts ran out before t_end


class _Carry(NamedTuple):
    x: jax.Array
    x_prev: jax.Array
    t: jax.Array  # current time s
    lam: jax.Array  # lambda_s
    h: jax.Array  # next step in lambda
    nfe: jax.Array
    accepted: jax.Array
    rejected: jax.Array


def _coefs(schedule, t, dtype):
    return schedule.alpha(t).astype(dtype), schedule.sigma(t).astype(dtype)


def _attempt(denoiser, args, x, t_s, lam_s, h, t_end, lam_end, order: int, form: str):
    """One embedded pair from s to t = t(lambda_s + h): returns (t, x_low, x_high)."""
    s = denoiser.schedule
    dtype = x.dtype
    # the step that reaches the end lands on t_end itself (not on t_of_lambda(lambda_end), off by round-off)
    at_end = h >= lam_end - lam_s
    t = jnp.where(at_end, t_end, s.t_of_lambda(jnp.where(at_end, lam_end, lam_s + h)).astype(t_end.dtype))
    predict = denoiser.x0 if form == "data" else denoiser.eps
    sign = -1.0 if form == "data" else 1.0  # data form integrates e^{-h}, noise form e^{h}
    r1 = 0.5 if order == 2 else 1.0 / 3.0

    def to(u, hu, m, extra=None):
        """First-order exponential step of length hu from s (plus an optional correction term)."""
        a_u, s_u = _coefs(s, u, dtype)
        a_s, s_s = _coefs(s, t_s, dtype)
        phi = jnp.expm1(sign * hu).astype(dtype)
        if form == "data":
            base = (s_u / s_s) * x - (a_u * phi) * m
            scale = a_u
        else:
            base = jnp.exp(s.log_alpha(u) - s.log_alpha(t_s)).astype(dtype) * x - (s_u * phi) * m
            scale = s_u
        return base if extra is None else base + extra(scale, hu)

    h_t = s.lambda_(t) - lam_s  # the realised step (= h except for round-off at the end)
    m_s = predict(x, t_s, args).astype(dtype)
    s1 = s.t_of_lambda(lam_s + r1 * h_t)
    x_s1 = to(s1, r1 * h_t, m_s)
    m_s1 = predict(x_s1, s1, args).astype(dtype)
    phi_1 = jnp.expm1(sign * h_t).astype(dtype)
    # DPM-Solver-2 with r1 (the low order of the -23 pair, the high order of the -12 pair)
    x_2 = to(t, h_t, m_s, lambda scale, hu: -(0.5 / r1) * (scale * phi_1) * (m_s1 - m_s))
    if order == 2:
        return t, to(t, h_t, m_s), x_2
    r2 = 2.0 / 3.0
    phi_12 = jnp.expm1(sign * r2 * h_t)
    phi_22 = (phi_12 / (r2 * h_t) - sign).astype(dtype)  # e^{-/+r2 h} phi-function of the second kind
    s2 = s.t_of_lambda(lam_s + r2 * h_t)
    corr = (r2 / r1) * (m_s1 - m_s)
    x_s2 = to(s2, r2 * h_t, m_s, lambda scale, hu: (-sign) * scale * phi_22 * corr)
    m_s2 = predict(x_s2, s2, args).astype(dtype)
    phi_2 = (phi_1 / h_t - sign).astype(dtype)
    x_3 = to(t, h_t, m_s, lambda scale, hu: (-sign) * (1.0 / r2) * scale * phi_2 * (m_s2 - m_s))
    return t, x_2, x_3


def _error(x_low, x_high, x_prev, rtol, atol):
    """E = max over axis 0 of the RMS over the other axes of (x_high - x_low) / delta."""
    delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
    ratio = (x_high - x_low) / delta
    ratio = ratio.reshape((ratio.shape[0], -1)) if ratio.ndim else ratio.reshape((1, 1))
    return jnp.max(jnp.sqrt(jnp.mean(jnp.square(ratio), axis=-1)))


def _controller(E, h, lam_s, lam_end, theta, order: int):
    """h <- min(theta h E^(-1/order), lambda_end - lambda_s); E = 0 jumps to the end (no 0 * inf)."""
    safe = jnp.where(E > 0, E, 1.0)
    grown = jnp.where(E > 0, theta * h * safe ** (-1.0 / order), jnp.inf)
    return jnp.minimum(grown, lam_end - lam_s)


def _positive(name, value, hint=""):
    v = _checks.real_number(name, value, lo=0.0, lo_closed=False, hint=hint)
    return value if v is None else v


def sample_adaptive(
    denoiser: Denoiser,
    x_T,
    t_start=None,
    t_end=None,
    *,
    order: int = 3,
    rtol=0.05,
    atol=0.0078,
    h_init=0.05,
    theta=0.9,
    t_err=1e-5,
    form: str = "data",
    args: Any = None,
    max_steps: int = 1000,
    differentiable: bool = False,
):
    """Sample with the adaptive step size DPM-Solver-12 (``order=2``) or DPM-Solver-23 (``order=3``).

    Steps are taken in lambda = log(alpha/sigma). Each attempt runs an embedded pair of singlestep DPM-Solvers
    (orders ``order - 1`` and ``order``) sharing ``order`` model evaluations; its error
    E = max_batch RMS((x_high - x_low) / max(atol, rtol max(|x_low|, |x_prev|))) accepts it when E <= 1, and
    h <- min(theta h E^(-1/order), lambda_end - lambda_s) after every attempt (Lu et al., 2022, DPM-Solver,
    arXiv:2206.00927, Algorithms 6-7; the official ``dpm_solver_adaptive``, whose defaults these are). The
    first axis of ``x_T`` is the batch: the whole batch shares one step sequence (the official semantics). Under
    ``jax.vmap`` every vmapped instance gets its own steps (and the loop runs until the slowest finishes).

    This is not a solver for ``jd.sample``: ``jd.sample`` scans coefficient rows precomputed for a fixed grid,
    while here each step size depends on the previous error, i.e. on the data, so the rows are computed on the
    fly inside a ``lax.while_loop`` and the number of model calls is only known afterwards.

    Differences from the official code, all at round-off level: the step that reaches the end lands on
    ``t_end`` exactly, ``h_init`` is clipped to the interval like every later step, and E^(-1/order) is not
    rounded to float32.

    Args:
        denoiser: a ``jaxdiff.Denoiser``.
        x_T: the state at ``t_start``, shape ``(batch, ...)``.
        t_start, t_end: diffusion times with finite lambda (alpha > 0 and sigma > 0), ``t_end < t_start``;
            default the schedule's ``t_max`` and ``t_min`` (the official README recommends ``t_end = 1e-4`` for
            continuous-time models).
        order: 2 (DPM-Solver-12) or 3 (DPM-Solver-23).
        rtol, atol: relative and absolute tolerances (defaults 0.05 and 0.0078 = 2/256, for data in [-1, 1]).
        h_init: the first step in lambda.
        theta: the safety factor of the step-size update.
        t_err: stop when |s - t_end| <= t_err.
        form: ``"data"`` (DPM-Solver++ updates on the data prediction, the official default
            ``algorithm_type="dpmsolver++"``) or ``"noise"`` (DPM-Solver on the noise prediction).
        args: the model's third argument.
        max_steps: the most attempts (accepted + rejected); a static int.
        differentiable: False runs a ``lax.while_loop`` (no reverse-mode gradient); True runs a ``lax.scan`` of
            ``max_steps`` iterations with a ``lax.cond`` that skips the work once done, so ``jax.grad`` works;
            the step sizes are then treated as constants (``stop_gradient``, as diffrax does), and memory for
            the backward pass grows with ``max_steps``.

    Returns:
        ``(x, stats)``: the sample at ``t_end`` (shape of ``x_T``) and ``AdaptiveStats(nfe, accepted, rejected,
        t, reached_end)``; ``nfe = order * (accepted + rejected)``.

    Raises:
        ValueError: ``order`` not 2 or 3; a non-positive tolerance, ``h_init``, ``theta`` or ``t_err``;
            ``max_steps < 1``; unknown ``form``; an empty ``x_T``; (for concrete times) ``t_end >= t_start`` or
            an infinite lambda at either end.
        TypeError: ``denoiser`` is not a ``Denoiser`` or ``x_T`` not one real floating array.

    Example:
        >>> s = jd.VPLinear(); gd = jd.testing.GaussianData(jnp.zeros(4), jnp.ones(4))
        >>> x, stats = jd.sample_adaptive(gd.denoiser(s), jnp.ones((2, 4)), order=2, args=gd)
        >>> int(stats.nfe) == 2 * int(stats.accepted + stats.rejected)
        True
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"`denoiser` must be a `jaxdiff.Denoiser`, got {_checks.show(denoiser)}.")
    if order not in (2, 3) or isinstance(order, bool):
        raise ValueError(_checks.message("order", order, "2 (DPM-Solver-12) or 3 (DPM-Solver-23)",
                                         "For fixed steps of order 1 use `jd.sample(..., solver=jd.DDIM())`."))
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"`form` must be one of {FORMS} ('data': DPM-Solver++ updates, 'noise': DPM-Solver "
                         f"updates), got {form!r}.")
    if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(_checks.message("max_steps", max_steps, "an integer >= 1 (the most attempts)"))
    rtol = _positive("rtol", rtol, "The official default is 0.05.")
    atol = _positive("atol", atol, "The official default is 0.0078 (2/256 for data in [-1, 1]).")
    h_init = _positive("h_init", h_init, "It is the first step in lambda; the official default is 0.05.")
    theta = _positive("theta", theta, "It is the safety factor of the step-size update; the default is 0.9.")
    t_err = _positive("t_err", t_err, "The default is 1e-5.")
    _checks.float_array("x_T", x_T)
    if np.prod(jnp.shape(x_T)) == 0:
        raise ValueError(f"`x_T` has shape {jnp.shape(x_T)}, with no elements: there is nothing to sample.")
    sched = denoiser.schedule
    sched.check_params()
    dtype = jnp.result_type(jnp.asarray(x_T).dtype, jnp.float32)
    t0 = jnp.asarray(sched.t_max if t_start is None else t_start, dtype)
    t1 = jnp.asarray(sched.t_min if t_end is None else t_end, dtype)
    lam0, lam1 = sched.lambda_(t0).astype(dtype), sched.lambda_(t1).astype(dtype)
    if _checks.all_concrete(t0, t1, lam0, lam1):
        if not float(t1) < float(t0):
            raise ValueError(f"`t_end` must be smaller than `t_start` (sampling runs from noise to data), got "
                             f"t_start={float(t0)}, t_end={float(t1)}.")
        if not (math.isfinite(float(lam0)) and math.isfinite(float(lam1))):
            raise ValueError(
                f"lambda = log(alpha/sigma) must be finite at both ends, got lambda(t_start={float(t0)}) = "
                f"{float(lam0)} and lambda(t_end={float(t1)}) = {float(lam1)}. The adaptive solver steps in lambda: "
                "start where alpha > 0 and stop where sigma > 0 (e.g. the schedule's `t_max` and `t_min`)."
            )
    out = jax.eval_shape(lambda x, a: denoiser.raw(x, t0, a), x_T, args)
    if out.shape != jnp.shape(x_T):
        raise ValueError(f"The model returned shape {out.shape} for `x_T` of shape {jnp.shape(x_T)}.")

    x = jnp.asarray(x_T, dtype)
    zero = jnp.zeros((), jnp.int32)
    h0 = jnp.minimum(jnp.asarray(h_init, dtype), lam1 - lam0)
    carry = _Carry(x, x, t0, lam0, h0, zero, zero, zero)

    def running(c):
        return (jnp.abs(c.t - t1) > t_err) & (c.accepted + c.rejected < max_steps)

    def step(c):
        t, x_low, x_high = _attempt(denoiser, args, c.x, c.t, c.lam, c.h, t1, lam1, order, form)
        E = _error(x_low, x_high, c.x_prev, rtol, atol)
        if differentiable:
            E = jax.lax.stop_gradient(E)
        ok = E <= 1.0
        lam_new = jnp.where(ok, jnp.where(t == t1, lam1, sched.lambda_(t).astype(dtype)), c.lam)
        h = _controller(E, c.h, lam_new, lam1, theta, order).astype(dtype)
        if differentiable:
            h = jax.lax.stop_gradient(h)
        return _Carry(
            jnp.where(ok, x_high, c.x),
            jnp.where(ok, x_low, c.x_prev),
            jnp.where(ok, t, c.t),
            lam_new,
            h,
            c.nfe + order,
            c.accepted + ok.astype(jnp.int32),
            c.rejected + (~ok).astype(jnp.int32),
        )

    if differentiable:
        def body(c, _):
            return jax.lax.cond(running(c), step, lambda c: c, c), None

        carry, _ = jax.lax.scan(body, carry, None, length=max_steps)
    else:
        carry = jax.lax.while_loop(running, step, carry)
    stats = AdaptiveStats(carry.nfe, carry.accepted, carry.rejected, carry.t, jnp.abs(carry.t - t1) <= t_err)
    return carry.x, stats
