"""Parity of jaxdiff's solvers with diffusers' schedulers (issue 2, acceptance item 2).

Both sides sample the same analytic model: a 2-D Gaussian mixture (``jaxdiff.testing.GaussianMixture``)
under a 1000-step DDPM beta table (``linear`` 1e-4..0.02 and Stable Diffusion's ``scaled_linear``
0.00085..0.012), from the same ``x_T`` (16 x 2). The diffusers-side model is a NumPy function of
(sample, integer timestep) that computes the exact epsilon or v prediction in float64 from the same
alphas_cumprod table ours uses (float64, built from diffusers' float32 betas) and returns float32,
as a diffusers UNet would. Ours runs in float64: ``VPDiscrete(betas)`` with the grid from
``jaxdiff.timesteps(schedule, n, spacing, final=...)``. diffusers keeps its sigmas and step
arithmetic in float32, so the tolerance is float32-sized: max |ours - diffusers| / max |diffusers|
<= 1e-5 on the final sample.

What the comparison showed (diffusers 0.42), and how jaxdiff maps it:

- Timestep spacings. ``"linspace"`` and ``"trailing"`` are the same rule in every scheduler.
  ``"leading"`` is not: DPMSolverMultistep/Singlestep and UniPC stride N // (n + 1) and drop timestep 0
  (10 steps: 900, 810, ..., 90); DDIMScheduler strides N // n and keeps 0 (900, 800, ..., 0). jaxdiff
  names them ``"leading"`` and ``"leading_ddim"``; both add ``steps_offset`` (Stable Diffusion uses 1).
  DPMSolverSinglestepScheduler has no ``timestep_spacing`` option (always linspace); it is fed the
  other grids through ``set_timesteps(timesteps=...)``.
- DDIMScheduler steps from t to t - N // n, which is not the next timestep of its own list unless the
  list has that stride: true for ``leading`` (and ``trailing`` when n divides N), false for
  ``linspace`` (10 steps: 999 -> 899 while the next model call is at 888; the sample is evaluated at a
  noise level it is not at). That is a diffusers quirk, not a time grid; it is reproduced here by
  chaining one-step ``DDIM`` solves t -> t - N // n, each starting at the next listed timestep.
- ``lower_order_final``: diffusers' DPMSolverMultistep applies it only below 15 steps, the official
  DPM-Solver code below 10 (its docstring says 15). ``DPMSolverPP(lower_order_final=15)`` (the default)
  is diffusers' gate, ``10`` the official code's, ``True``/``False`` ungated. diffusers' singlestep
  scheduler and UniPC apply it ungated (``True`` in jaxdiff). With ``final_sigmas_type="zero"`` the last
  step is first order whatever the flag, in both.
- DPM-Solver++ 3M: diffusers uses D2 = (D1_0 - D1_1)/(r0 + r1), half the second-derivative term its
  phi_3 coefficient needs (second order overall). ``third_order="reference"`` matches it;
  the default ``"corrected"`` is the true third-order method and differs from diffusers.
- UniPC ``bh1`` with ``final_sigmas_type="zero"``: diffusers returns NaN. Its last (first-order) step
  computes x_t - alpha_t B(h) * 0 with B(h) = -h = -inf. jaxdiff treats the step into sigma = 0 as the
  exact limit (x0 prediction) and is finite; it matches the value diffusers' own final update has when
  the 0 * inf is removed.
- sigma_min final with higher-order last steps: diffusers' final sigma,
  sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0]), is computed from float32 1 - 1e-4, which
  loses ~4 digits; where the last step is of order >= 2 its 1/r0-weighted differences amplify that.
  Those cases are checked against diffusers run with float64 sigmas (see ``_diffusers_sample``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.solvers.base import Layout, Solver

pytestmark = pytest.mark.reference("torch", "diffusers")

TOL = 1e-5
NUM_TRAIN = 1000
WEIGHTS = np.array([0.3, 0.5, 0.2])
MEANS = np.array([[-1.5, 0.5], [1.0, 1.2], [0.5, -1.8]])
SCALES = np.array([0.3, 0.5, 0.4])
BETAS = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
}
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}  # diffusers name -> jaxdiff name


def _x_T():
    return np.random.default_rng(0).standard_normal((16, 2))


@functools.lru_cache(maxsize=None)
def _table(beta: str):
    """(float32 betas as diffusers builds them, our schedule, float64 alphas_cumprod of our schedule)."""
    from diffusers import DDPMScheduler

    betas = DDPMScheduler(num_train_timesteps=NUM_TRAIN, **BETAS[beta]).betas.numpy()
    schedule = jd.VPDiscrete(jnp.asarray(betas, jnp.float64))
    alphas_cumprod = np.exp(2.0 * np.asarray(schedule.log_alphas))
    return betas, schedule, alphas_cumprod


def _gm():
    return jd.testing.GaussianMixture(jnp.asarray(WEIGHTS), jnp.asarray(MEANS), jnp.asarray(SCALES))


def _exact(x, alphas_cumprod_t, prediction):
    """Exact eps or v of the mixture at noise level alphas_cumprod_t, in float64 NumPy."""
    a, s = np.sqrt(alphas_cumprod_t), np.sqrt(1.0 - alphas_cumprod_t)
    c = a**2 * SCALES**2 + s**2
    diff = x[:, None, :] - a * MEANS
    logp = np.log(WEIGHTS) - 0.5 * np.sum(diff**2, -1) / c - 0.5 * MEANS.shape[1] * np.log(c)
    resp = np.exp(logp - logp.max(-1, keepdims=True))
    resp /= resp.sum(-1, keepdims=True)
    eps = s * np.sum(resp[..., None] * diff / c[:, None], axis=-2)
    x0 = np.sum(resp[..., None] * (MEANS + (a * SCALES**2 / c)[:, None] * diff), axis=-2)
    return eps if prediction == "epsilon" else a * eps - s * x0


def _diffusers_sample(scheduler, beta, prediction, *, float64_sigmas=False, final_x0=False, **step_kwargs):
    """Run a diffusers scheduler loop (after ``set_timesteps``) with the exact model.

    float64_sigmas: replace the scheduler's float32 sigmas by float64 ones from the same table (the
        sample is still rounded to float32 between steps), to separate diffusers' float32 schedule
        arithmetic from the algorithm.
    final_x0: for the last step into sigma = 0, return the x0 prediction, i.e. the value of the
        first-order update sigma_t/sigma_s x - alpha_t (e^{-h} - 1) x0 at sigma_t = 0, h = inf
        (diffusers evaluates it as 0 * inf for UniPC bh1).
    """
    import torch

    _, _, alphas_cumprod = _table(beta)
    if float64_sigmas:
        sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
        timesteps = scheduler.timesteps.numpy()
        last = 0.0 if float(scheduler.sigmas[-1]) == 0 else sigmas[0]
        scheduler.sigmas = torch.from_numpy(np.concatenate([sigmas[timesteps], [last]]))
    x = torch.from_numpy(_x_T().astype(np.float32))
    timesteps = list(scheduler.timesteps)
    for i, t in enumerate(timesteps):
        out = torch.from_numpy(_exact(x.double().numpy(), alphas_cumprod[int(t)], prediction).astype(np.float32))
        if final_x0 and i == len(timesteps) - 1:
            # the x0 prediction diffusers' last step would return (before its step index advances)
            x = scheduler.convert_model_output(out, sample=x)
        else:
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x.double().numpy()


class _Precomputed(Solver):
    """Coefficient rows computed by a jaxdiff solver outside ``jit``, padded to one fixed layout.

    Compiling the driver once per solver configuration would dominate this module's run time, so
    every configuration is run through one compiled ``jd.integrate`` of ``_M`` evaluations, a
    ``_K``-slot history and an anchor: lag columns a solver does not use are zero, a solver without
    anchor gets anchor' = y (so base = y as before), and rows past its last evaluation leave y
    unchanged (their evaluations at t = 1/2 are finite and only ever multiplied by zero). This is an
    exact identity on the solver's scheme; ``test_padded_runs_equal_public_sample`` checks it against
    ``jd.sample``.
    """

    stochastic = False

    def __init__(self, prediction, coef):
        self.prediction, self._coef = prediction, coef

    def layout(self, num_steps):
        return Layout(num_evals=_M, history=_K, uses_anchor=True, step_end=(True,) * _M)

    def coefficients(self, schedule, ts):
        return self._coef


_M, _K = 24, 5  # K = 5: PNDM('PLMS-diffusers') keeps its improved-Euler predictor's slot


def _pad(coef, layout):
    m, k = layout.num_evals, layout.history
    if not layout.uses_anchor:  # anchor' = y
        coef = coef._replace(anchor=jnp.zeros((m, 2 + k), coef.y.dtype).at[:, 1].set(1.0))
    identity_a = jnp.zeros((_M - m, 2 + _K), coef.y.dtype).at[:, 1].set(1.0)
    identity_y = jnp.zeros((_M - m, 1 + _K), coef.y.dtype).at[:, 0].set(1.0)
    return coef._replace(
        t=jnp.concatenate([coef.t, jnp.full((_M - m,), 0.5, coef.t.dtype)]),
        anchor=jnp.concatenate([jnp.pad(coef.anchor, ((0, 0), (0, _K - k))), identity_a]),
        y=jnp.concatenate([jnp.pad(coef.y, ((0, 0), (0, _K - k))), identity_y]),
        noise=jnp.zeros((_M,), coef.y.dtype),
        use_x0=None if coef.use_x0 is None else jnp.concatenate([coef.use_x0, jnp.zeros((_M - m,), bool)]),
    )


@functools.partial(jax.jit, static_argnames=("prediction", "model_prediction"))
def _integrate(coef, schedule, x_T, gm, *, prediction, model_prediction):
    solver = _Precomputed(prediction, coef)
    ts = jnp.zeros((_M + 1,))  # unused: the coefficients are given
    return jd.integrate(gm.denoiser(schedule, model_prediction), x_T, ts, solver, args=gm)


def _ours(solver, beta, prediction, ts, x_T=None):
    """Our sample from ``x_T`` (default ``_x_T()``): ``solver``'s coefficients on ``ts``, run by ``jd.integrate``."""
    _, schedule, _ = _table(beta)
    ts = jnp.asarray(ts, jnp.float64)
    layout = solver.layout(ts.shape[0] - 1)
    assert layout.num_evals <= _M and layout.history <= _K and not solver.stochastic
    coef = _coefficients(solver, beta, tuple(np.asarray(ts).tolist()))
    out = _integrate(
        coef, schedule, jnp.asarray(_x_T() if x_T is None else x_T), _gm(), prediction=solver.prediction, model_prediction=PREDICTIONS[prediction]
    )
    return np.asarray(out)


@functools.lru_cache(maxsize=None)
def _coefficients(solver, beta, ts):
    """Padded coefficient rows (cached: epsilon and v runs on one grid share them)."""
    _, schedule, _ = _table(beta)
    ts = jnp.asarray(ts, jnp.float64)
    return _pad(solver.coefficients(schedule, ts), solver.layout(ts.shape[0] - 1))


def _grid(beta, n, spacing, final, steps_offset=0):
    _, schedule, _ = _table(beta)
    return jd.timesteps(schedule, n, spacing, final=final, steps_offset=steps_offset)


def _rel(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _bases(flip: bool):
    """(beta, prediction, spacing) cases: the three spacings, each with both predictions, on alternating
    beta tables; ``flip`` swaps the tables, so over a parametrization every pair is covered while each
    test computes only three coefficient tables (eager coefficient code dominates this module's time)."""
    betas = ["linear", "scaled_linear", "linear"]
    if flip:
        betas = ["scaled_linear", "linear", "scaled_linear"]
    return [(b, p, s) for b, s in zip(betas, ("linspace", "leading", "trailing")) for p in PREDICTIONS]


def _parity(ours, new_scheduler, beta, prediction, *, float32_limited=False, **step_kwargs):
    """(ok, message) for ours against diffusers; ``new_scheduler()`` returns one with timesteps set.

    Against diffusers' float32 run the bound is ``TOL``. Where diffusers' float32 final sigma is the
    error (``float32_limited``: sigma_min final reached by a step of order >= 2), ours must be within
    ``TOL`` of diffusers run with float64 sigmas, and within TOL + (diffusers' own float32 error) of
    its float32 run.
    """
    ref32 = _diffusers_sample(new_scheduler(), beta, prediction, **step_kwargs)
    r32 = _rel(ours, ref32)
    if not float32_limited:
        return r32 <= TOL, f"rel {r32:.2e}"
    ref64 = _diffusers_sample(new_scheduler(), beta, prediction, float64_sigmas=True, **step_kwargs)
    r64, own = _rel(ours, ref64), _rel(ref64, ref32)
    return r64 <= TOL and r32 <= own + TOL, f"rel {r32:.2e} (float64 sigmas {r64:.2e}; diffusers f32 vs f64 {own:.2e})"


def _assert_all(results):
    bad = [f"{case}: {msg}" for case, (ok, msg) in results if not ok]
    assert not bad, "differs from diffusers beyond tolerance:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------
# Time grids


@pytest.mark.parametrize("n", [10, 16])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_grids_match_diffusers(n, steps_offset, final):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    _, schedule, alphas_cumprod = _table("scaled_linear")
    cfg = dict(num_train_timesteps=NUM_TRAIN, steps_offset=steps_offset, **BETAS["scaled_linear"])
    for spacing in ("linspace", "leading", "trailing"):
        ts = _grid("scaled_linear", n, spacing, final, steps_offset)
        idx = np.round(np.asarray(ts[:-1]) * NUM_TRAIN - 1).astype(int)
        for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
            sch = cls(timestep_spacing=spacing, final_sigmas_type=final, **cfg)
            sch.set_timesteps(n)
            np.testing.assert_array_equal(idx, sch.timesteps.numpy(), err_msg=f"{cls.__name__} {spacing}")
            # the same noise levels, to float32 precision (the last, sigma_min = sqrt(beta_0) roughly,
            # is computed by diffusers from float32 1 - beta_0 and carries ~1e-4 relative error)
            ours_sigma = np.asarray(jnp.exp(-schedule.lambda_(ts)))
            np.testing.assert_allclose(ours_sigma[:-1], sch.sigmas.numpy()[:-1], rtol=2e-5)
            np.testing.assert_allclose(ours_sigma[-1], sch.sigmas.numpy()[-1], rtol=1e-3, atol=0)
        if spacing == "linspace":
            continue  # DDIM's linspace steps are not a grid (module docstring); see test_ddim_linspace_quirk
        ddim = DDIMScheduler(timestep_spacing=spacing, **cfg)
        ddim.set_timesteps(n)
        ours_spacing = "leading_ddim" if spacing == "leading" else spacing
        ddim_idx = np.round(np.asarray(_grid("scaled_linear", n, ours_spacing, "zero", steps_offset)[:-1]) * NUM_TRAIN - 1)
        np.testing.assert_array_equal(ddim_idx.astype(int), ddim.timesteps.numpy(), err_msg=f"DDIM {spacing}")
    # the two "leading" rules really differ (N // (n + 1) without 0 vs N // n with 0)
    lead = np.asarray(_grid("scaled_linear", n, "leading", "zero", steps_offset))
    lead_ddim = np.asarray(_grid("scaled_linear", n, "leading_ddim", "zero", steps_offset))
    assert not np.allclose(lead, lead_ddim)
    assert alphas_cumprod.dtype == np.float64


# ----------------------------------------------------------------------------------------------
# DPMSolverMultistepScheduler (dpmsolver++)


ORDERS_TYPES = [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint"), (3, "heun")]


@pytest.mark.parametrize(
    "order, solver_type, lower_order_final",
    [(o, t, lof) for o, t in ORDERS_TYPES for lof in (True, False) if o > 1 or lof],  # order 1 has no lower order
)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpmsolver_multistep(order, solver_type, final, lower_order_final):
    from diffusers import DPMSolverMultistepScheduler

    n = 10
    # diffusers' lower_order_final=True is gated at < 15 steps: jaxdiff's default 15
    solver = jd.DPMSolverPP(
        order=order, solver_type=solver_type, lower_order_final=15 if lower_order_final else False, third_order="reference"
    )
    results = []
    for beta, pred, spacing in _bases(flip=(final == "zero") != lower_order_final):

        def new(beta=beta, pred=pred, spacing=spacing):
            sch = DPMSolverMultistepScheduler(
                num_train_timesteps=NUM_TRAIN, solver_order=order, solver_type=solver_type, prediction_type=pred,
                timestep_spacing=spacing, final_sigmas_type=final, lower_order_final=lower_order_final, **BETAS[beta],
            )
            sch.set_timesteps(n)
            return sch

        ours = _ours(solver, beta, pred, _grid(beta, n, spacing, final))
        limited = final == "sigma_min" and order > 1 and not lower_order_final
        results.append(((beta, pred, spacing), _parity(ours, new, beta, pred, float32_limited=limited)))
    _assert_all(results)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_third_order_reference_matches_and_corrected_differs(final):
    """diffusers' 3M is the reference (second-order) form; jaxdiff's default corrected form is not it."""
    from diffusers import DPMSolverMultistepScheduler

    for beta, pred, spacing in _bases(flip=final == "zero"):
        sch = DPMSolverMultistepScheduler(
            num_train_timesteps=NUM_TRAIN, solver_order=3, prediction_type=pred, timestep_spacing=spacing,
            final_sigmas_type=final, **BETAS[beta],
        )
        sch.set_timesteps(10)
        ref = _diffusers_sample(sch, beta, pred)
        ts = _grid(beta, 10, spacing, final)
        assert _rel(_ours(jd.DPMSolverPP(order=3, third_order="reference"), beta, pred, ts), ref) <= TOL
        # measured 2.7e-3 .. 5.2e-3: the doubled D2 term, far above float32 noise
        assert _rel(_ours(jd.DPMSolverPP(order=3), beta, pred, ts), ref) > 100 * TOL


@pytest.mark.parametrize("order", [2, 3])
def test_lower_order_final_gate(order):
    """diffusers lowers the final orders below 15 steps, the official code below 10.

    At 12 steps ``lower_order_final=15`` (jaxdiff's default) is diffusers' True, ``10`` is diffusers'
    False, and the two differ; at 16 steps diffusers' True is inactive, like the default.
    """
    from diffusers import DPMSolverMultistepScheduler

    beta, pred, spacing, final = "linear", "epsilon", "trailing", "sigma_min"

    def new(n, lower_order_final):
        def make():
            sch = DPMSolverMultistepScheduler(
                num_train_timesteps=NUM_TRAIN, solver_order=order, prediction_type=pred, timestep_spacing=spacing,
                final_sigmas_type=final, lower_order_final=lower_order_final, **BETAS[beta],
            )
            sch.set_timesteps(n)
            return sch

        return make

    ts12, ts16 = _grid(beta, 12, spacing, final), _grid(beta, 16, spacing, final)
    solver = functools.partial(jd.DPMSolverPP, order=order, third_order="reference")
    results = [
        ("12 steps, 15 vs True", _parity(_ours(solver(), beta, pred, ts12), new(12, True), beta, pred)),
        ("12 steps, 10 vs False", _parity(_ours(solver(lower_order_final=10), beta, pred, ts12), new(12, False), beta, pred, float32_limited=True)),
        ("12 steps, True vs True", _parity(_ours(solver(lower_order_final=True), beta, pred, ts12), new(12, True), beta, pred)),
        ("16 steps, 15 vs True", _parity(_ours(solver(), beta, pred, ts16), new(16, True), beta, pred, float32_limited=True)),
        ("16 steps, False vs True", _parity(_ours(solver(lower_order_final=False), beta, pred, ts16), new(16, True), beta, pred, float32_limited=True)),
    ]
    _assert_all(results)
    gate_effect = _rel(_ours(solver(lower_order_final=10), beta, pred, ts12), _ours(solver(), beta, pred, ts12))
    assert gate_effect > 100 * TOL  # the gate choice matters far beyond the tolerance


# ----------------------------------------------------------------------------------------------
# DPMSolverSinglestepScheduler


@pytest.mark.parametrize("order, solver_type, n", [(o, t, n) for o, t in ORDERS_TYPES for n in (10, 12) if o > 1 or n == 10])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpmsolver_singlestep(order, solver_type, final, n):
    """diffusers' singlestep scheduler applies lower_order_final ungated (jaxdiff: ``True``).

    It has no ``timestep_spacing``; our leading/trailing grids are passed as custom timesteps.
    """
    from diffusers import DPMSolverSinglestepScheduler

    results = []
    for beta, pred, spacing in _bases(flip=(n == 12) != (final == "zero")):
        ts = _grid(beta, n, spacing, final)
        idx = [int(i) for i in np.round(np.asarray(ts[:-1]) * NUM_TRAIN - 1)]
        for lower_order_final in (True, False) if final == "sigma_min" else (True,):

            def new(beta=beta, pred=pred, idx=idx, lof=lower_order_final):
                sch = DPMSolverSinglestepScheduler(
                    num_train_timesteps=NUM_TRAIN, solver_order=order, solver_type=solver_type, prediction_type=pred,
                    final_sigmas_type=final, lower_order_final=lof, **BETAS[beta],
                )
                sch.set_timesteps(timesteps=idx)
                return sch

            sch = new()
            solver = jd.DPMSolverPP(
                order=order, method="singlestep", solver_type=solver_type, lower_order_final=sch.config.lower_order_final
            )
            ours = _ours(solver, beta, pred, ts)
            limited = final == "sigma_min" and sch.order_list[-1] > 1
            results.append(((beta, pred, spacing, lower_order_final), _parity(ours, new, beta, pred, float32_limited=limited)))
    _assert_all(results)


def test_singlestep_lower_order_final_is_ungated_in_diffusers():
    """At 16 steps, order 2: diffusers' singlestep ends [.., 1, 2, 1, 1] (ungated); jaxdiff's default
    gate (15, diffusers' multistep rule) keeps [.., 1, 2, 1, 2]; ``lower_order_final=True`` matches diffusers."""
    from diffusers import DPMSolverSinglestepScheduler

    beta, pred, final, n = "scaled_linear", "v_prediction", "sigma_min", 16
    ts = _grid(beta, n, "linspace", final)

    def new():
        sch = DPMSolverSinglestepScheduler(
            num_train_timesteps=NUM_TRAIN, solver_order=2, prediction_type=pred, final_sigmas_type=final,
            lower_order_final=True, **BETAS[beta],
        )
        sch.set_timesteps(n)
        return sch

    assert new().order_list[-4:] == [1, 2, 1, 1]
    ours = _ours(jd.DPMSolverPP(order=2, method="singlestep", lower_order_final=True), beta, pred, ts)
    _assert_all([("True", _parity(ours, new, beta, pred))])
    default = _ours(jd.DPMSolverPP(order=2, method="singlestep"), beta, pred, ts)
    assert _rel(default, ours) > 100 * TOL


# ----------------------------------------------------------------------------------------------
# UniPCMultistepScheduler


@pytest.mark.parametrize(
    "order, variant, final, lower_order_final",
    [
        (o, v, f, lof)
        for o in (1, 2, 3)
        for v in ("bh1", "bh2")
        for f, lof in (("sigma_min", True), ("sigma_min", False), ("zero", True))
        if not (v == "bh1" and f == "zero") and (o > 1 or lof)
    ],
)
def test_unipc(order, variant, final, lower_order_final):
    """bh1 into sigma = 0 is test_unipc_bh1_final_zero (diffusers NaN); with lower_order_final=False
    and a final step to 0, diffusers fails for both variants (r = 0 in its Vandermonde system)."""
    from diffusers import UniPCMultistepScheduler

    n = 10
    solver = jd.UniPC(order=order, variant=variant, lower_order_final=lower_order_final)
    results = []
    for beta, pred, spacing in _bases(flip=(variant == "bh1") != (order == 2) != lower_order_final):

        def new(beta=beta, pred=pred, spacing=spacing):
            sch = UniPCMultistepScheduler(
                num_train_timesteps=NUM_TRAIN, solver_order=order, solver_type=variant, prediction_type=pred,
                timestep_spacing=spacing, final_sigmas_type=final, lower_order_final=lower_order_final, **BETAS[beta],
            )
            sch.set_timesteps(n)
            return sch

        ours = _ours(solver, beta, pred, _grid(beta, n, spacing, final))
        limited = final == "sigma_min" and order > 1 and not lower_order_final
        results.append(((beta, pred, spacing), _parity(ours, new, beta, pred, float32_limited=limited)))
    _assert_all(results)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh1_final_zero(order):
    """diffusers' bh1 step into sigma = 0 is 0 * inf = NaN; ours is its finite limit and as accurate as bh2.

    Ours equals diffusers' own run with only that last 0 * inf removed (its last step then returns
    the x0 prediction), and its error against a 200-step third-order solve is that of bh2.
    """
    from diffusers import UniPCMultistepScheduler

    results = []
    for beta, pred, spacing in _bases(flip=order == 2):

        def new(beta=beta, pred=pred, spacing=spacing, variant="bh1"):
            sch = UniPCMultistepScheduler(
                num_train_timesteps=NUM_TRAIN, solver_order=order, solver_type=variant, prediction_type=pred,
                timestep_spacing=spacing, final_sigmas_type="zero", **BETAS[beta],
            )
            sch.set_timesteps(10)
            return sch

        ts = _grid(beta, 10, spacing, "zero")
        ours = _ours(jd.UniPC(order=order, variant="bh1"), beta, pred, ts)
        assert np.all(np.isfinite(ours))
        if np.all(np.isfinite(_diffusers_sample(new(), beta, pred))):  # a diffusers that fixed it: compare directly
            results.append(((beta, pred, spacing, "direct"), _parity(ours, new, beta, pred)))
        results.append(((beta, pred, spacing), _parity(ours, new, beta, pred, final_x0=True)))
        if spacing == "linspace" and pred == "epsilon":
            _, schedule, _ = _table(beta)
            exact = _fine_solution(schedule, jd.timesteps(schedule, 200, "logsnr", t_start=1.0, t_end=1.0 / NUM_TRAIN, final="zero"))
            err_bh1 = _rel(ours, exact)
            err_bh2 = _rel(_ours(jd.UniPC(order=order, variant="bh2"), beta, pred, ts), exact)
            assert err_bh1 <= 1.3 * err_bh2, (beta, err_bh1, err_bh2)
    _assert_all(results)


@jax.jit
def _fine_solution(schedule, ts):
    return jd.sample(_gm().denoiser(schedule, "epsilon"), jnp.asarray(_x_T()), ts, jd.DPMSolverPP(order=3), args=_gm())


# ----------------------------------------------------------------------------------------------
# DDIMScheduler (eta = 0, set_alpha_to_one=True, clip_sample=False)


def _ddim_scheduler(beta, pred, spacing, n, steps_offset=0):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(
        num_train_timesteps=NUM_TRAIN, prediction_type=pred, clip_sample=False, set_alpha_to_one=True,
        timestep_spacing=spacing, steps_offset=steps_offset, **BETAS[beta],
    )
    sch.set_timesteps(n)
    return sch


@pytest.mark.parametrize("spacing, n, steps_offset", [("leading", 10, 0), ("leading", 12, 1), ("leading", 16, 1), ("trailing", 10, 0)])
def test_ddim(spacing, n, steps_offset):
    ours_spacing = "leading_ddim" if spacing == "leading" else spacing
    results = []
    for beta in BETAS:
        for pred in PREDICTIONS:
            ours = _ours(jd.DDIM(), beta, pred, _grid(beta, n, ours_spacing, "zero", steps_offset))
            new = functools.partial(_ddim_scheduler, beta, pred, spacing, n, steps_offset)
            results.append(((beta, pred), _parity(ours, new, beta, pred, eta=0.0)))
    _assert_all(results)


@pytest.mark.parametrize("spacing, n", [("linspace", 10), ("trailing", 16)])
def test_ddim_linspace_quirk(spacing, n):
    """DDIMScheduler steps t -> t - N // n, then calls the model at the next listed timestep, which
    for linspace (and trailing when n does not divide N) is another one. Chained one-step DDIM
    solves from each listed timestep to t - N // n reproduce it; the plain grid does not."""
    preds = list(PREDICTIONS) if spacing == "linspace" else list(PREDICTIONS)[::-1]
    results = []
    for beta, pred in zip(BETAS, preds):
        timesteps = _ddim_scheduler(beta, pred, spacing, n).timesteps.numpy()
        x = _x_T()
        for t in timesteps:
            prev = t - NUM_TRAIN // n
            pair = np.array([(t + 1.0) / NUM_TRAIN, (prev + 1.0) / NUM_TRAIN if prev >= 0 else 0.0])
            x = _ours(jd.DDIM(), beta, pred, pair, x_T=x)
        new = functools.partial(_ddim_scheduler, beta, pred, spacing, n)
        results.append(((beta, pred), _parity(x, new, beta, pred, eta=0.0)))
        plain = _ours(jd.DDIM(), beta, pred, np.concatenate([(timesteps + 1.0) / NUM_TRAIN, [0.0]]))
        assert _rel(plain, x) > 100 * TOL  # the quirk is not a small effect
    _assert_all(results)


# ----------------------------------------------------------------------------------------------
# Noise-prediction formulations (diffusers' deprecated algorithm_type="dpmsolver"; UniPC predict_x0=False)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_noise_prediction_solvers(order):
    from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler

    n, final, spacing = 10, "sigma_min", "trailing"  # diffusers' dpmsolver refuses final_sigmas_type="zero"
    results = []
    for beta in BETAS:
        for pred in PREDICTIONS:
            ts = _grid(beta, n, spacing, final)
            idx = [int(i) for i in np.round(np.asarray(ts[:-1]) * NUM_TRAIN - 1)]
            cfg = dict(num_train_timesteps=NUM_TRAIN, solver_order=order, prediction_type=pred, final_sigmas_type=final, **BETAS[beta])

            def multi(cfg=cfg):
                sch = DPMSolverMultistepScheduler(algorithm_type="dpmsolver", timestep_spacing=spacing, **cfg)
                sch.set_timesteps(n)
                return sch

            def single(cfg=cfg, idx=idx):
                sch = DPMSolverSinglestepScheduler(algorithm_type="dpmsolver", lower_order_final=True, **cfg)
                sch.set_timesteps(timesteps=idx)
                return sch

            def unipc(cfg=cfg):
                sch = UniPCMultistepScheduler(predict_x0=False, timestep_spacing=spacing, **cfg)
                sch.set_timesteps(n)
                return sch

            for name, new, solver in (
                ("multistep", multi, jd.DPMSolver(order=order, third_order="reference")),
                ("singlestep", single, jd.DPMSolver(order=order, method="singlestep", lower_order_final=True)),
                ("unipc", unipc, jd.UniPC(order=order, prediction="noise")),
            ):
                results.append(((name, beta, pred), _parity(_ours(solver, beta, pred, ts), new, beta, pred)))
    _assert_all(results)


# ----------------------------------------------------------------------------------------------
# DEISMultistepScheduler (logrho) and PNDMScheduler(skip_prk_steps=True) (issue 13; float64 parity of both, and
# of every solver above, is in test_reference_float64.py)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_logrho(order):
    """``DEIS(variant="logrho", lower_order_final=15)`` against diffusers' float32 DEISMultistepScheduler."""
    from diffusers import DEISMultistepScheduler

    results = []
    for beta, pred, spacing in _bases(flip=order == 2):

        def new(beta=beta, pred=pred, spacing=spacing):
            sch = DEISMultistepScheduler(num_train_timesteps=NUM_TRAIN, solver_order=order, prediction_type=pred,
                                         timestep_spacing=spacing, **BETAS[beta])
            sch.set_timesteps(10)
            return sch

        ours = _ours(jd.DEIS(order=order, variant="logrho", lower_order_final=15), beta, pred,
                     _grid(beta, 10, spacing, "sigma_min"))
        results.append(((beta, pred, spacing), _parity(ours, new, beta, pred)))
    _assert_all(results)


@pytest.mark.parametrize("steps_offset", [0, 1])
def test_pndm_plms_skip_prk(steps_offset):
    """``PNDM("PLMS-diffusers")`` against diffusers' float32 PLMS on epsilon models; on v models diffusers converts
    with the wrong alpha (see ``jaxdiff.solvers.pndm``) and differs far beyond float32 round-off."""
    from diffusers import PNDMScheduler

    results = []
    for beta in BETAS:
        ts = _grid(beta, 10, "leading_ddim", "zero", steps_offset)

        def new(beta=beta, pred="epsilon"):
            sch = PNDMScheduler(num_train_timesteps=NUM_TRAIN, skip_prk_steps=True, set_alpha_to_one=True,
                                steps_offset=steps_offset, prediction_type=pred, **BETAS[beta])
            sch.set_timesteps(10)
            return sch

        results.append(((beta, "epsilon"), _parity(_ours(jd.PNDM("PLMS-diffusers"), beta, "epsilon", ts), new, beta,
                                                  "epsilon")))
        ours_v = _ours(jd.PNDM("PLMS-diffusers"), beta, "v_prediction", ts)
        ref_v = _diffusers_sample(new(pred="v_prediction"), beta, "v_prediction")
        assert _rel(ours_v, ref_v) > 100 * TOL
    _assert_all(results)


# ----------------------------------------------------------------------------------------------
# The harness itself


@pytest.mark.parametrize(
    "solver",
    [jd.DPMSolverPP(order=3, third_order="reference"), jd.UniPC(order=3, variant="bh1")],
    ids=["3M", "unipc3-bh1"],
)
def test_padded_runs_equal_public_sample(solver):
    beta, pred = "linear", "v_prediction"
    _, schedule, _ = _table(beta)
    ts = _grid(beta, 10, "trailing", "sigma_min")
    public = jd.sample(_gm().denoiser(schedule, PREDICTIONS[pred]), jnp.asarray(_x_T()), ts, solver, args=_gm())
    np.testing.assert_allclose(_ours(solver, beta, pred, ts), np.asarray(public), rtol=0, atol=1e-12)
