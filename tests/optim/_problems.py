"""Small float64 problems run side by side in JAX and in a reference optimizer (PyTorch or NumPy).

Both sides start from the same NumPy parameters and see gradients of the same loss at their own
iterate, so any difference in the optimizer shows up in the trajectory. The distance between
trajectories is measured per step as ``max|a - b| / max|b|`` over all parameters (a norm-wise
relative error: element-wise ratios blow up at zero entries).

Two families of the same two problems (a logistic regression with a shape-() bias leaf, LDoG's scalar
case, and a small tanh network):

* ``PROBLEMS``: learnable labels (a noisy linear teacher). With random labels DoG/DoWG reach the edge of
  stability within 200 steps and rounding differences grow ~3x per step, which tests nothing.
* ``GUARDED``: for the 200-step comparisons at 1e-6 of D-Adaptation, Prodigy, Mechanic and COCOB,
  whose steps grow fast: effectively random labels, which the net slowly memorises; that keeps every
  reference trajectory well conditioned. :func:`reference_trajectory` checks it with two guards, so
  that a bad case fails as *invalid* instead of passing or failing for the wrong reason: the
  reference must not diverge (finite, bounded, lower final loss than at the start; a transient spike
  is allowed, Prodigy overshoots while ``d`` grows), and a control run from parameters perturbed by
  1e-15 (relative) must stay within ``CONTROL_TOL`` = 1e-7 of it (10x below the 1e-6 bar). With
  Prodigy's defaults a 64-sample MLP with learnable labels is chaotic (the control reaches 3e-3 by
  step 200: no implementation could match it to 1e-6); on ``GUARDED`` every case has a control of
  5e-8 or less.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

STEPS = 200
CONTROL_TOL = 1e-7


class Problem(NamedTuple):
    name: str
    params0: dict  # name -> float64 numpy array
    loss_jax: Callable  # params (dict of jax arrays) -> scalar
    loss_torch: Callable  # params (dict of torch tensors) -> scalar tensor


def logistic_regression(seed: int = 0, n: int = 64, d: int = 5, label_noise: float = 0.3,
                        init_scale: float = 0.5) -> Problem:
    """Binary logistic regression, labels ``x w* + label_noise * e > 0``; the bias is a shape-() leaf."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (x @ rng.normal(size=d) + label_noise * rng.normal(size=n) > 0).astype(np.float64)
    params0 = {"b": np.asarray(0.1), "w": init_scale * rng.normal(size=d)}

    def loss_jax(p):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ p["w"] + p["b"], y))

    def loss_torch(p):
        import torch

        return torch.nn.functional.binary_cross_entropy_with_logits(
            torch.from_numpy(x) @ p["w"] + p["b"], torch.from_numpy(y)
        )

    return Problem("logreg", params0, loss_jax, loss_torch)


def mlp(seed: int = 0, n: int = 64, d: int = 5, hidden: int = 8, classes: int = 3, label_noise: float = 0.5) -> Problem:
    """A tanh network d-hidden-classes, softmax cross-entropy on labels ``argmax(x W + label_noise * e)``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    labels = np.argmax(x @ rng.normal(size=(d, classes)) + label_noise * rng.normal(size=(n, classes)), axis=1)
    params0 = {
        "b1": 0.1 * rng.normal(size=hidden),
        "b2": np.zeros(classes),
        "w1": rng.normal(size=(d, hidden)) / np.sqrt(d),
        "w2": rng.normal(size=(hidden, classes)) / np.sqrt(hidden),
    }

    def loss_jax(p):
        logits = jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"] + p["b2"][None, :]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def loss_torch(p):
        import torch

        logits = torch.tanh(torch.from_numpy(x) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))

    return Problem("mlp", params0, loss_jax, loss_torch)


PROBLEMS = {"logreg": logistic_regression, "mlp": mlp}
GUARDED = {
    "logreg": functools.partial(logistic_regression, seed=0, n=128, d=6, label_noise=1.0, init_scale=0.3),
    "mlp": functools.partial(mlp, seed=1, n=512, label_noise=1e9),
}


# ------------------------------------------------------------------------------------------ drivers


def run_torch(problem: Problem, make_optimizer: Callable, steps: int, record: Callable | None = None):
    """Run a torch optimizer; return a list of per-step dicts (the params after each step).

    ``make_optimizer(list_of_tensors)`` builds it (tensors in sorted key order, as JAX
    flattens dicts). ``record(optimizer, params)``, if given, returns what to store instead
    of the raw parameters (e.g. schedule-free's eval-mode ``x``); ``params`` is a
    ``torch.nn.ParameterDict``, so it can also serve as a module (for averagers).
    """
    import torch

    torch.set_num_threads(1)  # tiny tensors: thread hand-off costs 10x the arithmetic on a busy machine
    params = torch.nn.ParameterDict(
        {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in sorted(problem.params0.items())}
    )
    opt = make_optimizer([params[k] for k in sorted(params)])
    if hasattr(opt, "train"):
        opt.train()
    out = []
    for _ in range(steps):
        opt.zero_grad()
        problem.loss_torch(params).backward()
        opt.step()
        if record is None:
            out.append({k: v.detach().numpy().copy() for k, v in params.items()})
        else:
            out.append(record(opt, params))
    return out


def run_jax(problem: Problem, tx: optax.GradientTransformation, steps: int, record: Callable | None = None):
    """Run ``tx`` for ``steps`` under one ``lax.scan``; return per-step dicts like :func:`run_torch`.

    ``record(state, params)`` maps the state after a step to what is stored (default: params).
    """
    params = {k: jnp.asarray(v, jnp.float64) for k, v in problem.params0.items()}
    grad = jax.grad(problem.loss_jax)

    def body(carry, _):
        p, s = carry
        u, s = tx.update(grad(p), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), (p if record is None else record(s, p))

    _, traj = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps))(params)
    traj = jax.tree.map(np.asarray, traj)
    return [{k: v[i] for k, v in traj.items()} for i in range(steps)]


def rel_diffs(ours: list, ref: list) -> np.ndarray:
    """Per step, ``max|ours - ref| / max|ref|`` over all parameters."""
    out = []
    for a, b in zip(ours, ref, strict=True):
        num = max(np.max(np.abs(a[k] - b[k])) for k in b)
        den = max(np.max(np.abs(b[k])) for k in b)
        out.append(num / den)
    return np.asarray(out)


def max_rel_diff(problem: Problem, tx, ref: list, steps: int = STEPS) -> tuple[float, int]:
    """The largest per-step relative parameter difference and the step where it occurs."""
    diffs = rel_diffs(run_jax(problem, tx, steps), ref)
    return float(diffs.max()), int(np.argmax(diffs))


# ------------------------------------------------------------------------------------------ guards


def assert_reference_valid(problem: Problem, ref: list) -> None:
    """A diverging reference makes the comparison meaningless: fail, never pass.

    Valid means finite, bounded, and ending below the starting loss. The largest loss along
    the way is reported too: an edge-of-stability spike amplifies rounding by ~3x per step.
    """
    loss = jax.jit(problem.loss_jax)
    finite = all(np.all(np.isfinite(v)) for step in ref for v in step.values())
    size = max(np.max(np.abs(v)) for v in ref[-1].values())
    start = float(loss({k: jnp.asarray(v) for k, v in problem.params0.items()}))
    worst = max(float(loss({k: jnp.asarray(v) for k, v in step.items()})) for step in ref) if finite else np.inf
    end = float(loss({k: jnp.asarray(v) for k, v in ref[-1].items()})) if finite else np.inf
    assert finite and size < 1e3 and end < start, (
        f"invalid case: the reference diverged on {problem.name} (finite={finite}, max|param|={size:.3g}, "
        f"loss {start:.4g} -> {end:.4g}, worst {worst:.4g})"
    )


def perturbed(problem: Problem, rel: float = 1e-15) -> Problem:
    return problem._replace(params0={k: v * (1 + rel) for k, v in problem.params0.items()})


def reference_trajectory(problem: Problem, run_reference: Callable, steps: int = STEPS) -> list:
    """``run_reference(problem, steps)`` after both guards (divergence and chaos control)."""
    import torch

    torch.set_num_threads(1)  # tiny tensors: threads only add contention (8x slower under load)
    ref = run_reference(problem, steps)
    assert_reference_valid(problem, ref)
    control = rel_diffs(run_reference(perturbed(problem), steps), ref).max()
    assert control <= CONTROL_TOL, (
        f"invalid case: the reference is chaotic on {problem.name} (a 1e-15 perturbation of x0 "
        f"grows to {control:.2g}), so no implementation can match it to 1e-6"
    )
    return ref
