import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

GD = jd.testing.GaussianData(mean=jnp.array([0.5, -1.0, 2.0]), scale=jnp.array([0.3, 1.5, 0.8]))
X = jax.random.normal(jax.random.key(1), (5, 3))


@pytest.mark.parametrize("prediction", jd.PREDICTIONS)
@pytest.mark.parametrize("schedule", [jd.VPLinear(), jd.VPCosine(), jd.EDM(), jd.RectifiedFlow(), jd.VE()], ids=type)
def test_every_parameterization_recovers_the_exact_predictions(prediction, schedule):
    t = jnp.asarray(0.37 if not isinstance(schedule, jd.EDM) else 1.7)
    x0_exact, eps_exact = GD.x0_eps(schedule, X, t)
    den = GD.denoiser(schedule, prediction)
    x0, eps = den.x0_and_eps(X, t, GD)
    np.testing.assert_allclose(x0, x0_exact, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(eps, eps_exact, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(den.score(X, t, GD), -eps_exact / schedule.sigma(t), rtol=1e-10)


def test_unknown_prediction_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown `prediction='noise'`; expected one of"):
        jd.Denoiser(lambda x, t, a: x, jd.VPLinear(), "noise")


def test_shape_mismatch_is_a_clear_error():
    den = jd.Denoiser(lambda x, t, a: x[:, :1], jd.VPLinear(), "epsilon")
    with pytest.raises(ValueError, match=r"returned shape \(5, 1\) for `x` of shape \(5, 3\)"):
        den.x0(X, 0.5)


def _cond_model(x, t, args):
    params, cond = args
    return params * x + cond[None, :] * t


def test_cfg_combines_branches_in_one_batched_call_and_vmaps_over_scale():
    s = jd.VPLinear()
    params, cond, null = jnp.array(0.5), jnp.array([1.0, 2.0, 3.0]), jnp.zeros(3)
    calls = []

    def model(x, t, args):
        calls.append(1)
        return _cond_model(x, t, args)

    den = jd.Denoiser(model, s, "epsilon", guidance=jd.CFG(3.0))
    out = den.raw(X, 0.4, ((params, cond), (params, null)))
    assert len(calls) == 1  # one (vmapped) trace of the model for both branches
    c, u = _cond_model(X, 0.4, (params, cond)), _cond_model(X, 0.4, (params, null))
    np.testing.assert_allclose(out, u + 3.0 * (c - u), rtol=1e-12)

    scales = jnp.array([0.0, 1.0, 7.5])
    outs = jax.vmap(lambda w: jd.Denoiser(_cond_model, s, "epsilon", guidance=jd.CFG(w)).raw(
        X, 0.4, ((params, cond), (params, null))))(scales)
    for w, o in zip(scales, outs):
        np.testing.assert_allclose(o, u + w * (c - u), rtol=1e-12)
    with pytest.raises(ValueError, match=r"must be the pair `\(cond_args, uncond_args\)`"):
        den.raw(X, 0.4, (params, cond, null))


def test_dynamic_threshold_matches_imagen_rule():
    x0 = jnp.stack([jnp.linspace(-3, 3, 12), jnp.linspace(-0.5, 0.5, 12)])
    out = jd.DynamicThreshold(ratio=0.9, max_value=2.0)(x0)
    for row_in, row_out in zip(np.asarray(x0), np.asarray(out)):
        s = np.clip(np.quantile(np.abs(row_in), 0.9), 1.0, 2.0)
        np.testing.assert_allclose(row_out, np.clip(row_in, -s, s) / s, rtol=1e-12)
    with pytest.raises(ValueError, match="needs a batch axis"):
        jd.DynamicThreshold()(jnp.ones(3))
