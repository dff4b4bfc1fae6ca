"""The probability-flow ODE as a diffrax term, in the variables where it is gentle.

In diffusion time t the probability-flow ODE, dx/dt = (dlog alpha/dt) x + (sigma dlambda/dt ...) eps, has a
1/sigma_t factor that is stiff near the data end. Two changes of variables remove it (Lu et al., 2022,
DPM-Solver, arXiv:2206.00927, and DPM-Solver++, arXiv:2211.01095; Zhang & Chen, 2023, DEIS,
arXiv:2204.13902); this module offers both as a ``diffrax.ODETerm`` so that diffrax's adaptive solvers,
step-size controllers and adjoints run on them:

- ``form="data"`` (DPM-Solver++'s variables): ODE time s = lambda = log(alpha/sigma) (increasing towards the
  data), state y = x / sigma, and

      dy/dlambda = e^lambda x0_hat(sigma y, t(lambda)).

- ``form="noise"`` (DDIM's / DEIS's variables): ODE time s = rho = sigma/alpha (decreasing towards the data;
  diffrax integrates backwards when t1 < t0), state y = x / alpha, and

      dy/drho = eps_hat(alpha y, t(rho)).

In both, a constant model output is integrated exactly by one Euler step (Euler in these variables *is* DDIM),
and the field varies only as fast as the model's prediction does. ``time``/``t_of`` convert diffusion time to
ODE time and back, ``to_state``/``from_state`` convert x to y and back, and ``solve`` runs the whole thing:

    term = jd.ode.term(den)                                   # form="data"
    s0, s1 = jd.ode.time(sched, t_start), jd.ode.time(sched, t_end)
    sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), s0, s1, None, jd.ode.to_state(sched, x_T, t_start),
                              args=params, stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5))
    x0 = jd.ode.from_state(sched, sol.ys[-1], t_end)

Neither variable reaches alpha = 0 or sigma = 0 (lambda is infinite there): solve between times where both are
positive (e.g. ``schedule.t_max`` and ``schedule.t_min``). diffrax is imported on use; the rest of jaxdiff does
not need it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import _checks
from jaxdiff.models import Denoiser
from jaxdiff.schedules import Schedule

__all__ = ["FORMS", "Field", "term", "time", "t_of", "to_state", "from_state", "solve", "ODESolution"]

#: the ODE formulations ``term`` builds
FORMS = ("data", "noise")


def _check_form(form) -> str:
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(
            f"`form` must be one of {FORMS} ('data': y = x/sigma in lambda with the data prediction; 'noise': "
            f"y = x/alpha in rho = sigma/alpha with the noise prediction), got {form!r}."
        )
    return form


def _check_schedule(schedule) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"`schedule` must be a jaxdiff Schedule (e.g. `jd.VPLinear()`), got {_checks.show(schedule)}.")
    return schedule


def time(schedule: Schedule, t, form: str = "data"):
    """ODE time of diffusion time ``t``: lambda(t) for ``form="data"``, rho(t) = sigma_t/alpha_t for ``"noise"``.

    Args:
        schedule: the noise schedule.
        t: diffusion time(s), any shape.
        form: ``"data"`` or ``"noise"`` (see the module docstring).

    Returns:
        The ODE time, shape of ``t``.

    Example:
        >>> float(jd.ode.time(jd.EDM(), 2.0, "noise"))
        2.0
    """
    _check_schedule(schedule)
    lam = schedule.lambda_(t)
    return lam if _check_form(form) == "data" else jnp.exp(-lam)


def t_of(schedule: Schedule, s, form: str = "data"):
    """Diffusion time of ODE time ``s`` (the inverse of ``time``).

    Example:
        >>> s = jd.VPLinear()
        >>> round(float(jd.ode.t_of(s, jd.ode.time(s, 0.3))), 12)
        0.3
    """
    _check_schedule(schedule)
    lam = s if _check_form(form) == "data" else -jnp.log(s)
    return schedule.t_of_lambda(lam)


def _scale(schedule: Schedule, t, form: str):
    """The factor with x = factor * y: sigma_t (data form) or alpha_t (noise form)."""
    return schedule.sigma(t) if form == "data" else schedule.alpha(t)


def to_state(schedule: Schedule, x, t, form: str = "data"):
    """The ODE state of ``x`` at diffusion time ``t`` (a scalar): y = x / sigma_t (``"data"``) or x / alpha_t.

    Example:
        >>> float(jd.ode.to_state(jd.EDM(), jnp.asarray(4.0), 2.0))
        2.0
    """
    _check_form(form)
    _check_schedule(schedule)
    x = jnp.asarray(x)
    return x / _scale(schedule, t, form).astype(x.dtype)


def from_state(schedule: Schedule, y, t, form: str = "data"):
    """``x`` from the ODE state ``y`` at diffusion time ``t`` (a scalar): x = sigma_t y (``"data"``) or alpha_t y.

    Example:
        >>> float(jd.ode.from_state(jd.EDM(), jnp.asarray(2.0), 2.0))
        4.0
    """
    _check_form(form)
    _check_schedule(schedule)
    y = jnp.asarray(y)
    return _scale(schedule, t, form).astype(y.dtype) * y


class Field(struct.PyTreeNode):
    """The probability-flow vector field ``(s, y, args) -> dy/ds`` in ODE time s (see the module docstring).

    A pytree: the denoiser's arrays (schedule parameters, guidance scale) are its leaves, so diffrax's adjoints
    differentiate through them like through ``args``. They are kept flat (with the denoiser's static tree
    structure) because diffrax and equinox rebuild terms with placeholder leaves, which a ``Denoiser``'s
    constructor checks would refuse. ``unpack_args`` (static) maps diffrax's ``args`` to the model's third
    argument; ``reference_solve`` uses it to pass a leaf shared by both halves of a CFG pair once.
    """

    leaves: tuple
    treedef: Any = struct.field(pytree_node=False)
    form: str = struct.field(pytree_node=False, default="data")
    unpack_args: Callable | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def of(cls, denoiser: Denoiser, form: str = "data", unpack_args: Callable | None = None) -> "Field":
        leaves, treedef = jax.tree.flatten(denoiser)
        return cls(tuple(leaves), treedef, form, unpack_args)

    @property
    def denoiser(self) -> Denoiser:
        return jax.tree.unflatten(self.treedef, self.leaves)

    def __call__(self, s, y, args):
        model_args = args if self.unpack_args is None else self.unpack_args(args)
        denoiser = self.denoiser
        sched = denoiser.schedule
        dtype = y.dtype
        if self.form == "data":
            t = sched.t_of_lambda(s)
            x0 = denoiser.x0(sched.sigma(t).astype(dtype) * y, t, model_args)
            return jnp.exp(s).astype(dtype) * x0.astype(dtype)
        t = sched.t_of_lambda(-jnp.log(s))
        return denoiser.eps(sched.alpha(t).astype(dtype) * y, t, model_args).astype(dtype)


def term(denoiser: Denoiser, form: str = "data", *, unpack_args: Callable | None = None):
    """The probability-flow ODE of ``denoiser`` as a ``diffrax.ODETerm`` in ODE time (lambda or rho).

    Args:
        denoiser: a ``jaxdiff.Denoiser`` (its model receives diffrax's ``args`` as its third argument).
        form: ``"data"`` (y = x/sigma, time lambda, data prediction; DPM-Solver++'s form) or ``"noise"``
            (y = x/alpha, time rho = sigma/alpha, noise prediction; DDIM's form).
        unpack_args: optional static, hashable function from diffrax's ``args`` to the model's ``args``.

    Returns:
        ``diffrax.ODETerm(Field.of(denoiser, form))``; integrate it from ``time(schedule, t_start, form)`` to
        ``time(schedule, t_end, form)`` starting at ``to_state(schedule, x_T, t_start, form)``.

    Raises:
        ValueError: ``form`` is not one of ``FORMS``.
        TypeError: ``denoiser`` is not a ``jaxdiff.Denoiser``.

    Example:
        >>> import diffrax
        >>> s = jd.VPLinear(); gd = jd.testing.GaussianData(jnp.zeros(2), jnp.ones(2))
        >>> sol = diffrax.diffeqsolve(jd.ode.term(gd.denoiser(s)), diffrax.Tsit5(), jd.ode.time(s, 1.0),
        ...                           jd.ode.time(s, 1e-3), 0.5, jnp.ones(2), args=gd)
        >>> sol.ys.shape
        (1, 2)
    """
    import diffrax  # imported on use: the rest of jaxdiff does not need it

    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"`denoiser` must be a `jaxdiff.Denoiser`, got {_checks.show(denoiser)}.")
    return diffrax.ODETerm(Field.of(denoiser, _check_form(form), unpack_args))


class ODESolution(NamedTuple):
    """Result of ``solve``."""

    x: jax.Array  # shape of x_T: the solution at t_end
    nfe: jax.Array  # shape=(), int: model evaluations of the forward solve (rejected steps included)
    num_steps: jax.Array  # shape=(), int: accepted plus rejected steps
    num_accepted_steps: jax.Array  # shape=(), int


def _evals_per_step(solver) -> tuple[int, int]:
    """(new model evaluations per step, extra evaluations once) for diffrax's explicit Runge-Kutta solvers."""
    import diffrax

    if isinstance(solver, diffrax.Euler):
        return 1, 0
    if not isinstance(solver, diffrax.AbstractERK):
        raise ValueError(
            f"`solver` must be one of diffrax's explicit Runge-Kutta solvers (Euler, Heun, Midpoint, Ralston, Bosh3, "
            f"Tsit5, Dopri5, Dopri8), got {type(solver).__name__}. For other diffrax solvers call "
            "`diffrax.diffeqsolve(jd.ode.term(denoiser), ...)` directly."
        )
    tableau = solver.tableau
    stages = len(tableau.c) + 1
    fsal = bool(tableau.fsal)
    return (stages - 1, 1) if fsal else (stages, 0)


def solve(
    denoiser: Denoiser,
    x_T,
    t_start,
    t_end,
    *,
    solver: Any = None,
    form: str = "data",
    args: Any = None,
    num_steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    adjoint: Any = None,
    max_steps: int = 4096,
) -> ODESolution:
    """Solve the probability-flow ODE with a diffrax solver in ODE time, from ``x_T`` at ``t_start`` to ``t_end``.

    With ``num_steps`` the steps are uniform in ODE time (uniform in lambda, i.e. a logSNR grid, for
    ``form="data"``); without, diffrax's ``PIDController(rtol, atol)`` on y picks them, starting from a step of
    1/64 of the interval.

    Args:
        denoiser: a ``jaxdiff.Denoiser``.
        x_T: the state at ``t_start``, any shape the model takes.
        t_start, t_end: diffusion times with 0 < sigma and 0 < alpha at both ends (finite lambda).
        solver: a diffrax explicit Runge-Kutta solver; default ``diffrax.Tsit5()``.
        form: ``"data"`` or ``"noise"`` (see ``term``).
        args: the model's third argument.
        num_steps: fixed steps (``ConstantStepSize``); None for adaptive steps.
        rtol, atol: the step-size controller's tolerances on y (adaptive only).
        adjoint: a diffrax adjoint; default ``diffrax.RecursiveCheckpointAdjoint()``. ``BacksolveAdjoint()``
            differentiates with respect to ``x_T``, ``args`` and the model inside the denoiser, but not the
            schedule's parameters (the ODE-time endpoints lambda(t_start), lambda(t_end) depend on them, and it
            takes no gradient through t0/t1).
        max_steps: diffrax's step limit.

    Returns:
        ``ODESolution(x, nfe, num_steps, num_accepted_steps)``; ``nfe`` counts the evaluations of the forward
        solve from the solver's tableau (first-same-as-last accounted for; rejected steps included).

    Raises:
        ValueError: unknown ``form``, a non-Runge-Kutta ``solver``, ``num_steps < 1``, or (for concrete times)
            ``t_end >= t_start`` or an infinite lambda at either end.

    Example:
        >>> s = jd.VPLinear(); gd = jd.testing.GaussianData(jnp.zeros(2), jnp.ones(2))
        >>> jd.ode.solve(gd.denoiser(s), jnp.ones((1, 2)), 1.0, 1e-3, args=gd).x.shape
        (1, 2)
    """
    import diffrax

    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"`denoiser` must be a `jaxdiff.Denoiser`, got {_checks.show(denoiser)}.")
    _check_form(form)
    solver = diffrax.Tsit5() if solver is None else solver
    per_step, extra = _evals_per_step(solver)
    if num_steps is not None and (not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool)
                                  or num_steps < 1):
        raise ValueError(_checks.message("num_steps", num_steps, "None or an integer >= 1",
                                         "Pass None for adaptive steps."))
    _checks.float_array("x_T", x_T)
    sched = denoiser.schedule
    dtype = jnp.result_type(jnp.asarray(x_T).dtype, jnp.float32)
    t0, t1 = jnp.asarray(t_start, dtype), jnp.asarray(t_end, dtype)
    lam0, lam1 = sched.lambda_(t0), sched.lambda_(t1)
    if _checks.all_concrete(t0, t1, lam0, lam1):
        if not float(t1) < float(t0):
            raise ValueError(f"`t_end` must be smaller than `t_start` (noise to data), got t_start={float(t0)}, "
                             f"t_end={float(t1)}.")
        if not (np.isfinite(float(lam0)) and np.isfinite(float(lam1))):
            raise ValueError(
                f"log-SNR must be finite at both ends, got lambda(t_start={float(t0)}) = {float(lam0)} and "
                f"lambda(t_end={float(t1)}) = {float(lam1)}. The ODE in lambda or rho cannot reach sigma = 0 or "
                "alpha = 0: solve between `schedule.t_max` and `schedule.t_min`."
            )
    s0, s1 = time(sched, t0, form).astype(dtype), time(sched, t1, form).astype(dtype)
    y0 = to_state(sched, jnp.asarray(x_T, dtype), t0, form)
    if num_steps is None:
        controller = diffrax.PIDController(rtol=jnp.asarray(rtol, dtype), atol=jnp.asarray(atol, dtype))
        dt0 = (s1 - s0) / 64.0
    else:
        controller = diffrax.ConstantStepSize()
        # a hair longer than the interval / n: the last step is clipped to s1 (exactly n steps, no sliver)
        dt0 = (s1 - s0) / num_steps * (1 + 1e-9)
        max_steps = num_steps
    kwargs = {} if adjoint is None else {"adjoint": adjoint}
    sol = diffrax.diffeqsolve(term(denoiser, form), solver, s0, s1, dt0, y0, args=args,
                              stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True), max_steps=max_steps,
                              **kwargs)
    steps = sol.stats["num_steps"]
    return ODESolution(from_state(sched, sol.ys[0], t1, form), per_step * steps + extra, steps,
                       sol.stats["num_accepted_steps"])
