"""optim.dadapt_*: parity with the dadaptation package in float64, first steps by hand, bad input, NaN."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from tests.optim._problems import GUARDED as PROBLEMS
from tests.optim._problems import STEPS, max_rel_diff, reference_trajectory, rel_diffs, run_jax, run_torch

# (case id, optim factory name, dadaptation class name, kwargs shared by both sides, problems)
BOTH = ("logreg", "mlp")
CASES = [
    ("adam-defaults", "dadapt_adam", "DAdaptAdam", {}),
    ("adam-decoupled_bc_growth", "dadapt_adam", "DAdaptAdam",
     {"decouple": True, "weight_decay": 0.05, "use_bias_correction": True, "growth_rate": 1.05}),
    ("adam-coupled_betas_eps_d0", "dadapt_adam", "DAdaptAdam",
     {"weight_decay": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "d0": 1e-5}),
    ("sgd-defaults", "dadapt_sgd", "DAdaptSGD", {}, ("logreg",)),  # diverges on the MLP: see below
    ("sgd-momentum", "dadapt_sgd", "DAdaptSGD", {"momentum": 0.9}),
    ("sgd-momentum_wd_growth_d0", "dadapt_sgd", "DAdaptSGD",
     {"momentum": 0.5, "weight_decay": 0.01, "growth_rate": 1.1, "d0": 1e-5}),
    ("adagrad-defaults", "dadapt_adagrad", "DAdaptAdaGrad", {}),
    ("adagrad-momentum_wd_eps_growth", "dadapt_adagrad", "DAdaptAdaGrad",
     {"momentum": 0.9, "weight_decay": 0.01, "eps": 1e-4, "growth_rate": 1.1, "d0": 1e-5}),
    ("lion-defaults", "dadapt_lion", "DAdaptLion", {}, ("mlp",)),  # diverges on logreg: see below
    ("lion-lr_betas_wd", "dadapt_lion", "DAdaptLion",
     {"learning_rate": 0.1, "betas": (0.95, 0.98), "weight_decay": 0.01}),
]
CASES = [c if len(c) == 5 else (*c, BOTH) for c in CASES]
PARAMS = [(p, *c[:4]) for c in CASES for p in c[4]]


def _torch_runner(cls_name, kwargs):
    def run(problem, steps):
        import dadaptation

        return run_torch(problem, lambda ps: getattr(dadaptation, cls_name)(ps, **kwargs), steps)

    return run


@pytest.mark.reference("torch", "dadaptation")
@pytest.mark.parametrize("problem,case,ours,theirs,kwargs", PARAMS, ids=[f"{p[1]}-{p[0]}" for p in PARAMS])
def test_parity_with_dadaptation(problem, case, ours, theirs, kwargs):
    prob = PROBLEMS[problem]()
    torch_kwargs = {("lr" if k == "learning_rate" else k): v for k, v in kwargs.items()}
    ref = reference_trajectory(prob, _torch_runner(theirs, torch_kwargs))
    worst, at = max_rel_diff(prob, getattr(optim, ours)(**kwargs), ref)
    assert worst <= 1e-6, f"{case}/{problem}: max rel diff {worst:.3g} at step {at}"


@pytest.mark.reference("torch", "dadaptation")
@pytest.mark.parametrize("cls_name,problem", [("DAdaptSGD", "mlp"), ("DAdaptLion", "logreg")])
def test_diverging_reference_defaults_are_invalid_cases_not_passes(cls_name, problem):
    """With their defaults DAdaptSGD (momentum 0) and DAdaptLion blow up here in PyTorch itself."""
    with pytest.raises(AssertionError, match="invalid case: the reference diverged"):
        reference_trajectory(PROBLEMS[problem](), _torch_runner(cls_name, {}))


@pytest.mark.reference("torch", "dadaptation")
def test_optax_contrib_dadapt_adamw_deviates_from_the_reference_defaults():
    import dadaptation

    prob = PROBLEMS["mlp"]()
    ref = run_torch(prob, lambda ps: dadaptation.DAdaptAdam(ps), STEPS)
    contrib = rel_diffs(run_jax(prob, optax.contrib.dadapt_adamw(), STEPS), ref).max()
    assert contrib > 1e-2, contrib
    ref_bc = run_torch(prob, lambda ps: dadaptation.DAdaptAdam(ps, use_bias_correction=True, decouple=True), STEPS)
    preset = optim.dadapt_adam(**optim.DADAPT_ADAM_PRESETS["optax"])
    assert rel_diffs(run_jax(prob, preset, STEPS), ref_bc).max() <= 1e-6


P = jnp.array([1.0, -2.0, 0.5])
G = jnp.array([2.0, -4.0, 0.0])


def test_adam_first_step_by_hand():
    """s = 0 before step 1, so the numerator is 0 and d stays d0; m = d0 (1 - b1) g."""
    u, s = optim.dadapt_adam().update(G, optim.dadapt_adam().init(P), P)
    d0, b1, b2, eps = 1e-6, 0.9, 0.999, 1e-8
    g = np.asarray(G)
    np.testing.assert_allclose(u, -d0 * (1 - b1) * g / (np.sqrt((1 - b2) * g**2) + eps), rtol=1e-14)
    np.testing.assert_allclose(s.grad_sum, d0 * (1 - np.sqrt(b2)) * g, rtol=1e-14)
    assert float(s.d) == d0 and float(s.numerator_weighted) == 0.0


def test_sgd_first_step_by_hand():
    """dlr = d0 / ||g0||; s = dlr g; x = x0 - s; d_hat = 0 so d stays d0."""
    tx = optim.dadapt_sgd()
    u, s = tx.update(G, tx.init(P), P)
    g = np.asarray(G)
    np.testing.assert_allclose(u, -1e-6 * g / np.linalg.norm(g), rtol=1e-14)
    assert float(s.g0_norm) == pytest.approx(np.linalg.norm(g), rel=1e-15) and float(s.d) == 1e-6


def test_adagrad_first_step_by_hand():
    """alpha = 1e-6 + g^2; x = x0 - d0 g / (sqrt(alpha) + eps); d_hat = 0 (sum s^2/a = dlr^2 sum g^2/a)."""
    tx = optim.dadapt_adagrad()
    u, s = tx.update(G, tx.init(P), P)
    g = np.asarray(G)
    np.testing.assert_allclose(u, -1e-6 * g / (np.sqrt(1e-6 + g**2) + 1e-6), rtol=1e-14)
    assert float(s.d) == 1e-6


def test_lion_first_step_by_hand():
    """m = 0, so u = sign(g) and x moves by -d0 sign(g); s = d0 (1 - sqrt(b2)) sign(g)."""
    tx = optim.dadapt_lion()
    u, s = tx.update(G, tx.init(P), P)
    np.testing.assert_array_equal(u, -1e-6 * np.sign(np.asarray(G)))
    np.testing.assert_allclose(s.grad_sum, 1e-6 * (1 - np.sqrt(0.99)) * np.sign(np.asarray(G)), rtol=1e-14)


@pytest.mark.parametrize("name", ["dadapt_adam", "dadapt_sgd", "dadapt_adagrad", "dadapt_lion"])
def test_nonfinite_gradient_skips_the_step_and_keeps_d(name):
    tx = getattr(optim, name)()
    p = jnp.array([1.0, -2.0, 3.0])
    state = tx.init(p)
    for _ in range(5):
        u, state = tx.update(2 * p, state, p)
        p = p + u
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        u, new = tx.update(jnp.array([bad, 1.0, 1.0]), state, p)
        assert np.all(np.asarray(u) == 0), (name, bad)
        assert int(new.num_nonfinite) == int(state.num_nonfinite) + 1
        assert float(new.d) == float(state.d) and int(new.count) == int(state.count)
        for a, b in zip(new[4:], state[4:]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        state = new
    u, state = tx.update(2 * p, state, p)  # and it carries on
    assert np.all(np.isfinite(np.asarray(u))) and int(state.count) == 6
