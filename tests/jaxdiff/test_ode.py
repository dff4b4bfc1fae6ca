"""jaxdiff.ode: the probability-flow ODE as a diffrax term in lambda (data form) and rho (noise form)."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

GD = jd.testing.GaussianData(mean=jnp.array([0.5, -1.0, 2.0]), scale=jnp.array([0.3, 1.0, 2.5]))
SCHEDULES = {"VPLinear": jd.VPLinear(), "VPCosine": jd.VPCosine(), "EDM": jd.EDM()}


@pytest.mark.parametrize("form", jd.ode.FORMS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_time_and_state_conversions_round_trip(name, form):
    s = SCHEDULES[name]
    t = jnp.array([s.t_min, 0.3 * s.t_max, s.t_max])
    u = jd.ode.time(s, t, form)
    assert float(jnp.max(jnp.abs(jd.ode.t_of(s, u, form) - t) / t)) < 1e-10
    expected = s.lambda_(t) if form == "data" else s.sigma(t) / s.alpha(t)
    assert float(jnp.max(jnp.abs(u - expected) / jnp.abs(expected))) < 1e-13
    x = jnp.array([[1.5, -2.0, 0.25]])
    tt = 0.3 * s.t_max
    y = jd.ode.to_state(s, x, tt, form)
    scale = s.sigma(tt) if form == "data" else s.alpha(tt)
    assert float(jnp.max(jnp.abs(y * scale - x))) < 1e-14
    assert float(jnp.max(jnp.abs(jd.ode.from_state(s, y, tt, form) - x))) < 1e-14


@pytest.mark.parametrize("name, form, solver", [("VPLinear", "data", "Tsit5"), ("EDM", "noise", "Dopri5"),
                                                ("VPCosine", "noise", "Tsit5"), ("EDM", "data", "Dopri5")])
def test_diffrax_adaptive_solvers_match_the_exact_flow(name, form, solver):
    s = SCHEDULES[name]
    den = GD.denoiser(s)
    x_T = jax.random.normal(jax.random.key(0), (4, 3)) * s.sigma(s.t_max)
    exact = GD.flow(s, x_T, s.t_max, s.t_min)
    # by hand, as a user would: diffeqsolve on the term, converting times and states
    term = jd.ode.term(den, form)
    s0, s1 = jd.ode.time(s, s.t_max, form), jd.ode.time(s, s.t_min, form)
    sol = diffrax.diffeqsolve(term, getattr(diffrax, solver)(), s0, s1, (s1 - s0) / 64, jd.ode.to_state(s, x_T, s.t_max, form),
                              args=GD, stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-9), max_steps=4096)
    x = jd.ode.from_state(s, sol.ys[-1], s.t_min, form)
    err = float(jnp.max(jnp.abs(x - exact)))
    assert err < 2e-7, err  # |x| up to ~6; measured 1e-9 to 6e-8
    # the wrapper gives the same solve, and counts its evaluations (6 new per step for these FSAL solvers)
    res = jd.ode.solve(den, x_T, s.t_max, s.t_min, solver=getattr(diffrax, solver)(), form=form, args=GD, rtol=1e-9,
                       atol=1e-9)
    assert float(jnp.max(jnp.abs(res.x - x))) < 1e-13
    assert int(res.nfe) == 6 * int(res.num_steps) + 1


def test_euler_in_the_noise_form_is_ddim():
    # y = x/alpha, rho = sigma/alpha: one Euler step y + (rho_t - rho_s) eps is exactly DDIM's update
    s = jd.VPCosine()
    gm = jd.testing.GaussianMixture(jnp.array([0.4, 0.6]), jnp.array([[1.0, -1.0], [-1.0, 0.5]]), jnp.array([0.3, 0.5]))
    den = gm.denoiser(s)
    x_T = jax.random.normal(jax.random.key(2), (5, 2))
    n = 7
    res = jd.ode.solve(den, x_T, 0.9, 0.01, solver=diffrax.Euler(), form="noise", args=gm, num_steps=n)
    rho = jnp.linspace(jd.ode.time(s, 0.9, "noise"), jd.ode.time(s, 0.01, "noise"), n + 1)
    ts = jd.ode.t_of(s, rho, "noise")
    ddim = jd.sample(den, x_T, ts, jd.DDIM(), args=gm)
    assert int(res.nfe) == n and int(res.num_steps) == n
    assert float(jnp.max(jnp.abs(res.x - ddim))) < 1e-6  # measured 5e-12 (the clipped last step rounds rho)


def test_solve_counts_model_evaluations():
    s = jd.VPLinear()
    calls = []

    def count(x):
        calls.append(1)
        return np.zeros((), x.dtype)

    exact_fn = GD.denoiser(s).fn

    def fn(x, t_model, params):
        return exact_fn(x, t_model, params) + jax.experimental.io_callback(count, jax.ShapeDtypeStruct((), x.dtype), x)

    for solver, per_step, extra in ((diffrax.Bosh3(), 3, 1), (diffrax.Heun(), 2, 0)):
        calls.clear()
        res = jd.ode.solve(jd.Denoiser(fn, s, "epsilon"), jnp.ones((2, 3)), s.t_max, s.t_min, solver=solver, args=GD,
                           rtol=1e-4, atol=1e-4)
        jax.block_until_ready(res)
        assert int(res.nfe) == len(calls) == per_step * int(res.num_steps) + extra
        assert int(res.num_steps) > int(res.num_accepted_steps) > 0  # rejected steps are counted too


def _loss(x0):
    return jnp.sum((x0 - 0.3) ** 2)


def test_diffrax_adjoints_agree_with_adjoint_dpm_and_the_exact_gradient():
    s = jd.VPCosine()
    t0, t1 = 0.9, 1e-3
    gd = jd.testing.GaussianData(jnp.linspace(-1.0, 1.0, 4), jnp.linspace(0.5, 1.5, 4))
    x_T = jnp.linspace(-1.5, 1.2, 4)
    den = gd.denoiser(s)
    exact = jax.grad(lambda x, g: _loss(g.flow(s, x, t0, t1)), argnums=(0, 1))(x_T, gd)

    def grad_diffrax(adjoint, form):
        def loss(x, g):
            return _loss(jd.ode.solve(den, x, t0, t1, form=form, args=g, rtol=1e-9, atol=1e-9, adjoint=adjoint).x)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x_T, gd)

    ts = jd.timesteps(s, 40, "logsnr", t_start=t0, t_end=t1)
    ours = jax.jit(jax.grad(lambda x, g: _loss(jd.sample(den, x, ts, jd.UniPC(order=3), args=g,
                                                         adjoint=jd.AdjointDPM())), argnums=(0, 1)))(x_T, gd)

    def rel(a, b):
        return max(float(jnp.linalg.norm(u - v) / jnp.linalg.norm(v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    assert rel(ours, exact) < 1e-4  # AdjointDPM at 40 steps: 2.4e-5 in benchmarks/results/adjoint_vs_diffrax.md
    for adjoint, form in ((diffrax.RecursiveCheckpointAdjoint(), "data"), (diffrax.BacksolveAdjoint(), "noise")):
        g = grad_diffrax(adjoint, form)
        assert rel(g, exact) < 1e-6, (adjoint, form, rel(g, exact))
        assert rel(g, ours) < 1e-4


def test_term_is_differentiable_in_the_schedule_inside_it():
    # the denoiser's arrays are leaves of the term: diffrax's adjoint sees them (here beta_max of VPLinear).
    # Only RecursiveCheckpointAdjoint: the ODE-time endpoints lambda(t) depend on the schedule too, and
    # BacksolveAdjoint cannot differentiate with respect to t0/t1.
    gd = jd.testing.GaussianData(jnp.zeros(2), jnp.array([0.5, 2.0]))
    x_T = jnp.array([[0.7, -1.1]])

    def f(beta_max, adjoint):
        s = jd.VPLinear(beta_max=beta_max)
        return jnp.sum(jd.ode.solve(gd.denoiser(s), x_T, 1.0, 0.01, args=gd, rtol=1e-10, atol=1e-10, adjoint=adjoint).x)

    exact = jax.grad(lambda b: jnp.sum(gd.flow(jd.VPLinear(beta_max=b), x_T, 1.0, 0.01)))(20.0)
    g = jax.jit(jax.grad(f), static_argnums=1)(20.0, diffrax.RecursiveCheckpointAdjoint())
    assert abs(float(g - exact)) < 1e-6 * abs(float(exact)) + 1e-10, (float(g), float(exact))


def test_bad_inputs():
    s = jd.VPLinear()
    den = GD.denoiser(s)
    x = jnp.ones((1, 3))
    with pytest.raises(ValueError, match=r"`form` must be one of \('data', 'noise'\).*got 'eps'"):
        jd.ode.term(den, "eps")
    with pytest.raises(ValueError, match=r"`form` must be one of"):
        jd.ode.time(s, 0.5, "lambda")
    with pytest.raises(TypeError, match=r"`denoiser` must be a `jaxdiff.Denoiser`, got a function"):
        jd.ode.term(lambda x, t, a: x)
    with pytest.raises(TypeError, match=r"`schedule` must be a jaxdiff Schedule"):
        jd.ode.time("VPLinear", 0.5)
    with pytest.raises(ValueError, match=r"explicit Runge-Kutta solvers .* got Kvaerno5. For other diffrax solvers"):
        jd.ode.solve(den, x, 1.0, 0.01, solver=diffrax.Kvaerno5(), args=GD)
    with pytest.raises(ValueError, match=r"`num_steps` must be None or an integer >= 1, got 0"):
        jd.ode.solve(den, x, 1.0, 0.01, num_steps=0, args=GD)
    with pytest.raises(ValueError, match=r"`t_end` must be smaller than `t_start` .* t_start=0.01, t_end=1.0"):
        jd.ode.solve(den, x, 0.01, 1.0, args=GD)
    with pytest.raises(ValueError, match=r"log-SNR must be finite at both ends.*lambda\(t_end=0.0\) = inf"):
        jd.ode.solve(den, x, 1.0, 0.0, args=GD)
