"""jaxdiff.metrics against closed forms: Frechet distance, accuracy, solver error, the reference ODE solve."""

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import jaxdiff as jd
from jaxdiff.metrics import (
    Classifier,
    class_accuracy,
    frechet_distance,
    gaussian_frechet_distance,
    reference_solve,
    solver_error,
)


def _spd(rng, d, cond=20.0):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


def _with_exact_moments(rng, n, mean, cov):
    """n points whose sample mean and (ddof=1) sample covariance are exactly ``mean`` and ``cov``."""
    z = rng.normal(size=(n, mean.shape[0]))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: cov(z) = I
    return mean + z @ np.linalg.cholesky(cov).T


# ---------------------------------------------------------------- Frechet distance


def test_gaussian_fd_commuting_covariances_closed_form():
    # S1 = Q diag(l1) Q^T, S2 = Q diag(l2) Q^T commute: d^2 = |m1 - m2|^2 + sum (sqrt(l1) - sqrt(l2))^2
    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    l1, l2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    got = gaussian_frechet_distance(m1, (q * l1) @ q.T, m2, (q * l2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-12)


def test_gaussian_fd_general_pair_matches_scipy_sqrtm():
    # non-commuting pair: tr (S1^1/2 S2 S1^1/2)^1/2 = tr (S1 S2)^1/2, the textbook (non-symmetric) form
    rng = np.random.default_rng(1)
    d = 8
    s1, s2 = _spd(rng, d), _spd(rng, d, cond=5.0)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2.0 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert gaussian_frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-10)
    assert gaussian_frechet_distance(m2, s2, m1, s1) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_samples_with_known_moments():
    rng = np.random.default_rng(2)
    d = 5
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d), _spd(rng, d, cond=3.0)
    a = _with_exact_moments(rng, 300, m1, s1)
    b = _with_exact_moments(rng, 200, m2, s2)  # different n on each side is allowed
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2.0 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # float32 JAX features go through float64 NumPy: same answer to float32 rounding of the inputs
    assert frechet_distance(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_symmetric_zero_and_translation():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(100, 6)), rng.gamma(2.0, size=(80, 6))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    assert frechet_distance(a, a) < 1e-10
    shift = rng.normal(size=6)
    assert frechet_distance(a, a + shift) == pytest.approx(np.sum(shift**2), rel=1e-9)
    # rank-deficient covariances (n < d): no NaN (eigenvalues clipped at 0); the square root of the
    # round-off-sized eigenvalues (~1e-16) costs ~sqrt(1e-16) = 1e-8 per zero eigenvalue, as in any sqrtm
    few = rng.normal(size=(4, 10))
    assert frechet_distance(few, few + shift[0]) == pytest.approx(10 * shift[0] ** 2, abs=1e-6)


def test_frechet_distance_small_sample_bias_shrinks_like_one_over_n():
    # two independent samples of one Gaussian: d^2 = 0, but the plug-in estimate is biased ~ 1/n
    rng = np.random.default_rng(4)
    d = 4

    def mean_fd(n):
        return np.mean([frechet_distance(rng.normal(size=(n, d)), rng.normal(size=(n, d))) for _ in range(40)])

    small, large = mean_fd(100), mean_fd(1000)
    # leading bias for identity covariances: 2d/n (means) + d(d+1)/(2n) (covariances) = 0.18 at n = 100
    assert small == pytest.approx((2 * d + d * (d + 1) / 2) / 100, rel=0.25)
    assert 6.0 < small / large < 15.0


def test_frechet_distance_errors():
    a = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"`features_a` must be a 2-D array .* got shape \(5,\)"):
        frechet_distance(a[:, 0], a)
    with pytest.raises(ValueError, match=r"`features_b` must be a 2-D array \(num_samples >= 2.* got shape \(1, 3\)"):
        frechet_distance(a, a[:1])
    with pytest.raises(ValueError, match=r"same feature dimension, got 3 and 2"):
        frechet_distance(a, a[:, :2])
    with pytest.raises(ValueError, match=r"`features_a` contains NaN or inf \(1 entries\)"):
        frechet_distance(np.where(np.arange(15).reshape(5, 3) == 0, np.nan, a), a)
    with pytest.raises(ValueError, match=r"`cov_b` must have shape \(2, 2\) \(d = 2 from `mean_a`\), got \(3, 3\)"):
        gaussian_frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


# ---------------------------------------------------------------- classifier, accuracy, solver error


def _linear_classifier(w):
    """Logits = flatten(x) @ w; features = flatten(x)."""

    def apply(params, x):
        f = x.reshape(x.shape[0], -1)
        return f @ params, f

    return Classifier(apply, jnp.asarray(w), (2, 2, 1))


def test_classifier_and_class_accuracy_on_a_linear_model():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 3))
    clf = _linear_classifier(w)
    x = rng.normal(size=(50, 2, 2, 1))
    expected_pred = np.argmax(x.reshape(50, 4) @ w, axis=1)
    labels = np.where(rng.uniform(size=50) < 0.7, expected_pred, (expected_pred + 1) % 3).astype(np.int32)
    np.testing.assert_array_equal(clf.predict(x), expected_pred)
    assert clf.predict(x).dtype == jnp.int32
    np.testing.assert_allclose(clf.features(x), x.reshape(50, 4))
    acc = class_accuracy(clf, x, labels)
    assert float(acc) == pytest.approx(np.mean(labels == expected_pred), abs=1e-15)
    # a pytree: the classifier passes through jit as an argument
    assert float(jax.jit(class_accuracy)(clf, x, labels)) == float(acc)


def test_classifier_and_accuracy_errors():
    clf = _linear_classifier(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 2, 2, 1\) .* got \(2, 2, 1\)"):
        clf.logits(jnp.zeros((2, 2, 1)))
    with pytest.raises(TypeError, match=r"`x` must be floating point .* got dtype uint8"):
        clf.features(np.zeros((3, 2, 2, 1), np.uint8))
    x = jnp.zeros((3, 2, 2, 1))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(3,\), one label per image of `x`, got \(2,\)"):
        class_accuracy(clf, x, jnp.zeros(2, jnp.int32))
    with pytest.raises(TypeError, match=r"`labels` must be integers .* got dtype float"):
        class_accuracy(clf, x, jnp.zeros(3))


def test_solver_error_is_rms_over_everything():
    rng = np.random.default_rng(6)
    x, ref = rng.normal(size=(7, 3, 2)), rng.normal(size=(7, 3, 2))
    assert float(solver_error(x, ref)) == pytest.approx(np.sqrt(np.mean((x - ref) ** 2)), rel=1e-14)
    assert float(jax.jit(solver_error)(x, x)) == 0.0
    with pytest.raises(ValueError, match=r"same shape, got \(7, 3, 2\) and \(3, 2\)"):
        solver_error(x, ref[0])


# ---------------------------------------------------------------- reference_solve

GD = jd.testing.GaussianData(mean=jnp.array([0.5, -1.0, 2.0]), scale=jnp.array([0.3, 1.0, 2.5]))
SCHEDULES = {
    "VPLinear": jd.VPLinear(),
    "VPCosine": jd.VPCosine(),
    "VPDiscrete": jd.VPDiscrete(jnp.linspace(1e-4, 0.02, 1000)),
    "EDM": jd.EDM(),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_reference_solve_matches_exact_gaussian_flow(name):
    s = SCHEDULES[name]
    x_T = jax.random.normal(jax.random.key(0), (4, 3)) * s.sigma(s.t_max)
    exact = GD.flow(s, x_T, s.t_max, s.t_min)
    tight = reference_solve(GD.denoiser(s), x_T, s.t_max, s.t_min, args=GD, rtol=1e-9, atol=1e-9)
    assert tight.x.dtype == jnp.float64
    assert float(jnp.max(jnp.abs(tight.x - exact))) < 1e-8  # |x| up to 6.5
    if name == "VPLinear":  # the default tolerances: error ~ tolerance, in fewer model calls
        default = reference_solve(GD.denoiser(s), x_T, s.t_max, s.t_min, args=GD)
        assert float(jnp.max(jnp.abs(default.x - exact))) < 1e-6
        assert int(default.nfe) < int(tight.nfe)


def test_reference_solve_counts_model_evaluations():
    s = jd.VPLinear()
    calls = []

    def count(x):
        calls.append(1)
        return np.zeros((), x.dtype)

    exact_fn = GD.denoiser(s).fn

    def fn(x, t_model, params):
        # the callback's (zero) output feeds the prediction, so every evaluation really runs it
        return exact_fn(x, t_model, params) + jax.experimental.io_callback(count, jax.ShapeDtypeStruct((), x.dtype), x)

    ref = reference_solve(jd.Denoiser(fn, s, "epsilon"), jnp.ones((2, 3)), s.t_max, s.t_min, args=GD)
    jax.block_until_ready(ref)
    assert int(ref.nfe) == len(calls) == 13 * int(ref.num_steps) + 1


def test_reference_solve_is_the_limit_of_unipc_on_a_mixture():
    # exact score of a 2-d, two-component mixture: UniPC(3) converges to the reference at its order (4,
    # and faster before the asymptotic regime), to 2e-5 at 100 steps (1e-6 at 200), far above the
    # reference's own error (~1e-10).
    gm = jd.testing.GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [1.5, -0.5]]), jnp.array([0.2, 0.4]))
    s = jd.VPLinear()
    den = gm.denoiser(s)
    x_T = jax.random.normal(jax.random.key(1), (16, 2))
    ref = reference_solve(den, x_T, s.t_max, s.t_min, args=gm, rtol=1e-10, atol=1e-10)
    default = reference_solve(den, x_T, s.t_max, s.t_min, args=gm)  # same compiled solve, other tolerances
    assert float(solver_error(default.x, ref.x)) < 1e-7
    jitted = jax.jit(reference_solve, static_argnames=("max_steps",))(den, x_T, s.t_max, s.t_min, args=gm, rtol=1e-10, atol=1e-10)
    assert float(solver_error(jitted.x, ref.x)) < 1e-13
    errs = []
    for n in (50, 100):
        x = jax.jit(lambda x, ts: jd.sample(den, x, ts, solver=jd.UniPC(order=3), args=gm))(x_T, jd.timesteps(s, n, "logsnr"))
        errs.append(float(solver_error(x, ref.x)))
    assert np.log2(errs[0] / errs[1]) > 3.5, errs  # measured 4.9 (5.8e-4 -> 2.0e-5)
    assert errs[1] < 4e-5


def test_reference_solve_errors():
    s = jd.VPLinear()
    den = GD.denoiser(s)
    x = jnp.ones((1, 3))
    with pytest.raises(ValueError, match=r"log-SNR must be finite at both ends, got lambda\(t_start=1.0\) = .* lambda\(t_end=0.0\) = inf"):
        reference_solve(den, x, 1.0, 0.0, args=GD)
    with pytest.raises(ValueError, match=r"`t_end` must be smaller than `t_start` .* t_start=0.001, t_end=1.0"):
        reference_solve(den, x, s.t_min, s.t_max, args=GD)
    flow = jd.RectifiedFlow()
    with pytest.raises(ValueError, match=r"lambda\(t_start=1.0\) = -inf"):
        reference_solve(GD.denoiser(flow), x, 1.0, 0.5, args=GD)
    with pytest.raises(ValueError, match=r"`denoiser` must be a `jaxdiff.Denoiser`, got function"):
        reference_solve(lambda x, t, a: x, x, 1.0, 0.5)
