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
