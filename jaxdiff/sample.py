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

from jaxdiff.models import Denoiser
from jaxdiff.solvers.base import Solver

__all__ = ["sample", "nfe", "integrate"]

Scan = Callable  # (body, carry, xs) -> (carry, ys), with lax.scan's contract


def nfe(solver: Solver, ts_or_num_steps) -> int:
    """Model evaluations ``solver`` makes on a grid (an array of times or a number of steps)."""
    n = ts_or_num_steps if isinstance(ts_or_num_steps, int) else int(np.shape(ts_or_num_steps)[0]) - 1
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
):
    """Solve from ``x_T`` at ``ts[0]`` to ``ts[-1]``.

    Args:
        denoiser: a ``Denoiser`` (model, schedule, parameterization, guidance, thresholding).
        x_T: the starting point, any shape the model accepts (usually ``(batch, ...)``).
        ts: strictly decreasing times, shape ``(num_steps + 1,)`` (see ``jaxdiff.timesteps``).
        solver: any ``jaxdiff`` solver; default ``DPMSolverPP(order=2)``.
        args: pytree passed to the model as its third argument (parameters, conditioning).
        key: PRNG key, required by stochastic solvers.
        return_trajectory: also return the states at the grid points, shape ``(num_steps + 1, *x_T.shape)``.
        adjoint: how gradients flow: None (backpropagate through the scan), ``jaxdiff.Backprop(...)``
            or ``jaxdiff.AdjointDPM(...)``.

    Returns:
        The sample at ``ts[-1]`` (and the trajectory if asked). ``jaxdiff.nfe(solver, ts)`` model calls.

    Raises:
        ValueError: at trace time, for a non-decreasing grid, a grid too short for the order, a
            noise-prediction solver with thresholding, a missing key, or a model output whose
            shape differs from ``x_T``.

    Example:
        >>> den = jd.Denoiser(fn, jd.VPLinear(), "epsilon")  # doctest: +SKIP
        >>> x0 = jax.jit(lambda x: jd.sample(den, x, jd.timesteps(den.schedule, 10)))(x_T)  # doctest: +SKIP
    """
    if solver is None:
        from jaxdiff.solvers.dpm_solver import DPMSolverPP

        solver = DPMSolverPP()
    check_inputs(denoiser, x_T, ts, solver, args, key)
    if adjoint is not None:
        return adjoint.loop(denoiser, x_T, ts, solver, args=args, key=key, return_trajectory=return_trajectory)
    return integrate(denoiser, x_T, ts, solver, args=args, key=key, return_trajectory=return_trajectory)


def check_inputs(denoiser, x_T, ts, solver, args, key):
    """Trace-time validation with messages that say what to do."""
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"`denoiser` must be a `jaxdiff.Denoiser`, got {type(denoiser).__name__}.")
    if not isinstance(solver, Solver):
        raise ValueError(f"`solver` must be a jaxdiff solver (e.g. `jd.DPMSolverPP()`), got {type(solver).__name__}.")
    if jnp.ndim(ts) != 1 or jnp.shape(ts)[0] < 2:
        raise ValueError(f"`ts` must be a 1-D array of at least 2 times, got shape {jnp.shape(ts)}.")
    num_steps = jnp.shape(ts)[0] - 1
    try:
        concrete = np.asarray(ts)
    except Exception:  # traced grid: monotonicity cannot be checked here
        concrete = None
    if concrete is not None and not np.all(np.diff(concrete) < 0):
        raise ValueError(
            f"`ts` must be strictly decreasing (from noise to data); got {concrete.tolist()[:6]}"
            f"{'...' if concrete.size > 6 else ''}. Build grids with `jaxdiff.timesteps`."
        )
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
    if solver.stochastic and key is None:
        raise ValueError(f"`{type(solver).__name__}` is stochastic: pass `key=jax.random.key(...)`.")
    solver.check_state(x_T)
    out = jax.eval_shape(lambda x, a: denoiser.raw(x, jnp.asarray(ts)[0], a), x_T, args)
    if out.shape != jnp.shape(x_T):
        raise ValueError(f"The model returned shape {out.shape} for `x_T` of shape {jnp.shape(x_T)}.")


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
):
    """The scan itself, without input checks; ``scan`` lets adjoints insert checkpointing."""
    num_steps = jnp.shape(ts)[0] - 1
    layout = solver.layout(num_steps)
    dtype = jnp.result_type(jnp.asarray(x_T).dtype, jnp.float32)
    coef = solver.coefficients(denoiser.schedule, jnp.asarray(ts, dtype=jnp.result_type(ts, float)))
    m, k = layout.num_evals, layout.history

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
    if solver.stochastic:
        rows["key"] = jax.random.split(key, m)
    predict = denoiser.x0 if solver.prediction == "data" else denoiser.eps

    def combine(c, first, hist):
        out = c[0] * first
        for j in range(k):
            out = out + c[1 + j] * hist[j]
        return out

    def body(carry, row):
        y, anchor, hist = carry
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
            y_new = y_new + row["noise"] * jax.random.normal(row["key"], y.shape, dtype)
        return (y_new, anchor, hist), (y_new if return_trajectory else None)

    y0 = jnp.asarray(x_T, dtype)
    hist0 = jnp.zeros((k,) + y0.shape, dtype)
    anchor0 = y0 if layout.uses_anchor else None
    (y, _, _), ys = scan(body, (y0, anchor0, hist0), rows)
    if not return_trajectory:
        return y
    ends = np.flatnonzero(np.asarray(layout.step_end))
    return y, jnp.concatenate([y0[None], ys[ends]], axis=0)
