"""The two small workloads: an ill-conditioned quadratic and logistic regression on the digits.

Both are deterministic full-batch problems (the seed only moves the initialisation), where the step
size and preconditioning matter more than noise: a method without per-coordinate scaling crawls on
the quadratic, one that over-shoots its step size diverges there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.workloads.base import Workload


def quadratic(scale: str = "cpu", target: float = -2.873) -> Workload:
    """``f(x) = 0.5 (x - x*)^T A (x - x*) / f(x0)``-style quadratic in d = 100 (GPU scale: d = 1000).

    ``A = Q diag(lambda) Q^T`` with eigenvalues log-spaced in [1, 1e4] (condition number 1e4) and a
    random rotation; ``x* ~ N(0, I)``, ``x0 = 0.1 N(0, I)`` from the run's key. The metric is
    ``log10(f(x) / f_0)`` with ``f_0 = f(0)``: -2 means 1 % of the loss at the origin is left.
    """
    d = 100 if scale == "cpu" else 1000
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = jnp.asarray((q * np.logspace(0, 4, d)) @ q.T, jnp.float32)
    xstar = jnp.asarray(rng.normal(size=d), jnp.float32)
    f0 = float(0.5 * xstar @ (a @ xstar))

    def f(p, batch=None):
        e = p["x"] - xstar
        return 0.5 * e @ (a @ e) / f0

    return Workload(
        name="quadratic", init=lambda key: {"x": 0.1 * jax.random.normal(key, (d,), jnp.float32)}, loss=f,
        batch=lambda key, step: None, evaluate=lambda p: jnp.log10(f(p)), metric="log10 f(x) / f(0)",
        target=target, steps=200, eval_every=10, vectorize=True,
        notes=f"d={d}, eigenvalues log-spaced in [1, 1e4], full batch; metric log10(f / f(0)).")


def _digits(split):
    from jaxdiff.pretrained import digits_data

    x, y = digits_data(split)
    return jnp.asarray(x.reshape(len(x), -1), jnp.float32), jnp.asarray(y)


def digits_logreg(scale: str = "cpu", target: float = 0.1555) -> Workload:
    """Multinomial logistic regression on the shipped 8x8 digits (64 pixels in [-1, 1] -> 10 classes).

    Full batch over the 1198 training images; the metric is the cross-entropy on the 599 held-out
    test images (``jaxdiff.pretrained.digits_data``'s fixed split). No regularisation: past its
    minimum the test loss rises again (the classes are separable), so the target sits before it.
    """
    xtr, ytr = _digits("train")
    xte, yte = _digits("test")

    def ce(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"][None, :], y))

    return Workload(
        name="digits_logreg",
        init=lambda key: {"w": 0.01 * jax.random.normal(key, (64, 10), jnp.float32), "b": jnp.zeros(10, jnp.float32)},
        loss=lambda p, batch: ce(p, xtr, ytr), batch=lambda key, step: None,
        evaluate=lambda p: ce(p, xte, yte), metric="test cross-entropy", target=target, steps=200, eval_every=10,
        vectorize=True, notes="64 -> 10 softmax regression, full batch (1198 train), test CE on 599.")
