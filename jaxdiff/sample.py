"""The one sampling driver: ``jaxdiff.sample``.

A solver gives a ``Layout`` and per-evaluation ``Coefficients`` for the grid (see
``jaxdiff.solvers.base``); the driver runs them in one ``lax.scan`` with a fixed-size buffer of
past model evaluations, newest first. One compiled program per (solver, grid size); no Python loop over
steps and no ``lax.cond`` on the order. Pure: works under ``jit``, ``vmap`` and ``grad``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.models import Denoiser
from jaxdiff.solvers.base import Solver

__all__ = ["sample", "invert", "nfe", "integrate", "check_inputs"]

Scan = Callable  # (body, carry, xs) -> (carry, ys), with lax.scan's contract


def nfe(solver: Solver, ts_or_num_steps) -> int:
    """Model evaluations ``solver`` makes on a grid (an array of times or a number of steps)."""
    if isinstance(ts_or_num_steps, (int, np.integer)) and not isinstance(ts_or_num_steps, bool):
        n = int(ts_or_num_steps)
    else:
        n = int(np.shape(ts_or_num_steps)[0]) - 1 if np.ndim(ts_or_num_steps) == 1 else -1
    if n < 1:
        raise ValueError(_checks.message("ts_or_num_steps", ts_or_num_steps, "a grid of >= 2 times or a number of steps >= 1"))
    return solver.nfe(n)


def sample(
    denoiser: Denoiser,
    x_T,
    ts,
    solver: Solver | None = None,
    *,
    args: Any = None,
    key=None,
    return_trajectory: bool = False,
    adjoint=None,
    noise=None,
):
    """Solve from ``x_T`` at ``ts[0]`` to ``ts[-1]``.

    Args:
        denoiser: a ``Denoiser`` (model, schedule, parameterization, guidance, thresholding).
        x_T: the starting point, one real floating array of any shape the model accepts (usually
            ``(batch, ...)``); float16/bfloat16 states are integrated in float32.
        ts: strictly decreasing times inside the schedule's domain, shape ``(num_steps + 1,)`` (see
            ``jaxdiff.timesteps``); a list is converted.
        solver: any ``jaxdiff`` solver; default ``DPMSolverPP(order=2)``.
        args: pytree passed to the model as its third argument (parameters, conditioning).
        key: PRNG key (``jax.random.key``), required by stochastic solvers.
        return_trajectory: also return the states at the grid points, shape ``(num_steps + 1, *x_T.shape)``.
        adjoint: how gradients flow: None (backpropagate through the scan), ``jaxdiff.Backprop(...)``
            or ``jaxdiff.AdjointDPM(...)``.
        noise: stochastic solvers only; where each evaluation's standard normal z_k comes from. None: independent
            draws from ``key``. A ``jaxdiff.BrownianNoise(key)``: normalized increments of one Brownian path in the
            signal-to-noise clock over each evaluation's interval, so different grids share the path (``key`` is
            then not needed). An array of shape ``(nfe, *x_T.shape)``: the normals themselves, row k for
            evaluation k (rows of evaluations that add no noise are ignored), e.g. to feed a reference
            implementation the same noise.

    Returns:
        The sample at ``ts[-1]`` (and the trajectory if asked). ``jaxdiff.nfe(solver, ts)`` model calls.

    Raises:
        ValueError: at trace time, for a grid that is not strictly decreasing, not finite or outside the
            schedule's domain, a grid too short for the order, a noise-prediction solver with thresholding, a
            missing key, a model output whose shape differs from ``x_T``, an empty ``x_T``, or an epsilon/score
            model asked to start at pure noise (alpha(ts[0]) = 0).
        TypeError: ``x_T`` is not one real floating array, ``key`` is not a PRNG key, the model does not take
            ``(x, t_model, args)`` or returns something else than one real floating array.

    Grid checks: a concrete grid (a NumPy array, a constant, a list) is checked at trace time. A grid passed
    as a ``jax.jit`` argument is traced and cannot be: it is then only checked for its shape. For a traced
    grid, opt in to the runtime check by calling ``jd.check_grid(schedule, ts)`` inside the jitted function
    and wrapping it in ``jax.experimental.checkify.checkify``, or check the grid before ``jit``.

    Pure noise: a grid may start where alpha = 0 (``RectifiedFlow`` at t = 1, ``VPCosine`` at t = 1, a zero
    terminal SNR ``VPDiscrete`` at t = 1). Every ODE solver then takes the limit of its step: the first step
    is x_1 = (sigma_1/sigma_0) x_0 + alpha_1 x0_hat(x_0), with the data prediction only (as diffusers drops
    the x0 term), predictor-correctors and Heun correct it with the data prediction at the new point
    (a trapezoid in e^lambda), and multistep methods restart their history after it (the point at
    lambda = -inf drops out of every later polynomial). This needs a model that predicts v, x0 or the
    velocity; an epsilon/score model has no data prediction at alpha = 0 and is refused.
    ``EulerMaruyama`` cannot start there (the SDE's drift is infinite): use ``DDPM`` or ``DPMSolverPPSDE``.

    Example:
        >>> den = jd.Denoiser(fn, jd.VPLinear(), "epsilon")  # doctest: +SKIP
        >>> x0 = jax.jit(lambda x: jd.sample(den, x, jd.timesteps(den.schedule, 10)))(x_T)  # doctest: +SKIP
    """
    if solver is None:
        from jaxdiff.solvers.dpm_solver import DPMSolverPP

        solver = DPMSolverPP()
    ts = check_inputs(denoiser, x_T, ts, solver, args, key, noise)
    if noise is not None:
        if adjoint is not None:
            raise ValueError("`noise` and `adjoint` cannot be combined yet: sample with `adjoint=None` (gradients then "
                             "flow through the scan) or drop `noise`.")
        return integrate(denoiser, x_T, ts, solver, args=args, key=key, return_trajectory=return_trajectory,
                         noise=noise)
    if adjoint is not None:
        if not hasattr(adjoint, "loop"):
            raise TypeError(
                f"`adjoint` must be None, `jaxdiff.Backprop(...)` or `jaxdiff.AdjointDPM(...)`, got {_checks.show(adjoint)}."
            )
        return adjoint.loop(denoiser, x_T, ts, solver, args=args, key=key, return_trajectory=return_trajectory)
    return integrate(denoiser, x_T, ts, solver, args=args, key=key, return_trajectory=return_trajectory)


def invert(
    denoiser: Denoiser,
    x_0,
    ts,
    solver: Solver | None = None,
    *,
    args: Any = None,
    return_trajectory: bool = False,
):
    """Run a deterministic solver backwards on the sampling grid ``ts``: from ``x_0`` at ``ts[-1]`` to ``ts[0]``.

    Inversion (data -> noise, DDIM inversion and its higher-order multistep forms): the same exponential-integrator
    rows built on the reversed grid, i.e. the solver integrating the probability-flow ODE towards increasing sigma
    (h = lambda_t - lambda_s < 0). ``sample(den, invert(den, x_0, ts, solver), ts, solver)`` then returns ``x_0`` up
    to both solves' discretization errors, which fall at the solver's order (round trip on Gaussian data:
    ``tests/jaxdiff/test_inversion.py``).

    Args:
        denoiser: a ``Denoiser``.
        x_0: the point at ``ts[-1]`` (usually the data end), any shape the model accepts.
        ts: the sampling grid, strictly decreasing (as for ``sample``); the solve runs from ``ts[-1]`` to ``ts[0]``.
        solver: a deterministic solver (default ``DDIM()``); the trajectory uses ``solver``'s warm-up rows on the
            reversed grid.
        args: pytree passed to the model.
        return_trajectory: also return the states at ``ts[::-1]``.

    Returns:
        The latent at ``ts[0]`` (and the trajectory from ``ts[-1]`` to ``ts[0]``).

    Raises:
        ValueError: for a stochastic solver (no inverse), a grid ending at sigma = 0 (``ts[-1]``: the backward step
            from sigma = 0 divides by it; end the grid at ``final='sigma_min'``) or starting at alpha = 0 (``ts[0]``:
            inverting into pure noise), and the input errors of ``sample``.

    Example:
        >>> ts = jd.timesteps(s, 50, "logsnr")  # doctest: +SKIP
        >>> x_T = jd.invert(den, x0, ts, jd.DPMSolverPP(order=2))  # doctest: +SKIP
        >>> x0_again = jd.sample(den, x_T, ts, jd.DPMSolverPP(order=2))  # doctest: +SKIP
    """
    if solver is None:
        from jaxdiff.solvers.ddim import DDIM

        solver = DDIM()
    if not isinstance(solver, Solver):
        raise ValueError(f"`solver` must be a jaxdiff solver (e.g. `jd.DDIM()`), got {type(solver).__name__}.")
    solver.check_invertible()
    _checks.float_array("x_0", x_0)
    ts = _checks.validate_grid(denoiser.schedule, ts, hint="Pass the sampling grid (decreasing); `invert` runs it "
                               "backwards.")
    sigma_end = _checks.eager(lambda: denoiser.schedule.sigma(ts[-1]))
    if sigma_end is not None and sigma_end == 0:
        raise ValueError(
            "`invert` starts at `ts[-1]`, which is sigma = 0: the backward step from there divides by sigma. End the "
            "grid at sigma > 0 (e.g. `jd.timesteps(s, n, final='sigma_min')` or the schedule's default `t_min`)."
        )
    alpha0 = _checks.eager(lambda: denoiser.schedule.alpha(ts[0]))
    if alpha0 is not None and alpha0 == 0:
        raise ValueError(
            "`invert` ends at `ts[0]`, which is pure noise (alpha = 0): the backward flow has no finite step into "
            "it. Start the grid where alpha > 0 (e.g. `jd.timesteps(s, n, t_start=0.999)`)."
        )
    num_steps = jnp.shape(ts)[0] - 1
    if num_steps < solver.min_steps():
        raise ValueError(f"`{type(solver).__name__}` needs at least {solver.min_steps()} steps, but `ts` has "
                         f"{num_steps}. Use more steps or a lower order.")
    out = jax.eval_shape(lambda x, a: denoiser.raw(x, ts[-1], a), x_0, args)
    if out.shape != jnp.shape(x_0):
        raise ValueError(f"The model returned shape {out.shape} for `x_0` of shape {jnp.shape(x_0)}.")
    return integrate(denoiser, x_0, ts[::-1], solver, args=args, return_trajectory=return_trajectory)


def check_inputs(denoiser, x_T, ts, solver, args, key, noise=None):
    """Trace-time validation with messages that say what to do; returns ``ts`` as a floating array."""
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"`denoiser` must be a `jaxdiff.Denoiser`, got {type(denoiser).__name__}.")
    if not isinstance(solver, Solver):
        raise ValueError(f"`solver` must be a jaxdiff solver (e.g. `jd.DPMSolverPP()`), got {type(solver).__name__}.")
    _checks.float_array("x_T", x_T)
    if np.prod(jnp.shape(x_T)) == 0:
        raise ValueError(f"`x_T` has shape {jnp.shape(x_T)}, with no elements: there is nothing to sample.")
    ts = _checks.validate_grid(denoiser.schedule, ts)
    num_steps = jnp.shape(ts)[0] - 1
    if num_steps < solver.min_steps():
        raise ValueError(
            f"`{type(solver).__name__}` with order {getattr(solver, 'order', '?')} needs at least "
            f"{solver.min_steps()} steps, but `ts` has {num_steps}. Use more steps or a lower order."
        )
    if denoiser.threshold is not None and solver.prediction != "data":
        raise ValueError(
            f"Dynamic thresholding acts on the data prediction, but `{type(solver).__name__}` integrates the "
            "noise prediction. Use a data-prediction solver (DPMSolverPP, UniPC, DDIM) or drop `threshold`."
        )
    if noise is not None:
        check_noise(noise, solver, num_steps, x_T)
    elif solver.stochastic and key is None:
        raise ValueError(f"`{type(solver).__name__}` is stochastic: pass `key=jax.random.key(...)` (or `noise=`).")
    _checks.prng_key("key", key)
    solver.check_state(x_T)
    alpha0 = _checks.eager(lambda: denoiser.schedule.alpha(ts[0]))
    if alpha0 is not None and alpha0 == 0:
        check_pure_noise_start(denoiser, solver, float(_checks.eager(lambda: ts[0])))
    sigma_end = _checks.eager(lambda: denoiser.schedule.sigma(ts[-1]))
    if sigma_end is not None and sigma_end == 0:
        solver.check_final_zero()
    out = jax.eval_shape(lambda x, a: denoiser.raw(x, ts[0], a), x_T, args)
    if out.shape != jnp.shape(x_T):
        raise ValueError(f"The model returned shape {out.shape} for `x_T` of shape {jnp.shape(x_T)}.")
    return ts


def check_noise(noise, solver, num_steps: int, x_T) -> None:
    """``noise`` is a ``BrownianNoise`` or an array of normals shaped ``(nfe, *x_T.shape)``, for a stochastic solver."""
    from jaxdiff.brownian import BrownianNoise

    if not solver.stochastic:
        raise ValueError(f"`noise` was given, but `{type(solver).__name__}` is deterministic and adds no noise. "
                         "Drop `noise`, or use a stochastic solver (e.g. `jd.DPMSolverPPSDE()`).")
    if isinstance(noise, BrownianNoise):
        return
    if not hasattr(noise, "shape") or not hasattr(noise, "dtype"):
        raise TypeError(f"`noise` must be a `jaxdiff.BrownianNoise` or an array of standard normals, got "
                        f"{_checks.show(noise)}.")
    want = (solver.nfe(num_steps),) + tuple(jnp.shape(x_T))
    if tuple(noise.shape) != want:
        raise ValueError(f"`noise` has shape {tuple(noise.shape)}, but `{type(solver).__name__}` on {num_steps} steps "
                         f"needs one normal per model evaluation, shape {want} (nfe, *x_T.shape).")


def check_pure_noise_start(denoiser, solver, t0: float):
    """A grid starting at alpha = 0 needs a data prediction there (see ``sample``'s docstring)."""
    if denoiser.prediction in ("epsilon", "score"):
        raise ValueError(
            f"`ts[0] = {t0:g}` is pure noise for {type(denoiser.schedule).__name__} (alpha = 0), where an "
            f"`{denoiser.prediction}` model gives no data prediction (x0 = (x - sigma eps) / alpha is 0/0). "
            "Start the grid where alpha > 0 (e.g. `jd.timesteps(s, n, t_start=0.999)`, or the schedule's "
            "default `t_max`), or use a model that predicts 'v', 'x0' or 'velocity'."
        )
    solver.check_pure_noise_start()


def integrate(
    denoiser: Denoiser,
    x_T,
    ts,
    solver: Solver,
    *,
    args: Any = None,
    key=None,
    return_trajectory: bool = False,
    scan: Scan = jax.lax.scan,
    noise=None,
):
    """The scan itself, without input checks; ``scan`` lets adjoints insert checkpointing."""
    num_steps = jnp.shape(ts)[0] - 1
    layout = solver.layout(num_steps)
    dtype = jnp.result_type(jnp.asarray(x_T).dtype, jnp.float32)
    coef = solver.coefficients(denoiser.schedule, jnp.asarray(ts, dtype=jnp.result_type(ts, float)))
    m, k = layout.num_evals, layout.history
    # rows where a noise-prediction solver stores x0 instead of eps (its steps from alpha = 0); a grid known
    # to start at alpha > 0 (the usual case) keeps the plain eps call, with no select in the loop
    switch = coef.use_x0 is not None and solver.prediction == "noise"
    if switch:
        alpha0 = _checks.eager(lambda: denoiser.schedule.alpha(jnp.asarray(ts)[0]))
        switch = alpha0 is None or alpha0 == 0

    rows = dict(
        t=coef.t,
        a=coef.anchor.astype(dtype),
        b=coef.y.astype(dtype),
        noise=coef.noise.astype(dtype),
    )
    rows |= {name: getattr(coef, name).astype(dtype) for name in ("mix", "offset") if getattr(coef, name) is not None}
    for name, lead in (("a", 2), ("b", 2), ("mix", 1), ("offset", 2)):
        r = rows.get(name)
        if r is not None and r.ndim > lead:  # per-coordinate rows (DPM-Solver-v3): explicit axes for the batch dims
            rows[name] = r.reshape(r.shape[:lead] + (1,) * (jnp.ndim(x_T) + lead - r.ndim) + r.shape[lead:])
    if switch:
        rows["use_x0"] = jnp.asarray(coef.use_x0, bool)
    brownian = None
    if solver.stochastic:
        from jaxdiff.brownian import BrownianNoise

        if coef.pre_noise is not None:
            rows["pre_noise"] = coef.pre_noise.astype(dtype)
        if isinstance(noise, BrownianNoise):
            brownian = noise
            rows["span"] = _noise_spans(denoiser.schedule, ts, layout, coef).astype(dtype)
        elif noise is not None:
            rows["z"] = jnp.asarray(noise, dtype)
        else:
            rows["key"] = jax.random.split(key, m)
    predict = denoiser.x0 if solver.prediction == "data" else denoiser.eps

    def combine(c, first, hist):
        out = c[0] * first
        for j in range(k):
            out = out + c[1 + j] * hist[j]
        return out

    def normal(row, y):
        if "z" in row:
            return row["z"]
        if brownian is not None:
            return brownian.increment(row["span"][0], row["span"][1], y.shape, dtype)
        return jax.random.normal(row["key"], y.shape, dtype)

    def body(carry, row):
        y, anchor, hist = carry
        if solver.stochastic:
            z = normal(row, y)
            if "pre_noise" in row:  # EDM churn: y <- scale y + std z before the evaluation
                y = row["pre_noise"][0] * y + row["pre_noise"][1] * z
        if switch:
            x0, eps = denoiser.x0_and_eps(y, row["t"], args)
            d = jnp.where(row["use_x0"], x0, eps).astype(dtype)
        else:
            d = predict(y, row["t"], args).astype(dtype)
        if "mix" in row:
            d = d + row["mix"] * y
        # lag order: the newest evaluation first (static shifts; no data-dependent indexing)
        hist = jnp.concatenate([d[None], hist[:-1]], axis=0)
        if layout.uses_anchor:
            anchor = combine(row["a"][1:], y, hist) + row["a"][0] * anchor
            if "offset" in row:
                anchor = anchor + row["offset"][0]
            y_new = combine(row["b"], anchor, hist)
        else:
            y_new = combine(row["b"], y, hist)
        if "offset" in row:
            y_new = y_new + row["offset"][1]
        if solver.stochastic:
            y_new = y_new + row["noise"] * z
        return (y_new, anchor, hist), (y_new if return_trajectory else None)

    y0 = jnp.asarray(x_T, dtype)
    hist0 = jnp.zeros((k,) + y0.shape, dtype)
    anchor0 = y0 if layout.uses_anchor else None
    (y, _, _), ys = scan(body, (y0, anchor0, hist0), rows)
    if not return_trajectory:
        return y
    ends = np.flatnonzero(np.asarray(layout.step_end))
    return y, jnp.concatenate([y0[None], ys[ends]], axis=0)


def _noise_spans(schedule, ts, layout, coef):
    """(M, 2) lambda intervals of each evaluation's Brownian increment: the solver's, or its grid step's."""
    if coef.noise_span is not None:
        return coef.noise_span
    step = np.concatenate([[0], np.cumsum(np.asarray(layout.step_end))[:-1]])  # grid step of each evaluation
    lam = schedule.lambda_(jnp.asarray(ts))
    return jnp.stack([lam[step], lam[step + 1]], axis=1)
