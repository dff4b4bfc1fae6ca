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


def _exact_batched(schedule, prediction, calls=None):
    """GaussianData's exact model for a batch with one time per sample (the analytic model vmapped over it)."""

    def fn(x, t_model, params):
        if calls is not None:
            calls.append(jnp.shape(t_model))
        t = jnp.broadcast_to(schedule.t_of_model_time(t_model), x.shape[:1])

        def one(xi, ti):
            x0, eps = params.x0_eps(schedule, xi, ti)
            return jd.testing.from_x0_eps(schedule, ti, xi, x0, eps, prediction)

        return jax.vmap(one)(x, t)

    return jd.Denoiser(fn, schedule, prediction)


PER_SAMPLE_SCHEDULES = {
    "vp_linear": (jd.VPLinear(), [0.05, 0.2, 0.37, 0.6, 0.95]),
    "vp_discrete": (jd.VPDiscrete(np.linspace(1e-4, 0.02, 1000)), [0.001, 0.2005, 0.37, 0.6, 1.0]),
    "edm": (jd.EDM(), [0.01, 0.3, 1.7, 9.0, 80.0]),
    "rectified_flow": (jd.RectifiedFlow(), [0.05, 0.2, 0.37, 0.6, 0.95]),
}


@pytest.mark.parametrize("prediction", jd.PREDICTIONS)
@pytest.mark.parametrize("name", PER_SAMPLE_SCHEDULES)
def test_per_sample_times_equal_a_loop_of_scalar_calls(prediction, name):
    schedule, times = PER_SAMPLE_SCHEDULES[name]
    t = jnp.asarray(times)
    calls = []
    den = _exact_batched(schedule, prediction, calls)
    x0, eps = jax.jit(lambda x, tt: den.x0_and_eps(x, tt, GD))(X, t)
    score = jax.jit(lambda x, tt: den.score(x, tt, GD))(X, t)
    assert calls[0] == (5,)  # the model received one model time per sample
    single = jax.jit(lambda x, tt: (*den.x0_and_eps(x, tt, GD), den.score(x, tt, GD)))
    for i in range(X.shape[0]):
        x0_i, eps_i, score_i = single(X[i : i + 1], t[i])
        np.testing.assert_allclose(x0[i : i + 1], x0_i, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(eps[i : i + 1], eps_i, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(score[i : i + 1], score_i, rtol=1e-12, atol=1e-14)
        # and each is the exact posterior mean at its own time
        x0_exact, eps_exact = GD.x0_eps(schedule, X[i], t[i])
        np.testing.assert_allclose(x0_i[0], x0_exact, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(eps_i[0], eps_exact, rtol=1e-10, atol=1e-12)


def test_per_sample_times_broadcast_over_image_axes_with_guidance():
    # x of shape (B, H, W, C): coefficients must be reshaped to (B, 1, 1, 1) (rank promotion raises here)
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 2))
    t = jnp.array([0.1, 0.5, 0.9])

    def model(x, t_model, args):
        w, label = args
        return w * x + (t_model[:, None, None, None] if jnp.ndim(t_model) else t_model) * label

    for prediction in ("velocity", "v", "epsilon"):
        den = jd.Denoiser(model, jd.VPCosine(), prediction, guidance=jd.CFG(2.0))
        args = ((jnp.array(0.3), jnp.array(1.0)), (jnp.array(0.3), jnp.array(0.0)))
        x0, eps = den.x0_and_eps(x, t, args)
        for i in range(3):
            x0_i, eps_i = den.x0_and_eps(x[i : i + 1], t[i], args)
            np.testing.assert_allclose(x0[i : i + 1], x0_i, rtol=1e-12)
            np.testing.assert_allclose(eps[i : i + 1], eps_i, rtol=1e-12)


def test_per_sample_time_shape_mismatch_is_a_clear_error():
    den = jd.Denoiser(lambda x, t, a: x, jd.VPLinear(), "epsilon")
    with pytest.raises(ValueError, match=r"one time per sample; got `t` of shape \(4,\) for `x` of shape \(5, 3\)"):
        den.x0(X, jnp.full(4, 0.5))
    with pytest.raises(ValueError, match=r"got `t` of shape \(5, 1\)"):
        den.eps(X, jnp.full((5, 1), 0.5))
