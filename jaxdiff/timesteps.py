"""Time grids: decreasing arrays of ``num_steps + 1`` times, from noise to data.

Continuous spacings (any schedule, between ``t_start`` and ``t_end``):

- ``"time"``: uniform in t; ``"quadratic"``: uniform in sqrt(t) (DPM-Solver's time_quadratic);
- ``"logsnr"``: uniform in lambda (DPM-Solver's logSNR);
- ``"karras"``: uniform in rho_t^(1/rho) with rho_t = sigma_t / alpha_t (Karras et al., 2022, rho = 7).

diffusers' discrete spacings (``VPDiscrete`` only; table entry n sits at t = (n + 1) / N):

- ``"linspace"``: DPMSolver/UniPC/DEIS rule, round(linspace(0, N - 1, num_steps + 1)) without its 0;
- ``"trailing"``: as in every diffusers scheduler;
- ``"leading"``: DPMSolver/UniPC/DEIS rule, stride N // (num_steps + 1), timestep 0 dropped;
- ``"leading_ddim"``: the rule of DDIM, PNDM, DDPM and the Euler family (Euler, Heun, LMS, EulerAncestral),
  stride N // num_steps, timestep 0 kept;
- ``"linspace_ddpm"``: DDPMScheduler's linspace, round(linspace(0, N - 1, num_steps)), timestep 0 kept;
- ``"linspace_sigmas"``: the linspace of the Euler family (``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``,
  ``LMSDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``; k-diffusion's ``DiscreteSchedule``):
  fractional indices linspace(0, N - 1, num_steps), at the noise levels diffusers interpolates linearly in
  the table of sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod). The grid points are the times where this
  schedule has exactly those noise levels (between table entries this schedule interpolates log alpha in t,
  so a real network receives a model time that differs from diffusers' fractional index by a fraction of one
  index; the noise levels, which the solver sees, are the same).

Flow matching (``RectifiedFlow`` only), ``"flow"``: diffusers' ``FlowMatchEulerDiscreteScheduler`` /
``FlowMatchHeunDiscreteScheduler`` grid. Unshifted times u = linspace(1, u_end, num_steps), then
``shift`` (SD3: t = shift u / (1 + (shift - 1) u)) or ``mu`` (dynamic shifting by resolution, the exponential
time shift t = e^mu / (e^mu + 1/u - 1), i.e. shift = e^mu), then a last point t = 0. As in diffusers, u_end is
the *shifted* 1 / ``num_train_timesteps`` with a static ``shift`` (the table end is shifted once in its
constructor and once more in ``set_timesteps``) and the unshifted one with ``mu``. ``flow_shift(mu=...)`` gives
FLUX's mu from an image sequence length.

``final`` chooses the last point: ``"zero"`` ends at t = 0 (sigma = 0, diffusers'
``final_sigmas_type="zero"``), ``"sigma_min"`` at the table's end / ``t_end`` (DPM-Solver convention).
Continuous spacings default to ``"sigma_min"`` (ending at ``t_end``); discrete ones and ``"flow"`` to ``"zero"``.

Zero-length final steps: jaxdiff grids are strictly decreasing, so diffusers' zero-length last steps are not
grid steps. They are identity steps that spend one model call, and the mapping drops them:

- PNDM / DDIM / DDPM with ``set_alpha_to_one=False`` and ``steps_offset=0`` end with a step from timestep 0 to
  ``alphas_cumprod[0]``, i.e. from t = 1/N to t = 1/N. ``final="sigma_min"`` on such a rule is refused (with this
  mapping); ``timesteps(s, n, "leading_ddim", final="zero")[:-1]`` is diffusers' grid without that step, and gives
  the same sample with one model call fewer. The Euler family's ``"linspace_sigmas"`` also ends at timestep 0.
- ``EDMEulerScheduler(final_sigmas_type="sigma_min")`` on n steps ends with a step from sigma_min to sigma_min:
  its grid is ``timesteps(jd.EDM(), n - 1, "karras")`` (Karras sigmas of n points, ending at sigma_min);
  ``final_sigmas_type="zero"`` is ``timesteps(jd.EDM(), n, "karras", final="zero")``.

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

__all__ = ["timesteps", "flow_shift", "CONTINUOUS_SPACINGS", "DISCRETE_SPACINGS", "FLOW_SPACINGS"]

CONTINUOUS_SPACINGS = ("time", "quadratic", "logsnr", "karras")
DISCRETE_SPACINGS = ("linspace", "leading", "leading_ddim", "trailing", "linspace_ddpm", "linspace_sigmas")
FLOW_SPACINGS = ("flow",)
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
    elif spacing == "linspace_ddpm":
        idx = np.linspace(0, n - 1, k).round()[::-1]
    else:  # trailing
        idx = np.arange(n, 0, -n / k).round() - 1
    return idx.astype(np.int64)


def timesteps(
    schedule: Schedule,
    num_steps: int,
    spacing: str | None = None,
    *,
    t_start=None,
    t_end=None,
    final: str | None = None,
    rho: float = 7.0,
    steps_offset: int = 0,
    shift: float | None = None,
    mu: float | None = None,
    num_train_timesteps: int = 1000,
):
    """A decreasing time grid of ``num_steps + 1`` points for ``schedule``.

    Args:
        schedule: the noise schedule.
        num_steps: number of solver steps (>= 1).
        spacing: one of ``CONTINUOUS_SPACINGS``, (``VPDiscrete`` only) ``DISCRETE_SPACINGS`` or
            (``RectifiedFlow`` only) ``"flow"``; see the module docstring. Default: the schedule's
            ``default_spacing`` ("quadratic" for the VP schedules, "karras" for EDM, "time" for RectifiedFlow,
            "logsnr" for VE), chosen by the measurements in ``benchmarks/results/digits_quality.md``.
        t_start, t_end: interval for continuous spacings (default ``schedule.t_max``, ``schedule.t_min``).
        final: ``"zero"`` or ``"sigma_min"``; see the module docstring.
        rho: Karras exponent.
        steps_offset: diffusers' ``steps_offset`` for the ``leading`` spacings.
        shift: ``"flow"`` only: SD3's static shift (> 0; diffusers' ``shift``, 3.0 for SD3). Default 1 (none).
        mu: ``"flow"`` only: dynamic shifting (diffusers' ``use_dynamic_shifting=True`` with ``mu``, exponential
            time shift); exclusive with ``shift``. See ``flow_shift``.
        num_train_timesteps: ``"flow"`` only: diffusers' ``num_train_timesteps`` (its table end is 1 / this).

    Returns:
        Array of shape ``(num_steps + 1,)``, strictly decreasing.

    Raises:
        ValueError: an unknown spacing or final, a spacing the schedule does not support, shift/mu without
            ``spacing="flow"``, or a discrete rule whose grid would repeat a time (a zero-length step; see the
            module docstring for the mapping of diffusers' zero-length final steps).

    Example:
        >>> ts = timesteps(VPLinear(), 10, "logsnr")
        >>> ts.shape
        (11,)
        >>> sd3 = timesteps(RectifiedFlow(), 28, "flow", shift=3.0)  # SD3's grid, from t = 1 to 0
    """
    # computed eagerly when the schedule and times are concrete, also while a jit traces: the grid is then a
    # constant that jd.sample can check and AdjointDPM / DPMSolverV3 can read
    with jax.ensure_compile_time_eval():
        return _grid(schedule, num_steps, spacing, t_start, t_end, final, rho, steps_offset, shift, mu,
                     num_train_timesteps)


def flow_shift(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
               max_shift: float = 1.15) -> float:
    """FLUX's ``mu`` for dynamic shifting: linear in the image sequence length (diffusers' ``calculate_shift``).

    mu = base_shift + (max_shift - base_shift) (image_seq_len - base_seq_len) / (max_seq_len - base_seq_len);
    pass it as ``timesteps(RectifiedFlow(), n, "flow", mu=mu)`` (the exponential shift, shift = e^mu).

    Args:
        image_seq_len: number of latent tokens, e.g. (height / 16) * (width / 16) for FLUX.
        base_seq_len, max_seq_len, base_shift, max_shift: FLUX's scheduler config (defaults are FLUX.1's).

    Returns:
        mu, a Python float.

    Example:
        >>> round(flow_shift(4096), 6)  # 1024 x 1024 FLUX
        1.15
    """
    _checks.static_int("image_seq_len", image_seq_len, minimum=1, hint="The number of latent tokens.")
    for name, value in (("base_seq_len", base_seq_len), ("max_seq_len", max_seq_len)):
        _checks.static_int(name, value, minimum=1)
    if max_seq_len == base_seq_len:
        raise ValueError(f"`max_seq_len` and `base_seq_len` are both {base_seq_len}; they must differ.")
    for name, value in (("base_shift", base_shift), ("max_shift", max_shift)):
        _checks.real_number(name, value)
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * slope + base_shift - slope * base_seq_len)


def _flow_grid(schedule, num_steps, final, shift, mu, num_train_timesteps, t_start, t_end):
    from jaxdiff.schedules import RectifiedFlow

    if not isinstance(schedule, RectifiedFlow):
        raise ValueError(
            f"`spacing='flow'` is diffusers' flow-matching grid and needs a `RectifiedFlow` schedule, got "
            f"{type(schedule).__name__}. Use one of {CONTINUOUS_SPACINGS}."
        )
    if shift is not None and mu is not None:
        raise ValueError(f"Pass one of `shift` (static, got {shift!r}) or `mu` (dynamic, got {mu!r}), not both.")
    if final not in (None, "zero"):
        raise ValueError(
            f"`spacing='flow'` ends at t = 0 as diffusers' flow schedulers do; got `final={final!r}`. "
            "Drop `final` (or pass 'zero'); to stop earlier, use `spacing='time'` with `t_end`."
        )
    if t_start is not None or t_end is not None:
        raise ValueError("`spacing='flow'` takes no `t_start`/`t_end`: it runs from t = 1 (shifted) to diffusers' "
                         "table end; pass `num_train_timesteps` to move that end.")
    _checks.static_int("num_train_timesteps", num_train_timesteps, minimum=2, hint="diffusers' `num_train_timesteps`.")
    if mu is not None:
        _checks.real_number("mu", mu, hint="The dynamic shift, e.g. `jd.flow_shift(image_seq_len)`.")

        def shifted(u):
            return np.exp(mu) / (np.exp(mu) + (1.0 / u - 1.0))

        u_end = 1.0 / num_train_timesteps
    else:
        shift = 1.0 if shift is None else shift
        _checks.real_number("shift", shift, lo=0.0, lo_closed=False, hint="SD3 uses 3.0; 1.0 is no shift.")

        def shifted(u):
            return shift * u / (1.0 + (shift - 1.0) * u)

        u_end = shifted(1.0 / num_train_timesteps)  # diffusers shifts its table end twice (module docstring)
    ts = np.concatenate([shifted(np.linspace(1.0, u_end, num_steps)), [0.0]])
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"`spacing='flow'` with {num_steps} steps gives repeated times; use fewer steps.")
    return jnp.asarray(ts, dtype=float)


def _sigma_times(schedule, idx):
    """Times where ``schedule`` has the noise levels diffusers interpolates at fractional indices ``idx``."""
    log_alphas = np.asarray(schedule.log_alphas, dtype=np.float64)
    # VE sigma = sqrt(1 - a) / sqrt(a) with a = alphas_cumprod, as diffusers' table; expm1 keeps small betas exact
    sigmas = np.sqrt(-np.expm1(2.0 * log_alphas)) / np.exp(log_alphas)
    sig = np.interp(idx, np.arange(sigmas.shape[0]), sigmas)
    return np.asarray(schedule.t_of_lambda(jnp.asarray(-np.log(sig))))


def _grid(schedule, num_steps, spacing, t_start, t_end, final, rho, steps_offset, shift, mu, num_train_timesteps):
    if not isinstance(schedule, Schedule):
        raise TypeError(f"`schedule` must be a jaxdiff Schedule (e.g. `jd.VPLinear()`), got {type(schedule).__name__}.")
    schedule.check_params()
    if spacing is None:
        spacing = schedule.default_spacing
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive Python int, got {num_steps!r}.")
    if final is not None and final not in FINALS:
        raise ValueError(f"Unknown `final={final!r}`; expected one of {FINALS}.")
    _checks.real_number("rho", rho, lo=0.0, lo_closed=False, hint="The Karras exponent, e.g. 7.")
    _checks.static_int("steps_offset", steps_offset, minimum=0, hint="diffusers' `steps_offset`, 0 or 1.")
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if value is not None:
            _checks.real_number(name, value, hint="A time of the schedule (t = 0 is clean data).")
    if spacing in FLOW_SPACINGS:
        return _flow_grid(schedule, num_steps, final, shift, mu, num_train_timesteps, t_start, t_end)
    if shift is not None or mu is not None:
        raise ValueError(f"`shift`/`mu` shift diffusers' flow-matching grid: pass `spacing='flow'` (got {spacing!r}).")
    if spacing in DISCRETE_SPACINGS:
        if not isinstance(schedule, VPDiscrete):
            raise ValueError(
                f"`spacing={spacing!r}` is a diffusers discrete spacing and needs a `VPDiscrete` schedule, "
                f"got {type(schedule).__name__}. Use one of {CONTINUOUS_SPACINGS}."
            )
        n = schedule.num_train_steps
        last = 0.0 if (final or "zero") == "zero" else 1.0 / n
        if spacing == "linspace_sigmas":
            if _checks.is_traced(schedule.log_alphas):
                raise ValueError("`spacing='linspace_sigmas'` interpolates the table's sigmas: build the grid from a "
                                 "concrete `VPDiscrete` (outside `jit`, or with the table as a constant).")
            idx = np.linspace(0, n - 1, num_steps)[::-1]
            ts = np.concatenate([_sigma_times(schedule, idx), [last]])
            ts[:-1][idx == 0] = 1.0 / n  # index 0 is a table entry: exact
        else:
            idx = _discrete_indices(n, num_steps, spacing, steps_offset)
            ts = np.concatenate([(idx + 1.0) / n, [last]])
        if final == "sigma_min" and ts[-2] == ts[-1]:
            raise ValueError(
                f"`spacing={spacing!r}` with `final='sigma_min'` ends with a zero-length step: its last timestep is "
                f"already the table's end (t = 1/{n}). diffusers takes that step as an identity (PNDM/DDIM with "
                "`set_alpha_to_one=False`); jaxdiff grids are strictly decreasing. Use "
                f"`jd.timesteps(s, {num_steps}, {spacing!r}, final='zero')[:-1]` (the same sample, one model call "
                "fewer), or `final='zero'` (`set_alpha_to_one=True`)."
            )
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
