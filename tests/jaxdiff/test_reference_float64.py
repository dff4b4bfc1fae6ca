"""Parity with the reference schedulers run in float64 (issue 13): the same code, float64 arithmetic.

diffusers computes in float32 (tables, sigmas, and the sample inside ``step``), so
``test_diffusers_parity.py`` can only check its schedulers to ~1e-5. Here each diffusers scheduler module runs
with its float32 switched to float64: inside ``_float64(module)`` the module's ``torch`` and ``np`` names are
proxies that answer ``float32`` with ``float64`` (and torch's default dtype is float64), so its own
``__init__``/``set_timesteps``/``step`` build float64 betas, alphas_cumprod and sigmas and keep the sample in
float64 (``sample.to(torch.float32)`` becomes a float64 cast). Nothing of its algorithm is rewritten.

Both sides sample the same analytic model, a 2-D Gaussian mixture (``jaxdiff.testing.GaussianMixture``), from the
same ``x_T`` (8 x 2). The diffusers side gets the exact prediction (epsilon, v or flow velocity, float64 NumPy) at
the noise level its scheduler assigns to the timestep it passes (a table entry, or diffusers' interpolation of
sigma at a fractional index); ours is ``jd.sample`` with ``VPDiscrete`` built from the same float64 betas (or
``RectifiedFlow``) on the grid from ``jd.timesteps``. The bound is ``TOL = 1e-10`` relative (max abs difference
over max abs value); measured differences are 1e-16 .. 4e-15.

Covered: DDIM, DPM-Solver++ 1-3 multistep (diffusers' "reference" 3M), DPM-Solver++ singlestep 1-3, UniPC
bh1/bh2, DEIS logrho 1-3, PNDM's PLMS (``skip_prk_steps=True``), Euler (linspace of sigmas), Heun (EDM form on the
discrete table), FlowMatchEuler and FlowMatchHeun. Not covered here: LMS and EulerAncestral (jaxdiff has no such
solver yet) and k-diffusion (not installed in this environment).
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

pytestmark = [
    # diffusers' schedulers call NumPy on torch tensors (NumPy 2 deprecations, not ours)
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]
REF = pytest.mark.reference("torch", "diffusers")

TOL = 1e-10
N_TRAIN = 1000
WEIGHTS = np.array([0.3, 0.5, 0.2])
MEANS = np.array([[-1.5, 0.5], [1.0, 1.2], [0.5, -1.8]])
SCALES = np.array([0.3, 0.5, 0.4])
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LINEAR_BETAS = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
JAX_PRED = {"epsilon": "epsilon", "v_prediction": "v", "flow_prediction": "velocity"}


class _Proxy:
    """A module stand-in that answers ``float32`` with ``float64`` and forwards every other name."""

    def __init__(self, module, **swap):
        self._module, self._swap = module, swap

    def __getattr__(self, name):
        return self._swap[name] if name in self._swap else getattr(self._module, name)


@contextlib.contextmanager
def _float64(module):
    import torch

    saved = {name: getattr(module, name) for name in ("torch", "np") if hasattr(module, name)}
    default = torch.get_default_dtype()
    module.torch = _Proxy(torch, float32=torch.float64)
    if "np" in saved:
        module.np = _Proxy(np, float32=np.float64)
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        torch.set_default_dtype(default)


def _x_T():
    return np.random.default_rng(0).standard_normal((8, 2))


def _gm():
    return jd.testing.GaussianMixture(jnp.asarray(WEIGHTS), jnp.asarray(MEANS), jnp.asarray(SCALES))


def _exact(x, a, s, prediction):
    """Exact model output of the mixture at x = a x0 + s eps, float64 NumPy."""
    c = a**2 * SCALES**2 + s**2
    diff = x[:, None, :] - a * MEANS
    logp = np.log(WEIGHTS) - 0.5 * np.sum(diff**2, -1) / c - np.log(c)
    resp = np.exp(logp - logp.max(-1, keepdims=True))
    resp /= resp.sum(-1, keepdims=True)
    eps = s * np.sum(resp[..., None] * diff / c[:, None], axis=-2)
    x0 = np.sum(resp[..., None] * (MEANS + (a * SCALES**2 / c)[:, None] * diff), axis=-2)
    return {"epsilon": eps, "v_prediction": a * eps - s * x0, "flow_prediction": eps - x0}[prediction]


def _scheduler_module(cls_name):
    import diffusers

    return importlib.import_module(getattr(diffusers, cls_name).__module__)


def _diffusers(cls_name, config, n, prediction, *, set_kwargs=None, step_kwargs=None):
    """Run diffusers' ``cls_name`` in float64 with the exact model; returns (sample, scheduler)."""
    import torch

    module = _scheduler_module(cls_name)
    flow = prediction == "flow_prediction"
    with _float64(module):
        sch = getattr(module, cls_name)(**config)
        if set_kwargs and "timesteps" in set_kwargs:
            sch.set_timesteps(**set_kwargs)
        else:
            sch.set_timesteps(n, **(set_kwargs or {}))
        assert sch.timesteps.dtype != torch.float32 and (not hasattr(sch, "sigmas") or sch.sigmas.dtype == torch.float64)
        if not flow:
            acp = sch.alphas_cumprod.numpy()
            assert acp.dtype == np.float64
            table = np.sqrt((1.0 - acp) / acp)  # diffusers' VE sigmas, interpolated at fractional timesteps
        scales = hasattr(type(sch), "scale_model_input")
        # a scheduler that rescales its input keeps the VE state x / alpha; start it from our VP x_T / alpha_0
        # (diffusers' init_noise_sigma is sigma_max for linspace, an approximation of 1 / alpha_0)
        lift = 1.0 / float(sch.scale_model_input(torch.ones(()), sch.timesteps[0])) if scales else 1.0
        if scales:
            sch._step_index = None  # scale_model_input started the step counter; step() restarts it
        x = torch.from_numpy(_x_T() * lift)
        for t in sch.timesteps:
            # the Euler family scales its VE state to the model's VP input (FlowMatchHeun has no such method)
            x_in = sch.scale_model_input(x, t) if scales else x
            if flow:
                s = float(t) / N_TRAIN
                a = 1.0 - s
            else:
                sig = float(np.interp(float(t), np.arange(table.shape[0]), table))
                a = 1.0 / np.sqrt(1.0 + sig**2)
                s = sig * a
            out = torch.from_numpy(_exact(x_in.numpy(), a, s, prediction))
            x = sch.step(out, t, x, **(step_kwargs or {})).prev_sample
    return x.numpy(), sch


@functools.lru_cache(maxsize=None)
def _schedule(betas: str):
    """Our schedule from diffusers' float64 betas (built by its own code under ``_float64``)."""
    module = _scheduler_module("DDPMScheduler")
    with _float64(module):
        b = module.DDPMScheduler(num_train_timesteps=N_TRAIN, **(SD_BETAS if betas == "sd" else LINEAR_BETAS)).betas
    b = b.numpy()
    assert b.dtype == np.float64
    return jd.VPDiscrete(jnp.asarray(b))


@functools.partial(jax.jit, static_argnames=("solver", "prediction"))
def _sample(schedule, x_T, ts, gm, *, solver, prediction):
    return jd.sample(gm.denoiser(schedule, prediction), x_T, ts, solver, args=gm)


def _ours(solver, schedule, ts, prediction):
    out = _sample(schedule, jnp.asarray(_x_T()), jnp.asarray(ts), _gm(), solver=solver, prediction=JAX_PRED[prediction])
    return np.asarray(out)


def _rel(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _check(results):
    print("\n".join(f"{case}: {rel:.1e}" for case, rel in results))  # the measured differences (pytest -s)
    bad = [f"{case}: {rel:.2e}" for case, rel in results if not rel <= TOL]
    assert not bad, "float64 parity beyond 1e-10:\n" + "\n".join(bad)


def _betas_config(betas):
    return dict(num_train_timesteps=N_TRAIN, **(SD_BETAS if betas == "sd" else LINEAR_BETAS))


# ----------------------------------------------------------------------------------------------
# Grid rules: jd.timesteps against diffusers' set_timesteps, in float64


def _set(cls_name, config, n, **set_kwargs):
    module = _scheduler_module(cls_name)
    with _float64(module):
        sch = getattr(module, cls_name)(**config)
        sch.set_timesteps(n, **set_kwargs)
    return sch


def _noise_levels(schedule, ts):
    return np.asarray(jnp.exp(-schedule.lambda_(jnp.asarray(ts))))  # VE sigma = sigma / alpha


@REF
def test_euler_family_grids():
    """The Euler family's linspace (fractional indices, sigmas interpolated), leading and trailing rules.

    Noise levels agree to 1e-13 relative (measured ~1e-14; the inverse map t_of_lambda rounds), the integer
    rules' timesteps exactly. 7 steps: 999 / 6 is fractional, so linspace falls between table entries.
    """
    schedule, n = _schedule("sd"), 7
    for spacing, ours in (("linspace", "linspace_sigmas"), ("leading", "leading_ddim"), ("trailing", "trailing")):
        ts = jd.timesteps(schedule, n, ours, steps_offset=1)
        levels, idx = _noise_levels(schedule, ts), np.round(np.asarray(ts[:-1]) * N_TRAIN - 1)
        for cls_name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                         "EulerAncestralDiscreteScheduler"):
            sch = _set(cls_name, dict(_betas_config("sd"), timestep_spacing=spacing, steps_offset=1), n)
            ref = np.unique(sch.sigmas.numpy())[::-1]  # Heun repeats its inner sigmas
            np.testing.assert_allclose(levels, ref, rtol=1e-13, atol=0, err_msg=f"{cls_name} {spacing}")
            if ours != "linspace_sigmas":
                np.testing.assert_array_equal(idx, np.unique(sch.timesteps.numpy())[::-1])


@REF
def test_ddpm_grids():
    schedule = _schedule("linear")
    for spacing, ours in (("linspace", "linspace_ddpm"), ("leading", "leading_ddim"), ("trailing", "trailing")):
        for n in (10, 7):
            sch = _set("DDPMScheduler", dict(_betas_config("linear"), timestep_spacing=spacing), n)
            idx = np.round(np.asarray(jd.timesteps(schedule, n, ours)[:-1]) * N_TRAIN - 1).astype(int)
            np.testing.assert_array_equal(idx, sch.timesteps.numpy(), err_msg=f"{spacing} {n}")


@REF
def test_flow_grids():
    """Static shift (SD3) and dynamic shifting by resolution (FLUX's mu) are FlowMatchEulerDiscreteScheduler's sigmas."""
    rf = jd.RectifiedFlow()
    for n in (4, 28):
        for shift in (1.0, 3.0):
            sch = _set("FlowMatchEulerDiscreteScheduler", dict(shift=shift), n)
            np.testing.assert_allclose(np.asarray(jd.timesteps(rf, n, "flow", shift=shift)), sch.sigmas.numpy(),
                                       rtol=1e-14, atol=1e-16)
        for seq_len in (256, 1024, 4096):
            mu = jd.flow_shift(seq_len)
            sch = _set("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), n, mu=mu)
            np.testing.assert_allclose(np.asarray(jd.timesteps(rf, n, "flow", mu=mu)), sch.sigmas.numpy(),
                                       rtol=1e-14, atol=1e-16)


@REF
def test_edm_grids_and_zero_length_final_step():
    """EDMEulerScheduler: a final sigma_min is a zero-length step; its grid is ``karras`` with one step fewer."""
    edm = jd.EDM()
    for n in (5, 18):
        zero = _set("EDMEulerScheduler", dict(final_sigmas_type="zero"), n).sigmas.numpy()
        np.testing.assert_allclose(np.asarray(jd.timesteps(edm, n, "karras", final="zero")), zero, rtol=1e-13, atol=0)
        smin = _set("EDMEulerScheduler", dict(final_sigmas_type="sigma_min"), n).sigmas.numpy()
        assert smin[-1] == smin[-2]  # diffusers' zero-length last step
        np.testing.assert_allclose(np.asarray(jd.timesteps(edm, n - 1, "karras")), smin[:-1], rtol=1e-13, atol=0)


@REF
def test_pndm_zero_length_final_step_mapping():
    """PNDM with ``set_alpha_to_one=False``, ``steps_offset=0``: diffusers' last step (timestep 0 to alphas_cumprod[0])
    is the identity. ``final="sigma_min"`` refuses that grid with the mapping; the mapped grid gives diffusers' sample
    with one model call fewer."""
    schedule, n = _schedule("linear"), 10
    with pytest.raises(ValueError, match=r"zero-length step.*final='zero'\)\[:-1\]"):
        jd.timesteps(schedule, n, "leading_ddim", final="sigma_min")
    cfg = dict(_betas_config("linear"), skip_prk_steps=True, steps_offset=0, set_alpha_to_one=False)
    ref, sch = _diffusers("PNDMScheduler", cfg, n, "epsilon")
    ts = jd.timesteps(schedule, n, "leading_ddim", final="zero")[:-1]
    assert jd.nfe(jd.PNDM("PLMS-diffusers"), ts) == len(sch.timesteps) - 1
    _check([("mapped", _rel(_ours(jd.PNDM("PLMS-diffusers"), schedule, ts, "epsilon"), ref))])


# ----------------------------------------------------------------------------------------------
# DEIS: diffusers' logrho


@REF
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_logrho_matches_diffusers(order):
    """``DEIS(variant="logrho", lower_order_final=15)`` is DEISMultistepScheduler; the rho variant is not it."""
    results, rho_gaps = [], []
    for betas, spacing, prediction, n in [
        ("sd", "linspace", "epsilon", 10),  # < 15 steps: diffusers lowers the last two orders
        ("linear", "leading", "v_prediction", 16),  # 16 >= 15: diffusers' gate leaves the last orders alone
    ]:
        cfg = dict(_betas_config(betas), solver_order=order, prediction_type=prediction, timestep_spacing=spacing)
        ref, _ = _diffusers("DEISMultistepScheduler", cfg, n, prediction)
        schedule = _schedule(betas)
        ts = jd.timesteps(schedule, n, spacing, final="sigma_min")  # DEIS ends at the table's first entry
        ours = _ours(jd.DEIS(order=order, variant="logrho", lower_order_final=15), schedule, ts, prediction)
        results.append(((betas, spacing, prediction, n), _rel(ours, ref)))
        if n == 10:
            rho_gap = _rel(_ours(jd.DEIS(order=order, lower_order_final=15), schedule, ts, prediction), ref)
    _check(results)
    if order == 1:  # both variants are DDIM
        assert rho_gap <= TOL
    else:  # measured 1.5e-2 (order 2) and 1.7e-2 (order 3): a different method, not round-off
        assert rho_gap > 1e-3


# ----------------------------------------------------------------------------------------------
# PNDM: PLMS as Stable Diffusion runs it (skip_prk_steps=True)


@REF
@pytest.mark.parametrize("n", [4, 10])
def test_plms_diffusers_matches_pndm_skip_prk(n):
    """``PNDM("PLMS-diffusers")`` is PNDMScheduler(skip_prk_steps=True) on epsilon models.

    ``set_alpha_to_one=True`` ends at t = 0 (``final="zero"``); with ``False`` and ``steps_offset=1`` the last step
    ends at the table's first entry (``final="sigma_min"``).
    """
    results = []
    for betas, offset, to_one in [("sd", 1, True), ("linear", 0, True), ("sd", 1, False)]:
        cfg = dict(_betas_config(betas), skip_prk_steps=True, steps_offset=offset, set_alpha_to_one=to_one)
        ref, sch = _diffusers("PNDMScheduler", cfg, n, "epsilon")
        assert len(sch.timesteps) == n + 1  # the improved-Euler start calls the model twice at its step
        schedule = _schedule(betas)
        ts = jd.timesteps(schedule, n, "leading_ddim", final="zero" if to_one else "sigma_min", steps_offset=offset)
        assert jd.nfe(jd.PNDM("PLMS-diffusers"), ts) == n + 1
        results.append(((betas, offset, to_one), _rel(_ours(jd.PNDM("PLMS-diffusers"), schedule, ts, "epsilon"), ref)))
    _check(results)


@REF
def test_plms_v_prediction_is_exact_where_diffusers_is_not():
    """On v prediction ours converges to the exact flow and equals its own eps run; diffusers' does not.

    Gaussian data (exact probability-flow map ``GaussianData.flow``) on SD's table. Convergence: logSNR grids of
    10 / 20 / 40 steps, errors against the exact map measured 1.6e-2 / 4.0e-3 / 9.8e-4 (slope 2.0, the order of
    the improved-Euler start). diffusers' own grid (SD: leading, ``steps_offset=1``, to t = 0; 10 / 20 / 40 steps):
    ours 3.4e-2 / 1.7e-3 / 6.5e-3 (eps and v alike: PLMS's fixed Adams weights in the index of a grid that is
    not smooth at t = 0), diffusers' v 0.36 / 0.17 / 0.081. diffusers converts v to eps with the alpha of the
    step's start, and on the improved-Euler start with the alpha of the previous grid point.
    """
    import torch

    mean, scale = np.array([0.5, -1.0]), np.array([0.3, 0.8])
    gd = jd.testing.GaussianData(mean=jnp.asarray(mean), scale=jnp.asarray(scale))
    schedule = _schedule("sd")
    x_T = jnp.asarray(_x_T())
    plms = jd.PNDM("PLMS-diffusers")

    def run(ts, prediction):
        return np.asarray(_sample(schedule, x_T, jnp.asarray(ts), gd, solver=plms, prediction=prediction))

    errs = []  # the same compiled programs as on diffusers' grids below (the grid is an argument)
    for n in (10, 20, 40):
        ts = jd.timesteps(schedule, n, "logsnr")
        errs.append(float(np.max(np.abs(run(ts, "v") - np.asarray(gd.flow(schedule, x_T, ts[0], ts[-1]))))))
    slopes = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(slopes > 1.8), (errs, slopes)

    module = _scheduler_module("PNDMScheduler")
    for n in (10, 20, 40):
        ts = jd.timesteps(schedule, n, "leading_ddim", final="zero", steps_offset=1)
        exact = np.asarray(gd.flow(schedule, x_T, ts[0], 0.0))
        ours_v = run(ts, "v")
        if n == 10:
            assert _rel(ours_v, run(ts, "epsilon")) <= TOL  # the conversion is exact: same sample from either model
        with _float64(module):
            sch = module.PNDMScheduler(**_betas_config("sd"), skip_prk_steps=True, steps_offset=1,
                                       set_alpha_to_one=True, prediction_type="v_prediction")
            sch.set_timesteps(n)
            acp = sch.alphas_cumprod.numpy()
            x = torch.from_numpy(_x_T())
            for t in sch.timesteps:
                a, s = np.sqrt(acp[int(t)]), np.sqrt(1.0 - acp[int(t)])
                centred = x.numpy() - a * mean
                c = a**2 * scale**2 + s**2
                x0, eps = mean + a * scale**2 / c * centred, s / c * centred  # the exact Gaussian predictions
                x = sch.step(torch.from_numpy(a * eps - s * x0), t, x).prev_sample
        ours_err, ref_err = np.max(np.abs(ours_v - exact)), np.max(np.abs(x.numpy() - exact))
        assert ref_err > 0.05 and ref_err > 5 * ours_err, (n, ours_err, ref_err)


# ----------------------------------------------------------------------------------------------
# Flow matching


@REF
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_matches_flow_match_heun(shift):
    """``Heun(form="flow")`` on ``timesteps(RectifiedFlow(), n, "flow", shift=...)`` is FlowMatchHeunDiscreteScheduler,
    and Euler on the same grid is FlowMatchEulerDiscreteScheduler; both start at t = 1 (pure noise)."""
    n, rf = 8, jd.RectifiedFlow()
    ts = jd.timesteps(rf, n, "flow", shift=shift)
    assert float(ts[0]) == 1.0
    results = []
    ref, sch = _diffusers("FlowMatchHeunDiscreteScheduler", dict(shift=shift), n, "flow_prediction")
    assert len(sch.timesteps) == jd.nfe(jd.Heun(form="flow"), ts) == 2 * n - 1
    results.append((("heun", shift), _rel(_ours(jd.Heun(form="flow"), rf, ts, "flow_prediction"), ref)))
    ref, _ = _diffusers("FlowMatchEulerDiscreteScheduler", dict(shift=shift), n, "flow_prediction")
    results.append((("euler", shift), _rel(_ours(jd.Euler(), rf, ts, "flow_prediction"), ref)))
    _check(results)


def test_flow_heun_second_order_from_pure_noise():
    """From t = 1 on RectifiedFlow both Heun forms are finite and second order against the exact flow.

    Uniform grids of 8 / 16 / 32 steps, Gaussian data: measured slopes 2.08, 2.07 (flow form) and 1.79, 1.88
    (eps form, which takes its data-variable limit for the first step).
    """
    gd = jd.testing.GaussianData(mean=jnp.asarray([0.5, -1.0]), scale=jnp.asarray([0.3, 0.8]))
    rf, x_T = jd.RectifiedFlow(), jnp.asarray(_x_T())
    exact = gd.flow(rf, x_T, 1.0, 0.0)
    for form, lo in (("flow", 1.9), ("edm", 1.7)):
        errs = []
        for n in (8, 16, 32):
            out = _sample(rf, x_T, jnp.linspace(1.0, 0.0, n + 1), gd, solver=jd.Heun(form=form), prediction="velocity")
            assert bool(jnp.all(jnp.isfinite(out)))
            errs.append(float(jnp.max(jnp.abs(out - exact))))
        slopes = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
        assert np.all(slopes > lo) and np.all(slopes < 2.5), (form, errs, slopes)
    grad = jax.grad(lambda x: jnp.sum(_sample(rf, x, jnp.linspace(1.0, 0.0, 9), gd, solver=jd.Heun(form="flow"),
                                              prediction="velocity")))(x_T)
    assert bool(jnp.all(jnp.isfinite(grad)))


# ----------------------------------------------------------------------------------------------
# The solvers that test_diffusers_parity.py checks at float32, here at float64


@REF
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmsolver_multistep_and_singlestep(order):
    """Multistep on SD's linspace grid to sigma = 0 (eps); singlestep on a trailing grid to sigma_min (v), fed to
    diffusers as custom timesteps (its singlestep scheduler has no spacing option)."""
    results = []
    for kind, betas, spacing, prediction, final in [("multistep", "sd", "linspace", "epsilon", "zero"),
                                                    ("singlestep", "linear", "trailing", "v_prediction", "sigma_min")]:
        schedule = _schedule(betas)
        ts = jd.timesteps(schedule, 10, spacing, final=final)
        cfg = dict(_betas_config(betas), solver_order=order, prediction_type=prediction, final_sigmas_type=final)
        if kind == "multistep":
            ref, _ = _diffusers("DPMSolverMultistepScheduler", dict(cfg, timestep_spacing=spacing), 10, prediction)
            solver = jd.DPMSolverPP(order=order, third_order="reference")
        else:
            idx = [int(i) for i in np.round(np.asarray(ts[:-1]) * N_TRAIN - 1)]
            ref, _ = _diffusers("DPMSolverSinglestepScheduler", dict(cfg, lower_order_final=True), 10, prediction,
                                set_kwargs=dict(timesteps=idx))
            solver = jd.DPMSolverPP(order=order, method="singlestep", lower_order_final=True)
        results.append(((kind, betas, spacing), _rel(_ours(solver, schedule, ts, prediction), ref)))
    _check(results)


@REF
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc(variant):
    results = []
    for order, betas, spacing, prediction in [(2, "sd", "leading", "epsilon"), (3, "linear", "linspace", "v_prediction")]:
        final = "sigma_min" if variant == "bh1" else "zero"  # diffusers' bh1 into sigma = 0 is NaN (0 * inf)
        schedule = _schedule(betas)
        cfg = dict(_betas_config(betas), solver_order=order, solver_type=variant, prediction_type=prediction,
                   timestep_spacing=spacing, final_sigmas_type=final)
        ref, _ = _diffusers("UniPCMultistepScheduler", cfg, 10, prediction)
        ours = _ours(jd.UniPC(order=order, variant=variant), schedule, jd.timesteps(schedule, 10, spacing, final=final),
                     prediction)
        results.append(((order, betas, spacing), _rel(ours, ref)))
    _check(results)


@REF
def test_ddim_euler_heun():
    """DDIM (leading, alpha_0 = 1), Euler and Heun (Euler family's linspace of sigmas, to sigma = 0)."""
    results = []
    for name, betas, prediction in (("ddim", "sd", "epsilon"), ("euler", "linear", "v_prediction"),
                                    ("heun", "sd", "v_prediction")):
        schedule = _schedule(betas)
        cfg = dict(_betas_config(betas), prediction_type=prediction)
        if name == "ddim":
            ref, _ = _diffusers("DDIMScheduler", dict(cfg, clip_sample=False, set_alpha_to_one=True, steps_offset=1),
                                10, prediction, step_kwargs=dict(eta=0.0))
            ts, solver = jd.timesteps(schedule, 10, "leading_ddim", final="zero", steps_offset=1), jd.DDIM()
        elif name == "euler":
            (ref, _), solver = _diffusers("EulerDiscreteScheduler", cfg, 7, prediction), jd.Euler()
            ts = jd.timesteps(schedule, 7, "linspace_sigmas")  # fractional indices
        else:
            (ref, _), solver = _diffusers("HeunDiscreteScheduler", cfg, 10, prediction), jd.Heun()
            ts = jd.timesteps(schedule, 10, "linspace_sigmas")
        results.append(((name, betas, prediction), _rel(_ours(solver, schedule, ts, prediction), ref)))
    _check(results)


# ----------------------------------------------------------------------------------------------
# Convergence of the new options (no reference needed)


@pytest.mark.parametrize("variant", ["rho", "logrho"])
def test_deis_variants_converge_at_their_order(variant):
    """Both DEIS variants of order 2 and 3 converge at their order on Gaussian data (exact flow).

    VPLinear, logSNR grids of 20 / 40 / 80 steps from t = 1 to 1e-3. Measured slopes: rho 1.75, 1.87 (order 2)
    and 2.44, 2.71 (order 3; its polynomial in rho over rho in [1e-2, 1e2] is still pre-asymptotic here); logrho
    1.91, 1.96 (order 2) and 3.67, 3.62 (order 3). On this problem logrho is the more accurate (order 3, 80 steps:
    1.2e-5 vs 9.3e-4).
    """
    s = jd.VPLinear()
    gd = jd.testing.GaussianData(mean=jnp.asarray([0.5, -1.0]), scale=jnp.asarray([0.3, 0.8]))
    x_T = jnp.asarray(_x_T())
    for order, lo in ((2, 1.75), (3, 2.55 if variant == "rho" else 2.9)):
        errs = []
        for n in (20, 40, 80):
            ts = jd.timesteps(s, n, "logsnr")
            out = _sample(s, x_T, ts, gd, solver=jd.DEIS(order=order, variant=variant), prediction="epsilon")
            errs.append(float(jnp.max(jnp.abs(out - gd.flow(s, x_T, ts[0], ts[-1])))))
        slopes = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
        assert slopes[-1] > lo and np.all(slopes < order + 1.0), (order, errs, slopes)


def test_deis_logrho_final_zero_and_pure_noise():
    """logrho into sigma = 0 (rho -> 0, the limit h^k e^h -> 0) and from alpha = 0 is finite and converges.

    (diffusers evaluates log 0 there.) RectifiedFlow with a velocity model from t = 1 to t = 0, uniform grids of
    16 / 32 steps, order 3: measured errors 1.2e-2 / 1.7e-3 against the exact flow (slope 2.9). Without
    ``lower_order_final`` the last step extrapolates the polynomial in log rho to log rho = -inf: finite, with
    finite gradients, but only first order there (measured 1.5e-2 / 9.1e-3).
    """
    gd = jd.testing.GaussianData(mean=jnp.asarray([0.5, -1.0]), scale=jnp.asarray([0.3, 0.8]))
    rf, x_T = jd.RectifiedFlow(), jnp.asarray(_x_T())
    exact = gd.flow(rf, x_T, 1.0, 0.0)
    errs = []
    for n in (16, 32):
        out = _sample(rf, x_T, jnp.linspace(1.0, 0.0, n + 1), gd, solver=jd.DEIS(order=3, variant="logrho"),
                      prediction="velocity")
        assert bool(jnp.all(jnp.isfinite(out)))
        errs.append(float(jnp.max(jnp.abs(out - exact))))
    assert np.log2(errs[0] / errs[1]) > 2.5, errs
    solver = jd.DEIS(order=3, variant="logrho", lower_order_final=False)
    grad = jax.grad(lambda x: jnp.sum(_sample(rf, x, jnp.linspace(1.0, 0.0, 17), gd, solver=solver,
                                              prediction="velocity")))(x_T)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_new_options_reject_bad_values():
    with pytest.raises(ValueError, match=r"Unknown `variant='log'`; expected one of \('rho', 'logrho'\).*'logrho' in log rho"):
        jd.DEIS(order=2, variant="log")
    with pytest.raises(ValueError, match=r"Unknown `form='velocity'`; expected one of \('edm', 'flow'\)"):
        jd.Heun(form="velocity")
    with pytest.raises(ValueError, match=r"Unknown `variant='PLMS-SD'`; expected one of \('F', 'S', 'PLMS', 'PLMS-diffusers'\)"):
        jd.PNDM("PLMS-SD")
    with pytest.raises(ValueError, match=r"`Heun\(final_euler=False\)` evaluates the model at the last grid point"):
        jd.sample(jd.testing.GaussianData(mean=jnp.zeros(()), scale=jnp.ones(())).denoiser(jd.RectifiedFlow(), "velocity"),
                  jnp.zeros((2, 2)), jd.timesteps(jd.RectifiedFlow(), 4, "flow"), jd.Heun(final_euler=False, form="flow"))
