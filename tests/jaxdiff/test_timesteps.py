import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)


def _indices(ts, n=1000):
    return np.round(np.asarray(ts[:-1]) * n - 1).astype(int)


def test_diffusers_discrete_spacings():
    # Expected integer timesteps are what diffusers' schedulers produce for N = 1000, 10 steps.
    s = jd.VPDiscrete(BETAS)
    assert _indices(jd.timesteps(s, 10, "leading")).tolist() == [900, 810, 720, 630, 540, 450, 360, 270, 180, 90]
    assert _indices(jd.timesteps(s, 10, "leading_ddim")).tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert _indices(jd.timesteps(s, 10, "trailing")).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert _indices(jd.timesteps(s, 10, "linspace")).tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    ts = jd.timesteps(s, 10, "trailing")
    assert float(ts[-1]) == 0.0
    assert float(jd.timesteps(s, 10, "trailing", final="sigma_min")[-1]) == pytest.approx(1e-3)


@pytest.mark.parametrize("spacing", ["time", "quadratic", "logsnr", "karras"])
@pytest.mark.parametrize("final", [None, "zero"])
def test_continuous_spacings_shape_order_ends(spacing, final):
    s = jd.VPLinear()
    ts = np.asarray(jd.timesteps(s, 8, spacing, final=final))
    assert ts.shape == (9,)
    assert np.all(np.diff(ts) < 0)
    assert ts[0] == pytest.approx(1.0)
    assert ts[-1] == (0.0 if final == "zero" else pytest.approx(1e-3))
    if final == "zero":
        assert ts[-2] == pytest.approx(1e-3)


def test_logsnr_is_uniform_in_lambda_and_karras_matches_edm_formula():
    s = jd.VPCosine()
    lam = np.asarray(s.lambda_(jd.timesteps(s, 12, "logsnr")))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)
    e = jd.EDM()
    ts = np.asarray(jd.timesteps(e, 10, "karras"))
    ramp = np.linspace(0, 1, 11)
    karras = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(ts, karras, rtol=1e-10)


def test_bad_grid_requests():
    with pytest.raises(ValueError, match="Unknown `spacing='uniform'`"):
        jd.timesteps(jd.VPLinear(), 10, "uniform")
    with pytest.raises(ValueError, match="needs a `VPDiscrete` schedule"):
        jd.timesteps(jd.VPLinear(), 10, "trailing")
    with pytest.raises(ValueError, match="positive Python int"):
        jd.timesteps(jd.VPLinear(), 0)
    with pytest.raises(ValueError, match="log-SNR is infinite"):
        jd.timesteps(jd.RectifiedFlow(), 10, "logsnr")
    with pytest.raises(ValueError, match="Unknown `final='last'`"):
        jd.timesteps(jd.VPLinear(), 10, final="last")


def _table_sigmas(s):
    acp = np.exp(2.0 * np.asarray(s.log_alphas))
    return np.sqrt((1.0 - acp) / acp)


@pytest.mark.parametrize("n", [7, 10])
def test_linspace_sigmas_noise_levels_and_linspace_ddpm_indices(n):
    """``linspace_sigmas``: noise levels are the table's sigma interpolated at linspace(0, N - 1, n), then 0."""
    s = jd.VPDiscrete(np.asarray(BETAS, np.float64))
    ts = np.asarray(jd.timesteps(s, n, "linspace_sigmas"))
    frac = np.linspace(0, 999, n)[::-1]
    expected = np.interp(frac, np.arange(1000), _table_sigmas(s))
    np.testing.assert_allclose(np.asarray(jnp.exp(-s.lambda_(ts[:-1]))), expected, rtol=1e-12)
    assert ts[-1] == 0.0 and ts[-2] == 1e-3 and ts[0] == 1.0
    if n == 7:  # 999 / 6 is fractional: the grid points are between table entries
        assert not np.allclose(np.asarray(s.model_time(ts[1:-2])) % 1.0, 0.0)
    idx = _indices(jd.timesteps(s, n, "linspace_ddpm"))
    assert idx.tolist() == np.linspace(0, 999, n).round()[::-1].astype(int).tolist()


def test_flow_shift_closed_forms():
    rf = jd.RectifiedFlow()
    u = np.linspace(1.0, 3.0 / (1000 + 2.0), 9)  # diffusers' table end 1/1000, shifted once by 3
    np.testing.assert_allclose(np.asarray(jd.timesteps(rf, 9, "flow", shift=3.0)),
                               np.concatenate([3 * u / (1 + 2 * u), [0.0]]), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(jd.timesteps(rf, 9, "flow")),
                               np.concatenate([np.linspace(1.0, 1e-3, 9), [0.0]]), rtol=1e-14)
    # mu is the exponential time shift, i.e. shift = e^mu on an unshifted table end
    mu = 0.7
    u = np.linspace(1.0, 1e-3, 9)
    np.testing.assert_allclose(np.asarray(jd.timesteps(rf, 9, "flow", mu=mu)),
                               np.concatenate([np.exp(mu) * u / (1 + (np.exp(mu) - 1) * u), [0.0]]), rtol=1e-14)
    assert jd.flow_shift(256) == pytest.approx(0.5, abs=1e-15) and jd.flow_shift(4096) == pytest.approx(1.15, abs=1e-15)
    assert jd.flow_shift(2176) == pytest.approx(0.5 + 0.65 * 1920 / 3840, abs=1e-15)


def test_bad_new_grid_requests():
    s = jd.VPDiscrete(np.asarray(BETAS, np.float64))
    rf = jd.RectifiedFlow()
    for spacing in ("leading_ddim", "linspace_ddpm", "linspace_sigmas"):
        with pytest.raises(ValueError, match=rf"`spacing='{spacing}'` with `final='sigma_min'` ends with a zero-length"):
            jd.timesteps(s, 10, spacing, final="sigma_min")
    with pytest.raises(ValueError, match="needs a `RectifiedFlow` schedule, got VPLinear"):
        jd.timesteps(jd.VPLinear(), 10, "flow")
    with pytest.raises(ValueError, match="Pass one of `shift`"):
        jd.timesteps(rf, 10, "flow", shift=3.0, mu=1.0)
    with pytest.raises(ValueError, match="pass `spacing='flow'` \\(got 'time'\\)"):
        jd.timesteps(rf, 10, "time", shift=3.0)
    with pytest.raises(ValueError, match="`spacing='flow'` ends at t = 0"):
        jd.timesteps(rf, 10, "flow", final="sigma_min")
    with pytest.raises(ValueError, match="takes no `t_start`/`t_end`"):
        jd.timesteps(rf, 10, "flow", t_end=0.01)
    with pytest.raises(ValueError, match="`shift`"):
        jd.timesteps(rf, 10, "flow", shift=-1.0)
    with pytest.raises(ValueError, match="`max_seq_len` and `base_seq_len` are both 256"):
        jd.flow_shift(1024, max_seq_len=256)
    with pytest.raises(ValueError, match="`image_seq_len`"):
        jd.flow_shift(0)
