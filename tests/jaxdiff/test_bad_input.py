"""Issue 12: every bad input of the samplers, adjoints and SMC gets a clear error or a documented recovery.

``ERRORS`` is the table of cases that must raise at trace time: each row is the call, the exception type and
a regex the message must match (it names the argument and says what to do). ``RECOVERIES`` are inputs that
are accepted by a documented rule; each asserts the number the rule promises. Add a row per new case.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxdiff as jd
from jaxdiff.smc import fkc, resampling

GD = jd.testing.GaussianData(jnp.array([0.5, -1.0]), jnp.array([0.3, 1.5]))
X = jax.random.normal(jax.random.key(0), (4, 2))
VPL = jd.VPLinear()
RF = jd.RectifiedFlow()
DISCRETE = jd.VPDiscrete(np.linspace(1e-4, 0.02, 1000))
TS = jd.timesteps(VPL, 4, "logsnr")
KEY = jax.random.key(0)


def _sample(den=None, x=X, ts=TS, solver=None, **kw):
    kw.setdefault("args", GD)
    return jd.sample(den if den is not None else GD.denoiser(VPL), x, ts, solver, **kw)


def _cfg(scale=2.0, cond_shift=jnp.zeros(2), uncond_shift=jnp.zeros(2)):
    def fn(x, t, a):
        return GD.x0_eps(VPL, x, VPL.t_of_model_time(t))[1] + jnp.broadcast_to(a, x.shape)
    return jd.Denoiser(fn, VPL, guidance=jd.CFG(scale)), (cond_shift, uncond_shift)


def _fkc(target=None, ts=None, **kw):
    gd = jd.testing.GaussianData(jnp.array([[1.0]]), jnp.array([[1.0]]))
    target = target if target is not None else fkc.Anneal(gd.denoiser(VPL), 2.0)
    kw.setdefault("args", gd)
    return fkc.sample(target, jnp.zeros((8, 1)), ts if ts is not None else jd.timesteps(VPL, 40, "logsnr"), KEY, **kw)


def _gd1(s=VPL):
    return jd.testing.GaussianData(jnp.array([[1.0]]), jnp.array([[1.0]])).denoiser(s)


ERRORS = {
    # ---------------------------------------------------------------- schedules
    "betas above 1": (lambda: jd.VPDiscrete(np.linspace(0.1, 1.5, 10)), ValueError, r"`betas` must lie in \(0, 1\]"),
    "negative betas": (lambda: jd.VPDiscrete(np.linspace(-0.1, 0.1, 10)), ValueError, r"`betas` must lie in \(0, 1\]"),
    "alphas_cumprod above 1": (lambda: jd.VPDiscrete(alphas_cumprod=np.linspace(1.2, 0.1, 10)), ValueError,
                               r"`alphas_cumprod` must lie in \[0, 1\]"),
    "alphas_cumprod increasing": (lambda: jd.VPDiscrete(alphas_cumprod=np.linspace(0.1, 0.9, 10)), ValueError,
                                  r"`alphas_cumprod` must be non-increasing"),
    "VE sigmas swapped": (lambda: jd.timesteps(jd.VE(sigma_min=50.0, sigma_max=0.01), 4, "logsnr"), ValueError,
                          r"`VE.sigma_min` must be below `sigma_max`.*Are they swapped"),
    "EDM sigmas swapped": (lambda: _sample(jd.testing.GaussianData(jnp.zeros(2), jnp.ones(2)).denoiser(
        jd.EDM(sigma_min=80.0, sigma_max=0.002)), ts=jnp.array([80.0, 1.0]), args=None), ValueError,
        r"`EDM.sigma_min` must be below `sigma_max`"),
    "EDM zero sigma_min": (lambda: jd.timesteps(jd.EDM(sigma_min=0.0), 4, "logsnr"), ValueError,
                           r"`EDM.sigma_min` must be a number in \(0, inf\), got 0.0"),
    "VPLinear negative beta": (lambda: jd.timesteps(jd.VPLinear(beta_min=-1.0), 4, "logsnr"), ValueError,
                               r"`VPLinear.beta_min` must be a number in \[0, inf\)"),
    "VPLinear beta_min > beta_max": (lambda: jd.timesteps(jd.VPLinear(beta_min=5.0, beta_max=1.0), 4, "logsnr"), ValueError,
                                     r"`VPLinear.beta_min` must not exceed `beta_max`"),
    "VPCosine negative s": (lambda: jd.timesteps(jd.VPCosine(s=-0.5), 4, "logsnr"), ValueError, r"`VPCosine.s` must be a number"),
    "VPCosine t_start beyond 1": (lambda: jd.VPCosine(t_start=1.2), ValueError,
                                  r"`VPCosine.t_start` must be a real number in \[0, 1\], got 1.2"),
    "RectifiedFlow t_end above t_start": (lambda: jd.RectifiedFlow(t_start=0.5, t_end=0.6), ValueError,
                                          r"`RectifiedFlow.t_end` must be below `t_start`"),
    "timesteps of a non-schedule": (lambda: jd.timesteps("vp", 4, "logsnr"), TypeError, r"`schedule` must be a jaxdiff Schedule"),
    "timesteps t_end above t_start": (lambda: jd.timesteps(VPL, 4, "time", t_start=0.1, t_end=0.5), ValueError,
                                      r"`timesteps\(...\)` must be strictly decreasing.*Pass `t_end < t_start`"),
    "timesteps t_start beyond the domain": (lambda: jd.timesteps(jd.VPCosine(), 4, "time", t_start=1.2), ValueError,
                                            r"must lie in the schedule's domain \[0, 1\], got times from 1.2"),
    "timesteps t_start a string": (lambda: jd.timesteps(VPL, 4, "logsnr", t_start="1"), TypeError, r"`t_start` must be a real number"),
    "timesteps negative rho": (lambda: jd.timesteps(VPL, 4, "karras", rho=-7.0), ValueError, r"`rho` must be a real number in \(0, inf\]"),
    "timesteps negative steps_offset": (lambda: jd.timesteps(DISCRETE, 4, "leading", steps_offset=-1), ValueError,
                                        r"`steps_offset` must be an int >= 0"),
    "nfe of zero steps": (lambda: jd.nfe(jd.DDIM(), 0), ValueError, r"`ts_or_num_steps` must be a grid"),
    # ---------------------------------------------------------------- grids
    "increasing grid": (lambda: _sample(ts=jnp.array([0.5, 0.7, 0.1])), ValueError, r"`ts` must be strictly decreasing"),
    "NaN in grid": (lambda: _sample(ts=jnp.array([0.9, jnp.nan, 0.1])), ValueError, r"`ts` must be finite"),
    "VPCosine grid to 1.2": (lambda: _sample(GD.denoiser(jd.VPCosine()), ts=jnp.array([1.2, 0.5, 0.1])), ValueError,
                             r"`ts` must lie in the schedule's domain \[0, 1\].*VPCosine is defined for 0 <= t <= 1"),
    "VPLinear grid to -0.5": (lambda: _sample(ts=jnp.array([1.0, 0.5, -0.5])), ValueError,
                              r"`ts` must lie in the schedule's domain \[0, inf\]"),
    "VPDiscrete grid from 1.5": (lambda: _sample(GD.denoiser(DISCRETE), ts=jnp.array([1.5, 0.5, 0.0])), ValueError,
                                 r"`ts` must lie in the schedule's domain \[0, 1\]"),
    "diffusers integer timesteps": (lambda: _sample(GD.denoiser(DISCRETE), ts=jnp.array([999, 749, 499, 249, 0])),
                                    ValueError, r"look like diffusers' integer timesteps.*\(timesteps \+ 1\) / 1000"),
    "2-D grid": (lambda: _sample(ts=jnp.ones((3, 2))), ValueError, r"`ts` must be a 1-D array of at least 2 times"),
    "string grid": (lambda: _sample(ts="logsnr"), TypeError, r"`ts` must be a 1-D array of times"),
    "complex grid": (lambda: _sample(ts=jnp.array([0.9, 0.1]) + 0j), TypeError, r"`ts` must be a 1-D array of real times"),
    "traced grid under checkify": (
        lambda: checkify.checkify(jax.jit(lambda t: jd.check_grid(VPL, t)))(jnp.array([0.5, 0.7, 0.1]))[0].throw(),
        Exception, r"`ts` must be strictly decreasing"),
    # ---------------------------------------------------------------- pure noise (alpha = 0)
    "epsilon model from pure noise": (lambda: _sample(GD.denoiser(RF, "epsilon"), ts=jd.timesteps(RF, 4, "time")),
                                      ValueError, r"`ts\[0\] = 1` is pure noise for RectifiedFlow.*`epsilon` model"),
    "score model from pure noise": (lambda: _sample(GD.denoiser(jd.VPCosine(s=0.0), "score"), ts=jnp.array([1.0, 0.5, 0.1]),
                                                    solver=jd.DDIM()), ValueError, r"pure noise for VPCosine.*'v', 'x0' or 'velocity'"),
    "EulerMaruyama from pure noise": (lambda: _sample(GD.denoiser(RF, "velocity"), ts=jd.timesteps(RF, 4, "time"),
                                                      solver=jd.EulerMaruyama(), key=KEY), ValueError,
                                      r"`EulerMaruyama` cannot start at pure noise.*Use `DDPM\(\)` or `DPMSolverPPSDE\(\)`"),
    # ---------------------------------------------------------------- solvers' static configuration
    "float order": (lambda: jd.DPMSolverPP(order=2.0), TypeError, r"`order` must be one of 1, 2, 3 \(a static Python int\), got 2.0"),
    "order 4": (lambda: jd.UniPC(order=4), ValueError, r"`order` must be one of 1, 2, 3, got 4"),
    "bool order": (lambda: jd.DEIS(order=True), TypeError, r"`order` must be one of 1, 2, 3, 4"),
    "unknown method": (lambda: jd.DPMSolver(method="adaptive"), ValueError, r"Unknown `method='adaptive'`"),
    "lower_order_final float": (lambda: jd.UniPC(lower_order_final=0.5), TypeError, r"`lower_order_final` must be a Python int"),
    "disable_corrector of floats": (lambda: jd.UniPC(disable_corrector=(0.5,)), TypeError, r"`disable_corrector` must be a Python int"),
    "eta as a string": (lambda: jd.DDIM(eta="0.5"), TypeError, r"`eta` must be a real number in \[0, 1\]"),
    "eta above 1": (lambda: jd.DDIM(eta=1.5), ValueError, r"`eta` must be a real number in \[0, 1\], got 1.5"),
    "Heun final_euler not bool": (lambda: jd.Heun(final_euler=1), TypeError, r"`final_euler` must be True or False"),
    "PNDM F on 1 step": (lambda: _sample(ts=jd.timesteps(VPL, 1, "logsnr"), solver=jd.PNDM("F")), ValueError,
                         r"`PNDM` with order 4 needs at least 4 steps, but `ts` has 1"),
    "PNDM F on 2 steps": (lambda: _sample(ts=jd.timesteps(VPL, 2, "logsnr"), solver=jd.PNDM("F")), ValueError,
                          r"needs at least 4 steps, but `ts` has 2"),
    "PNDM S on 1 step": (lambda: _sample(ts=jd.timesteps(VPL, 1, "logsnr"), solver=jd.PNDM("S")), ValueError,
                         r"needs at least 2 steps, but `ts` has 1"),
    "solver is a class": (lambda: _sample(solver=jd.DDIM), ValueError, r"`solver` must be a jaxdiff solver"),
    "adjoint is a string": (lambda: _sample(adjoint="adjoint"), TypeError, r"`adjoint` must be None, `jaxdiff.Backprop"),
    # ---------------------------------------------------------------- states, keys, models
    "dict x_T": (lambda: _sample(x={"a": X}), TypeError, r"`x_T` must be one real floating-point array, got a dict"),
    "integer x_T": (lambda: _sample(x=jnp.ones((4, 2), jnp.int32)), TypeError, r"`x_T` must be a real floating-point array.*int32"),
    "complex x_T": (lambda: _sample(x=X + 1j), TypeError, r"`x_T` must be a real floating-point array.*complex"),
    "empty batch with thresholding": (lambda: _sample(GD.denoiser(VPL, threshold=jd.DynamicThreshold()), x=jnp.zeros((0, 2))),
                                      ValueError, r"`x_T` has shape \(0, 2\), with no elements"),
    "integer key": (lambda: _sample(solver=jd.DDPM(), key=0), TypeError, r"`key` must be a PRNG key, got 0.*jax.random.key\(0\)"),
    "missing key": (lambda: _sample(solver=jd.DDPM()), ValueError, r"`DDPM` is stochastic: pass `key="),
    "two-argument model": (lambda: jd.Denoiser(lambda x, t: x, VPL), TypeError,
                           r"`fn` must accept three positional arguments.*fn\(x, t_model, args\)"),
    "model returns a dict": (lambda: _sample(jd.Denoiser(lambda x, t, a: {"sample": x}, VPL), args=None), TypeError,
                             r"must return one array with the shape of `x`.*a dict with keys \['sample'\]"),
    "complex model output": (lambda: _sample(jd.Denoiser(lambda x, t, a: x + 1j, VPL), args=None), TypeError,
                             r"returned dtype complex.*real floating-point"),
    "integer model output": (lambda: _sample(jd.Denoiser(lambda x, t, a: jnp.ones(x.shape, int), VPL), args=None),
                             TypeError, r"returned dtype int"),
    "model output of another shape": (lambda: _sample(jd.Denoiser(lambda x, t, a: x[:, :1], VPL), args=None), ValueError,
                                      r"returned shape \(4, 1\) for `x` of shape \(4, 2\)"),
    "guidance is not CFG": (lambda: jd.Denoiser(lambda x, t, a: x, VPL, guidance=2.0), TypeError,
                            r"`guidance` must be `jaxdiff.CFG\(scale\)` or None"),
    # ---------------------------------------------------------------- guidance and thresholding
    "threshold max_value 0": (lambda: _sample(GD.denoiser(VPL, threshold=jd.DynamicThreshold(max_value=0.0))), ValueError,
                              r"`DynamicThreshold.max_value` must be a number >= 1, got 0.0"),
    "threshold ratio 0": (lambda: jd.DynamicThreshold(ratio=0.0), ValueError, r"`DynamicThreshold.ratio` must be a real number in \(0, 1\]"),
    "threshold ratio 1.5": (lambda: jd.DynamicThreshold(ratio=1.5), ValueError, r"`DynamicThreshold.ratio`"),
    "threshold with a noise solver": (lambda: _sample(GD.denoiser(VPL, threshold=jd.DynamicThreshold()), solver=jd.DEIS()),
                                      ValueError, r"Dynamic thresholding acts on the data prediction"),
    "CFG scale per feature": (lambda: _sample(_cfg(scale=jnp.array([1.0, 2.0]))[0], args=_cfg()[1]), ValueError,
                              r"`CFG.scale` must be a scalar, got shape \(2,\).*vmap"),
    "CFG scale per sample": (lambda: _sample(_cfg(scale=jnp.ones(4))[0], args=_cfg()[1]), ValueError,
                             r"`CFG.scale` must be a scalar, got shape \(4,\)"),
    "CFG branches of different shapes": (lambda: _sample(_cfg()[0], args=(jnp.zeros(2), jnp.zeros(3))), ValueError,
                                         r"`cond_args` has shape \(2,\) but `uncond_args` has shape \(3,\)"),
    "CFG args not a pair": (lambda: _sample(_cfg()[0], args=jnp.zeros(2)), ValueError, r"`args` must be the pair"),
    # ---------------------------------------------------------------- SMC
    "Anneal beta inf": (lambda: fkc.Anneal(_gd1(), jnp.inf), ValueError, r"`beta` must be a finite inverse temperature > 0"),
    "Anneal beta 0": (lambda: fkc.Anneal(_gd1(), 0.0), ValueError, r"`beta` must be a finite inverse temperature > 0"),
    "AnnealedProduct beta -1": (lambda: fkc.AnnealedProduct(_gd1(), _gd1(), -1.0), ValueError, r"`beta` must be"),
    "vmapped beta 0 with checks": (
        lambda: checkify.checkify(jax.vmap(lambda b: _fkc(fkc.Anneal(_gd1(), b), checks=True).x))(jnp.array([0.0, 2.0]))[0].throw(),
        Exception, r"The inverse temperature `beta` \(betas\[0\]\) must be > 0"),
    "FKC from pure noise": (lambda: _fkc(fkc.Anneal(_gd1(RF), 2.0), ts=jd.timesteps(RF, 50, "time")), ValueError,
                            r"pure noise for RectifiedFlow \(alpha = 0\), where the FKC SDE is singular"),
    "FKC grid too coarse near noise": (lambda: _fkc(fkc.Anneal(_gd1(RF), 2.0), ts=jd.timesteps(RF, 200, "time", t_start=0.999)),
                                       ValueError, r"`ts` is too coarse in log-SNR near pure noise.*moves lambda by 1.8"),
    "FKC increasing grid": (lambda: _fkc(ts=jnp.array([0.5, 0.9, 0.1])), ValueError, r"`ts` must be strictly decreasing"),
    "FKC ess_threshold 2": (lambda: _fkc(ess_threshold=2.0), ValueError, r"`ess_threshold` must be a real number in \[0, 1\]"),
    "FKC integer key": (lambda: fkc.sample(fkc.Anneal(_gd1(), 2.0), jnp.zeros((8, 1)), jd.timesteps(VPL, 40, "logsnr"), 0), TypeError,
                        r"`key` must be a PRNG key"),
    "resampler returns too few": (lambda: _fkc(resample=lambda k, lw, n: jnp.zeros((n - 1,), jnp.int32)), TypeError,
                                  r"must return 8 integer ancestor indices.*shape \(7,\)"),
    "resampler returns floats": (lambda: _fkc(resample=lambda k, lw, n: jnp.zeros((n,))), TypeError,
                                 r"must return 8 integer ancestor indices.*dtype float"),
    "empty log-weights": (lambda: resampling.systematic(KEY, jnp.zeros((0,)), 4), ValueError,
                          r"`log_weights` must be a 1-D array with at least one entry.*got shape \(0,\)"),
    "2-D log-weights": (lambda: resampling.multinomial(KEY, jnp.zeros((2, 3)), 4), ValueError,
                        r"got shape \(2, 3\). For several particle systems, vmap"),
    "complex log-weights": (lambda: resampling.ess(jnp.zeros(3) + 1j), TypeError, r"`log_weights` must be a real array"),
    "resampler integer key": (lambda: resampling.stratified(0, jnp.zeros(3), 4), TypeError, r"`key` must be a PRNG key"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_raises_a_clear_error(case):
    call, error, pattern = ERRORS[case]
    with pytest.raises(error, match=pattern):
        call()


# ---------------------------------------------------------------------------------------------- recoveries


def test_python_list_grid_equals_the_array():
    np.testing.assert_array_equal(_sample(ts=[float(t) for t in TS]), _sample())


def test_same_object_twice_is_unguided():
    """`args=(p, p)`: guidance has no effect (the model runs once), as for cond == uncond."""
    den, _ = _cfg(scale=7.5)
    p = jnp.array([0.3, -0.2])
    plain = _sample(jd.Denoiser(den.fn, VPL), args=p)
    np.testing.assert_allclose(_sample(den, args=(p, p)), plain, rtol=1e-12)


def test_zero_terminal_snr_v_model_on_the_trailing_grid():
    """DPMSolver and DEIS were NaN from alpha = 0; the limit rows are finite and close to the exact flow."""
    s = jd.VPDiscrete.from_diffusers({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                      "rescale_betas_zero_snr": True})
    ts = jd.timesteps(s, 20, "trailing")
    assert float(s.alpha(ts[0])) == 0.0
    exact = GD.flow(s, X, ts[0], ts[-1])
    err = lambda solver: float(jnp.max(jnp.abs(_sample(GD.denoiser(s, "v"), ts=ts, solver=solver) - exact)))  # noqa: E731
    reference = err(jd.DPMSolverPP(order=2))  # the data formulation, finite before too: 0.114
    for solver in (jd.DPMSolver(order=2), jd.DEIS(order=3), jd.UniPC(order=2, prediction="noise")):
        assert err(solver) < 1.1 * reference, solver  # measured 0.116, 0.119, 0.112


def test_cosine_schedule_reaches_pure_noise_exactly():
    """alpha(1) was cos(pi/2) = 6e-17, giving coefficients of 1e16 in noise solvers; now it is 0."""
    s = jd.VPCosine(s=0.0)
    assert float(s.alpha(1.0)) == 0.0 and float(s.log_alpha(1.0)) == -np.inf and float(s.t_of_lambda(-np.inf)) == 1.0
    errs = [float(jnp.max(jnp.abs(_sample(GD.denoiser(s, "v"), ts=jd.timesteps(s, n, "time", t_start=1.0, t_end=0.05),
                                          solver=jd.PNDM("PLMS")) - GD.flow(s, X, 1.0, 0.05)))) for n in (10, 20)]
    assert errs[1] < errs[0] / 2.5 and errs[1] < 0.06, errs  # measured 0.16, 0.039


def test_fkc_nan_region_is_counted_never_silent():
    """A model that returns NaN in a region: NaN particles get weight zero and are counted in num_nonfinite,
    also with weighted=False, resample=None and ess_threshold=0 (before: NaN particles, num_degenerate = 0)."""
    gd = jd.testing.GaussianData(jnp.array([[1.0]]), jnp.array([[1.0]]))
    exact = gd.denoiser(VPL)
    den = jd.Denoiser(lambda x, t, a: jnp.where(x > 2.5, jnp.nan, exact.fn(x, t, a)), VPL)
    x_T = jnp.linspace(-3.0, 3.0, 16)[:, None]
    for kw in ({"weighted": False}, {"resample": None}, {"ess_threshold": 0.0}, {}):
        res = fkc.sample(fkc.Anneal(den, 2.0), x_T, jd.timesteps(VPL, 40, "logsnr"), KEY, args=gd, **kw)
        assert int(res.num_nonfinite) > 0, kw
        bad = ~jnp.all(jnp.isfinite(res.x), axis=1)
        if kw.get("weighted", True):
            assert bool(jnp.all(jnp.isneginf(res.log_weights[bad]))), kw
        with pytest.raises(FloatingPointError, match="were NaN/inf at"):
            res.raise_if_degenerate()


def test_fkc_out_of_range_ancestors_are_flagged_not_clamped():
    def bad(key, log_weights, n):  # one ancestor out of range per step
        return jnp.arange(n, dtype=jnp.int32).at[0].set(n + 3)

    res = _fkc(resample=bad)
    assert int(res.num_nonfinite) == 40 and int(res.num_degenerate) == 0  # a lost particle at every step
    err, _ = checkify.checkify(lambda: _fkc(resample=bad, checks=True))()
    assert "were NaN/inf at 40 step(s)" in str(err.get())


def test_fkc_vmapped_ess_threshold_is_accepted_and_checked_at_run_time():
    run = jax.vmap(lambda e: _fkc(ess_threshold=e).resampled.sum())
    counts = run(jnp.array([0.0, 1.0]))
    assert int(counts[0]) == 0 and int(counts[1]) == 40
    err, _ = checkify.checkify(jax.vmap(lambda e: _fkc(ess_threshold=e, checks=True).x))(jnp.array([0.5, 3.0]))
    assert "`ess_threshold` must lie in [0, 1]" in str(err.get())


def test_sde_coefficients_at_pure_noise_are_the_limits():
    f, g2 = fkc.sde_coefficients(RF, 1.0)
    assert float(f) == -np.inf and float(g2) == np.inf
    f, g2 = fkc.sde_coefficients(RF, 0.5)
    np.testing.assert_allclose([float(f), float(g2)], [-2.0, 8.0], rtol=1e-12)  # f = -1/(1-t), g^2/s^2 = 2/(t(1-t))
