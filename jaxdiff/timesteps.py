"""Time grids: decreasing arrays of ``num_steps + 1`` times, from noise to data.

Continuous spacings (any schedule, between ``t_start`` and ``t_end``):

- ``"time"``: uniform in t; ``"quadratic"``: uniform in sqrt(t) (DPM-Solver's time_quadratic);
- ``"logsnr"``: uniform in lambda (DPM-Solver's logSNR);
- ``"karras"``: uniform in rho_t^(1/rho) with rho_t = sigma_t / alpha_t (Karras et al., 2022, rho = 7).

diffusers' discrete spacings (``VPDiscrete`` only; table entry n sits at t = (n + 1) / N):

- ``"linspace"``, ``"trailing"``: as in every diffusers scheduler;
- ``"leading"``: DPMSolver/UniPC rule, stride N // (num_steps + 1), timestep 0 dropped;
- ``"leading_ddim"``: DDIMScheduler's rule, stride N // num_steps, timestep 0 kept.

``final`` chooses the last point: ``"zero"`` ends at t = 0 (sigma = 0, diffusers'
``final_sigmas_type="zero"``), ``"sigma_min"`` at the table's end / ``t_end`` (DPM-Solver convention).
Continuous spacings default to ``"sigma_min"`` (ending at ``t_end``); discrete ones to ``"zero"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff._checks import all_concrete as _concrete
from jaxdiff.schedules import Schedule, VPDiscrete

__all__ = ["timesteps", "CONTINUOUS_SPACINGS", "DISCRETE_SPACINGS"]

CONTINUOUS_SPACINGS = ("time", "quadratic", "logsnr", "karras")
DISCRETE_SPACINGS = ("linspace", "leading", "leading_ddim", "trailing")
FINALS = ("zero", "sigma_min")


def _discrete_indices(num_train: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers' integer timesteps (decreasing, ``num_steps`` of them)."""
    n, k = num_train, num_steps
    if spacing == "linspace":
        idx = np.linspace(0, n - 1, k + 1).round()[::-1][:-1]
    elif spacing == "leading":
        idx = (np.arange(0, k + 1) * (n // (k + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "leading_ddim":
        idx = (np.arange(0, k) * (n // k)).round()[::-1] + steps_offset
    else:  # trailing
        idx = np.arange(n, 0, -n / k).round() - 1
    return idx.astype(np.int64)


def timesteps(
    schedule: Schedule,
    num_steps: int,
    spacing: str = "logsnr",
    *,
    t_start=None,
    t_end=None,
    final: str | None = None,
    rho: float = 7.0,
    steps_offset: int = 0,
):
    """A decreasing time grid of ``num_steps + 1`` points for ``schedule``.

    Args:
        schedule: the noise schedule.
        num_steps: number of solver steps (>= 1).
        spacing: one of ``CONTINUOUS_SPACINGS`` or (``VPDiscrete`` only) ``DISCRETE_SPACINGS``.
        t_start, t_end: interval for continuous spacings (default ``schedule.t_max``, ``schedule.t_min``).
        final: ``"zero"`` or ``"sigma_min"``; see the module docstring.
        rho: Karras exponent.
        steps_offset: diffusers' ``steps_offset`` for the ``leading`` spacings.

    Returns:
        Array of shape ``(num_steps + 1,)``, strictly decreasing.

    Example:
        >>> ts = timesteps(VPLinear(), 10, "logsnr")
        >>> ts.shape
        (11,)
    """
    # computed eagerly when the schedule and times are concrete, also while a jit traces: the grid is then a
    # constant that jd.sample can check and AdjointDPM / DPMSolverV3 can read
    with jax.ensure_compile_time_eval():
        return _grid(schedule, num_steps, spacing, t_start, t_end, final, rho, steps_offset)


def _grid(schedule, num_steps, spacing, t_start, t_end, final, rho, steps_offset):
    if not isinstance(schedule, Schedule):
        raise TypeError(f"`schedule` must be a jaxdiff Schedule (e.g. `jd.VPLinear()`), got {type(schedule).__name__}.")
    schedule.check_params()
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive Python int, got {num_steps!r}.")
    if final is not None and final not in FINALS:
        raise ValueError(f"Unknown `final={final!r}`; expected one of {FINALS}.")
    _checks.real_number("rho", rho, lo=0.0, lo_closed=False, hint="The Karras exponent, e.g. 7.")
    _checks.static_int("steps_offset", steps_offset, minimum=0, hint="diffusers' `steps_offset`, 0 or 1.")
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if value is not None:
            _checks.real_number(name, value, hint="A time of the schedule (t = 0 is clean data).")
    if spacing in DISCRETE_SPACINGS:
        if not isinstance(schedule, VPDiscrete):
            raise ValueError(
                f"`spacing={spacing!r}` is a diffusers discrete spacing and needs a `VPDiscrete` schedule, "
                f"got {type(schedule).__name__}. Use one of {CONTINUOUS_SPACINGS}."
            )
        n = schedule.num_train_steps
        idx = _discrete_indices(n, num_steps, spacing, steps_offset)
        last = 0.0 if (final or "zero") == "zero" else 1.0 / n
        ts = np.concatenate([(idx + 1.0) / n, [last]])
        if np.any(np.diff(ts) >= 0):
            raise ValueError(
                f"`spacing={spacing!r}` with {num_steps} steps on a {n}-entry table gives repeated times; "
                "use fewer steps or another spacing."
            )
        return jnp.asarray(ts, dtype=schedule.log_alphas.dtype)
    if spacing not in CONTINUOUS_SPACINGS:
        raise ValueError(f"Unknown `spacing={spacing!r}`; expected one of {CONTINUOUS_SPACINGS + DISCRETE_SPACINGS}.")

    t0 = jnp.asarray(schedule.t_max if t_start is None else t_start, dtype=float)
    t1 = jnp.asarray(schedule.t_min if t_end is None else t_end, dtype=float)
    # With final="zero" the spaced part has one interval fewer and a last step to t = 0 follows.
    intervals = num_steps - 1 if final == "zero" else num_steps
    u = jnp.linspace(0.0, 1.0, intervals + 1)
    if intervals == 0:
        ts = t0[None]
    elif spacing == "time":
        ts = t0 + u * (t1 - t0)
    elif spacing == "quadratic":
        ts = (jnp.sqrt(t0) + u * (jnp.sqrt(t1) - jnp.sqrt(t0))) ** 2
    elif spacing == "logsnr":
        l0, l1 = _finite_lambda(schedule, t0, t1)
        ts = schedule.t_of_lambda(l0 + u * (l1 - l0))
    else:  # karras, in rho = sigma / alpha = exp(-lambda)
        l0, l1 = _finite_lambda(schedule, t0, t1)
        r0, r1 = jnp.exp(-l0 / rho), jnp.exp(-l1 / rho)
        ts = schedule.t_of_lambda(-rho * jnp.log(r0 + u * (r1 - r0)))
    if intervals > 0:  # pin the ends exactly; the inverse maps are exact only to rounding
        ts = ts.at[0].set(t0).at[-1].set(t1)
    if final == "zero":
        ts = jnp.concatenate([ts, jnp.zeros((1,), ts.dtype)])
    # t_start/t_end outside the schedule, or t_end >= t_start, give a grid jd.sample would refuse: say it here
    return _checks.validate_grid(schedule, ts, "timesteps(...)", "Pass `t_end < t_start`, both inside the schedule.")


def _finite_lambda(schedule, t0, t1):
    """lambda at the grid ends; an infinite end (alpha = 0 at t = 1 for flows) is a clear error."""
    l0, l1 = schedule.lambda_(t0), schedule.lambda_(t1)
    if _concrete(l0, l1) and not (np.isfinite(float(l0)) and np.isfinite(float(l1))):
        raise ValueError(
            f"log-SNR is infinite at a grid end (lambda({float(t0)}) = {float(l0)}, lambda({float(t1)}) = {float(l1)}); "
            "choose `t_start`/`t_end` strictly inside the schedule, or use `spacing='time'`."
        )
    return l0, l1
