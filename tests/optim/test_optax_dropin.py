"""optim as a drop-in for optax.contrib: the call patterns of optax.contrib's docs and tests for the
algorithms both packages have (one row per distinct pattern: the defaults, the calls of optax's
``_common_test.py``, ``_mechanic_test.py`` and ``_schedule_free_test.py``, and positional calls that
fix the argument order), run side by side with ``optim.`` in front.

Each row is one call, written once and evaluated against both modules (``call(optax.contrib)`` and
``call(optim)``), so the arguments, their order and their names are exactly the optax code's. The
runs are 60 float64 steps (COCOB: 30) on a small tanh network, each ``update`` given optax's extra
``value=``. ``same`` rows must agree to 1e-10 (relative, per step, train and evaluation iterates;
every run moves by more than 1e-6); the other rows are the documented differences of defaults or
algorithm: the gap must be visible (> 1e-6), and where a documented setting reproduces optax
(``fix``), that setting must agree to 1e-10. The README's drop-in table is this one.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from tests.optim import _problems as pp

STEPS = 60
SAME_TOL = 1e-10


class Row(NamedTuple):
    call: str  # the call as written in optax's docs/tests (``m`` is the module)
    make: Callable  # module -> transform
    same: bool
    fix: Callable | None = None  # () -> the optim transform that reproduces optax, for DIFFERENT rows
    why: str = ""
    steps: int = STEPS


def _mask(params):
    return {k: k.startswith("w") for k in params}  # decay the weights, not the biases


ROWS = [
    # prodigy: optax always applies Adam's bias correction; the reference (our default) does not
    Row("prodigy(learning_rate=1e-1)", lambda m: m.prodigy(learning_rate=1e-1), False,
        lambda: optim.prodigy(learning_rate=1e-1, use_bias_correction=True), "bias correction always on in optax"),
    Row("prodigy(1.0, (0.9, 0.99), estim_lr0=1e-5, estim_lr_coef=0.5, weight_decay=1e-3)",
        lambda m: m.prodigy(1.0, (0.9, 0.99), estim_lr0=1e-5, estim_lr_coef=0.5, weight_decay=1e-3), False,
        lambda: optim.prodigy(1.0, (0.9, 0.99), estim_lr0=1e-5, estim_lr_coef=0.5, weight_decay=1e-3,
                              use_bias_correction=True),
        "bias correction always on in optax"),
    Row("dadapt_adamw(1.0, (0.9, 0.99), 1e-8, 1e-5, 1e-3)", lambda m: m.dadapt_adamw(1.0, (0.9, 0.99), 1e-8, 1e-5, 1e-3),
        True),
    Row("dog()", lambda m: m.dog(), True),
    Row("dog(0.5, ('distance', 1e-3), 1e-8, 1e-3, mask)", lambda m: m.dog(0.5, ("distance", 1e-3), 1e-8, 1e-3, _mask),
        True),
    Row("dowg(learning_rate=1.0)", lambda m: m.dowg(learning_rate=1.0), False,
        lambda: optim.dowg(learning_rate=1.0, **optim.DOWG_PRESETS["optax"]),
        "defaults: optax eps=1e-4 (also its initial squared distance), ours the paper's relative r_eps"),
    Row("dowg(1.0, 1e-4, 1e-4, 1e-3)", lambda m: m.dowg(1.0, 1e-4, 1e-4, 1e-3), True),
    # COCOB's per-coordinate max() switches amplify rounding: the two agree to 1e-14 until a switch near
    # step 35 flips on one side first (as it does for a 1e-15 change of x0), so its rows stop at 30 steps
    Row("cocob()", lambda m: m.cocob(), True, steps=30),
    Row("cocob(0.5, 30.0, 1e-6, 1e-3, mask)", lambda m: m.cocob(0.5, 30.0, 1e-6, 1e-3, _mask), True, steps=30),
    Row("mechanize(sgd(0.1), weight_decay=1e-2, eps=1e-10, s_init=1e-8, num_betas=6)",
        lambda m: m.mechanize(optax.sgd(0.1), weight_decay=1e-2, eps=1e-10, s_init=1e-8, num_betas=6), False,
        None, "optax clamps h to [-m, m] and starts m at 0 (not in the paper)"),
    Row("schedule_free_sgd()", lambda m: m.schedule_free_sgd(), True),
    Row("schedule_free_sgd(learning_rate=1e-2, warmup_steps=5000)",
        lambda m: m.schedule_free_sgd(learning_rate=1e-2, warmup_steps=5000), False, None,
        "optax's warmup lags the averaging weight by one step (its first z step has lr 0); ours is the reference's"),
    Row("schedule_free_adamw(learning_rate=1.0, b1=0.9, weight_decay=1e-4)",
        lambda m: m.schedule_free_adamw(learning_rate=1.0, b1=0.9, weight_decay=1e-4), True),
    Row("schedule_free(sgd(0.5), learning_rate=0.5)", lambda m: m.schedule_free(optax.sgd(0.5), learning_rate=0.5),
        True),
    Row("schedule_free(adam(1e-2, b1=0.0), 1e-2, 0.8, 1.0)",
        lambda m: m.schedule_free(optax.adam(1e-2, b1=0.0), 1e-2, 0.8, 1.0), True),
    Row("schedule_free(adamw(1.0, b1=0.0, weight_decay=1e-4), learning_rate=1.0, b1=0.9)",
        lambda m: m.schedule_free(optax.adamw(1.0, b1=0.0, weight_decay=1e-4), learning_rate=1.0, b1=0.9), False,
        None, "optax hands the base y, the reference and ours z: a base's own decay acts at y there, at z here"),
]


def _run(tx, eval_fn, steps):
    """``steps`` steps on pp.mlp(); per step the params and (for schedule-free) the evaluation iterate."""
    prob = pp.mlp()
    params = {k: jnp.asarray(v, jnp.float64) for k, v in prob.params0.items()}
    vg = jax.value_and_grad(prob.loss_jax)

    def body(carry, _):
        p, s = carry
        value, g = vg(p)
        u, s = tx.update(g, s, p, value=value)  # optax's docstrings pass value=; both must ignore it
        p = optax.apply_updates(p, u)
        return (p, s), {"y": p, "x": p if eval_fn is None else eval_fn(s, p)}

    _, traj = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps))(params)
    traj = jax.tree.map(np.asarray, traj)
    return [{f"{w}/{k}": traj[w][k][i] for w in traj for k in traj[w]} for i in range(steps)]


def _eval(module, call):
    return module.schedule_free_eval_params if call.startswith("schedule_free") else None


@pytest.mark.parametrize("row", ROWS, ids=[r.call for r in ROWS])
def test_optax_contrib_call_runs_with_optim_and_means_the_same(row):
    theirs = _run(row.make(optax.contrib), _eval(optax.contrib, row.call), row.steps)
    ours = _run(row.make(optim), _eval(optim, row.call), row.steps)
    diff = pp.rel_diffs(ours, theirs).max()
    moved = pp.rel_diffs(theirs, [theirs[0]] * row.steps).max()
    assert moved > 1e-6, f"{row.call}: the run barely moves ({moved:.2g}), the comparison would be vacuous"
    if row.same:
        assert diff <= SAME_TOL, f"{row.call}: max rel diff {diff:.3g}"
        return
    assert diff > 1e-6, f"{row.call}: documented as different ({row.why}) but agrees to {diff:.2g}"
    if row.fix is not None:
        fixed = pp.rel_diffs(_run(row.fix(), _eval(optim, row.call), row.steps), theirs).max()
        assert fixed <= SAME_TOL, f"{row.call}: the documented fix differs by {fixed:.3g}"


SHARED = ["prodigy", "dadapt_adamw", "dog", "dowg", "cocob", "mechanize", "schedule_free", "schedule_free_sgd",
          "schedule_free_adamw", "schedule_free_eval_params"]


@pytest.mark.parametrize("name", SHARED)
def test_names_and_positional_order_as_in_optax(name):
    """optax.contrib's parameters are a prefix of ours, position by position (ours beyond it are
    keyword-only), and every optax keyword is accepted (prodigy keeps prodigyopt's d0/d_coef in the
    positional slots and takes optax's estim_lr0/estim_lr_coef as keywords)."""
    import inspect

    theirs = list(inspect.signature(getattr(optax.contrib, name)).parameters)
    ours = inspect.signature(getattr(optim, name)).parameters
    positional = [k for k, v in ours.items() if v.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    renamed = {"estim_lr0": "d0", "estim_lr_coef": "d_coef"} if name == "prodigy" else {}
    assert [renamed.get(k, k) for k in theirs] == positional, (theirs, positional)
    assert all(k in ours for k in theirs)


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adamw", "dog", "dowg", "cocob", "schedule_free_sgd",
                                  "schedule_free_adamw"])
def test_multisteps_accumulates_and_bf16_updates_stay_bf16(name):
    """optax.contrib's gradient-accumulation and dtype checks: the first of 4 MultiSteps updates is all
    zeros, and bfloat16 parameters get bfloat16 updates."""
    tx = optax.MultiSteps(getattr(optim, name)(), every_k_schedule=4)
    params = jnp.array([1.0, 2.0], jnp.bfloat16)
    u, _ = jax.jit(tx.update)(2 * params, tx.init(params), params)
    assert u.dtype == jnp.bfloat16 and bool(jnp.all(u == 0))
    u, _ = jax.jit(getattr(optim, name)().update)(2 * params, getattr(optim, name)().init(params), params)
    assert u.dtype == jnp.bfloat16
