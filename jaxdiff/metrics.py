"""Sample-quality and solver-accuracy metrics.

- ``Classifier``: a trained image classifier as a pytree (logits, penultimate features, labels);
  ``jaxdiff.pretrained.digits_classifier()`` is the one shipped for the 8x8 digits.
- ``frechet_distance``: the Frechet (2-Wasserstein) distance between Gaussians fitted to two feature
  sets (FID with a small classifier's features; Heusel et al., 2017), in float64 NumPy.
- ``class_accuracy``: the fraction of samples a classifier assigns to their intended class.
- ``solver_error``: RMS difference between a solver's output and a reference from the same x_T.
- ``reference_solve``: that reference, an adaptive 8th-order solve of the probability-flow ODE in
  log-SNR (diffrax ``Dopri8``), with its number of model evaluations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.models import Denoiser
from jaxdiff._checks import all_concrete as _concrete

__all__ = [
    "Classifier",
    "frechet_distance",
    "gaussian_frechet_distance",
    "class_accuracy",
    "solver_error",
    "reference_solve",
    "ReferenceSolution",
]


class Classifier(struct.PyTreeNode):
    """A trained image classifier: ``apply_fn(params, x) -> (logits, features)``.

    ``features`` is the penultimate layer (after its nonlinearity), the representation the Frechet
    distance compares; ``logits`` the unnormalized class scores. ``params`` is a pytree leaf (it can be
    passed through ``jax.jit``), ``apply_fn`` and ``input_shape`` are static.

    Args (fields):
        apply_fn: ``(params, x) -> (logits (n, num_classes), features (n, d))`` for x of shape
            ``(n, *input_shape)``.
        params: the weights (any pytree).
        input_shape: one image's shape, NHWC without the batch axis (e.g. ``(8, 8, 1)``); inputs are
            in the training data's range (``[-1, 1]`` for the shipped digits).

    Example:
        >>> clf = jd.pretrained.digits_classifier()
        >>> x, y = jd.pretrained.digits_data("test")
        >>> clf.features(x).shape
        (599, 64)
    """

    apply_fn: Callable = struct.field(pytree_node=False)
    params: Any
    input_shape: tuple = struct.field(pytree_node=False)

    def _check(self, x, name: str = "x"):
        shape = tuple(jnp.shape(x))
        if len(shape) != len(self.input_shape) + 1 or shape[1:] != tuple(self.input_shape):
            raise ValueError(
                f"`{name}` must have shape (n, {', '.join(map(str, self.input_shape))}) (a batch of images, "
                f"NHWC), got {shape}. Add a batch axis or reshape (e.g. `x.reshape((-1,) + {tuple(self.input_shape)})`)."
            )
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(
                f"`{name}` must be floating point in the data's range, got dtype {jnp.result_type(x)}. "
                "Scale raw pixels first (for the shipped digits: pixels / 8 - 1)."
            )
        return jnp.asarray(x)

    def logits(self, x):
        """Class scores, shape ``(n, num_classes)``."""
        return self.apply_fn(self.params, self._check(x))[0]

    def features(self, x):
        """Penultimate-layer features, shape ``(n, d)``."""
        return self.apply_fn(self.params, self._check(x))[1]

    def predict(self, x):
        """Predicted labels (argmax of the logits), int32 of shape ``(n,)``."""
        return jnp.argmax(self.logits(x), axis=-1).astype(jnp.int32)


def _feature_matrix(f, name: str) -> np.ndarray:
    a = np.asarray(f, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(
            f"`{name}` must be a 2-D array (num_samples >= 2, feature_dim), got shape {a.shape}. "
            "Pass `classifier.features(x)` for a batch of samples."
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"`{name}` contains NaN or inf ({int(np.sum(~np.isfinite(a)))} entries); check the samples.")
    return a


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix, eigenvalues clipped at 0 (round-off)."""
    w, v = np.linalg.eigh(0.5 * (s + s.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mean_a, cov_a) and N(mean_b, cov_b).

    d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)   (Dowson & Landau, 1982),

    computed in float64 NumPy in the symmetric form: S_a^1/2 and the square root of the symmetric
    PSD product come from eigendecompositions with eigenvalues clipped at 0, so there is no
    non-symmetric ``sqrtm`` and no complex round-off (as in TF-GAN's ``frechet_classifier_distance``).

    Args:
        mean_a, mean_b: shape ``(d,)``.
        cov_a, cov_b: symmetric positive semi-definite, shape ``(d, d)``.

    Returns:
        d^2 as a Python float (>= 0).

    Raises:
        ValueError: for inconsistent shapes.

    Example:
        >>> gaussian_frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))
        4.0
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    d = mean_a.shape[0] if mean_a.ndim == 1 else -1
    for name, v, want in (("mean_a", mean_a, (d,)), ("cov_a", cov_a, (d, d)), ("mean_b", mean_b, (d,)), ("cov_b", cov_b, (d, d))):
        if v.shape != want:
            raise ValueError(
                f"`{name}` must have shape {want} (d = {d} from `mean_a`), got {v.shape}. "
                "Means are (d,) vectors and covariances (d, d) matrices of the same d."
            )
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None)))
    d2 = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_root
    return float(max(d2, 0.0))  # only round-off can make it negative


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID; Heusel et al., 2017).

    With sample means mu and covariances S (unbiased, ``ddof=1``) of each set,
    d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), see
    ``gaussian_frechet_distance`` (float64 NumPy, symmetric eigendecomposition form). With the shipped
    digits classifier's 64-d features this is the "Frechet classifier distance" of TF-GAN's MNIST example.

    The plug-in estimate is biased upward at small n (two independent samples of one distribution give
    d^2 > 0, shrinking roughly like 1/n): compare models only at the same number of samples, and
    report the real-vs-real floor at that n beside it.

    Args:
        features_a: shape ``(n_a, d)``, e.g. ``classifier.features(samples)``.
        features_b: shape ``(n_b, d)``.

    Returns:
        d^2 as a Python float (>= 0). Host-side NumPy: not traceable under ``jax.jit``.

    Raises:
        ValueError: for non-2-D input, fewer than 2 samples, different feature dimensions or non-finite values.

    Example:
        >>> clf = jd.pretrained.digits_classifier()
        >>> fd = frechet_distance(clf.features(samples), clf.features(jd.pretrained.digits_data("test")[0]))  # doctest: +SKIP
    """
    a, b = _feature_matrix(features_a, "features_a"), _feature_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`features_a` and `features_b` must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}. "
            "Compute both with the same classifier."
        )
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    return gaussian_frechet_distance(a.mean(0), cov_a, b.mean(0), cov_b)


def class_accuracy(classifier: Classifier, x, labels):
    """Fraction of ``x`` that ``classifier`` assigns to ``labels``: mean(argmax logits(x) == labels).

    For class-conditional samples, ``labels`` are the classes they were generated for; on real data it
    is plain test accuracy. Works under ``jax.jit``.

    Args:
        classifier: a ``Classifier``.
        x: images of shape ``(n, *classifier.input_shape)``.
        labels: integer labels, shape ``(n,)``.

    Returns:
        A float scalar array in [0, 1].

    Raises:
        ValueError: when ``labels`` is not ``(n,)``. TypeError: for non-integer labels.

    Example:
        >>> x, y = jd.pretrained.digits_data("test")
        >>> float(class_accuracy(jd.pretrained.digits_classifier(), x, y)) >= 0.97
        True
    """
    n = jnp.shape(x)[0] if jnp.ndim(x) > 0 else None
    if jnp.shape(labels) != (n,):
        raise ValueError(f"`labels` must have shape ({n},), one label per image of `x`, got {jnp.shape(labels)}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"`labels` must be integers (class indices), got dtype {jnp.result_type(labels)}.")
    pred = classifier.predict(x)
    return jnp.mean((pred == jnp.asarray(labels).astype(pred.dtype)).astype(jnp.result_type(float)))


def solver_error(x, reference):
    """RMS error over all coordinates and samples: sqrt(mean((x - reference)^2)).

    The mean runs over every axis (samples and coordinates together), so the number is a per-coordinate
    error independent of batch and image size; it is the square root of DPM-Solver-v3's latent MSE
    proxy. Computed in at least float32 (float64 for float64 inputs). Works under ``jax.jit``.

    Args:
        x: a solver's output, any shape.
        reference: the reference from the same starting points (e.g. ``reference_solve(...).x``), same shape.

    Returns:
        A float scalar array.

    Raises:
        ValueError: when the shapes differ (no broadcasting).

    Example:
        >>> float(solver_error(jnp.ones((2, 3)), jnp.zeros((2, 3))))
        1.0
    """
    if jnp.shape(x) != jnp.shape(reference):
        raise ValueError(
            f"`x` and `reference` must have the same shape, got {jnp.shape(x)} and {jnp.shape(reference)}. "
            "Solve the reference from the same `x_T`."
        )
    dtype = jnp.result_type(x, reference, jnp.float32)
    diff = jnp.asarray(x, dtype) - jnp.asarray(reference, dtype)
    return jnp.sqrt(jnp.mean(jnp.square(diff)))


class ReferenceSolution(NamedTuple):
    """Result of ``reference_solve``."""

    x: jax.Array  # shape of x_T; float64 when jax_enable_x64 is on, else float32
    nfe: jax.Array  # shape=(), int: model evaluations, rejected steps and the initial step selection included
    num_steps: jax.Array  # shape=(), int: accepted plus rejected Dopri8 steps


# Dopri8 has 14 stages with first-same-as-last: 13 new evaluations per (accepted or rejected) step and
# one more on the first step (checked by counting host callbacks in the tests). The first step is a fixed
# fraction of the lambda interval (the controller adapts from there), not diffrax's dt0=None heuristic,
# whose extra evaluations the count would have to follow.
_DOPRI8_EVALS_PER_STEP = 13
_DOPRI8_EXTRA_EVALS = 1
_FIRST_STEP_FRACTION = 64.0


@dataclasses.dataclass(frozen=True)
class _Unflatten:
    """Rebuilds the model args from their distinct leaves (static and hashable: diffrax's jit cache is reused).

    A leaf that appears twice in the args (the parameters in both halves of a CFG pair) crosses into diffrax
    once and comes back as one object in both places, so ``jd.CFG`` does not stack two copies of it.
    """

    treedef: Any
    positions: tuple[int, ...]  # leaf i of the tree is unique leaf positions[i]

    def __call__(self, unique):
        return jax.tree.unflatten(self.treedef, [unique[i] for i in self.positions])


def reference_solve(
    denoiser: Denoiser,
    x_T,
    t_start,
    t_end,
    *,
    args: Any = None,
    rtol: float = 1e-7,
    atol: float = 1e-7,
    max_steps: int = 16384,
) -> ReferenceSolution:
    """High-accuracy probability-flow ODE solve from ``x_T`` at ``t_start`` to ``t_end``: ground truth for solvers.

    The ODE is written as DPM-Solver++ does, in the half log-SNR lambda = log(alpha/sigma) with the
    data prediction: y = x / sigma,

        dy/dlambda = e^lambda x0_hat(sigma y, t(lambda)),   t(lambda) = schedule.t_of_lambda(lambda),

    integrated from lambda(t_start) to lambda(t_end) with diffrax's ``Dopri8`` (8th order, embedded 7th
    order error estimate) under a ``PIDController(rtol, atol)`` on y, then x = sigma(t_end) y. Runs in
    float64 when ``jax_enable_x64`` is on (else float32, whose round-off floors the error at ~1e-6;
    tighter tolerances there only add steps).

    Why this form: in t the field has a 1/sigma_t factor that blows up as t -> 0 (stiff near the data
    end, forcing tiny adaptive steps); in lambda the linear part is integrated exactly and x0_hat
    varies slowly, so an explicit high-order solver takes few steps (Lu et al., 2022, DPM-Solver++).
    Why not many-step DDIM as a "reference": DDIM is first order, its error is still ~1e-3 at 1000
    steps (1.2e-3 RMS on a 2-d Gaussian mixture with VPLinear), more than UniPC(3) at 50 steps
    (6e-4), so it cannot rank good solvers. This solve is within ~tolerance of the exact flow on
    Gaussian data (max error <= 4e-7 at the defaults, <= 3e-9 at rtol = atol = 1e-9, for |x| up to 6.5) in
    ~200-350 model evaluations; pass tighter tolerances when the solvers compared get below ~1e-6.

    Args:
        denoiser: a ``jaxdiff.Denoiser``.
        x_T: starting points at ``t_start``, any shape the model accepts.
        t_start: start time (noisier end), with finite lambda (e.g. ``schedule.t_max``; not alpha = 0).
        t_end: end time, ``0 < t_end < t_start`` with finite lambda (e.g. ``schedule.t_min``; not sigma = 0).
        args: passed to the model.
        rtol, atol: diffrax tolerances on y = x / sigma.
        max_steps: diffrax's step limit (a runtime error is raised if it is reached).

    Returns:
        ``ReferenceSolution(x, nfe, num_steps)``: the solution at ``t_end`` (shape of ``x_T``), the
        number of model evaluations (13 per Dopri8 step, rejected ones included, + 1), and the steps taken.

    Raises:
        ValueError: at trace time (for concrete times) when ``t_end >= t_start`` or lambda is infinite at
            either end (sigma = 0 or alpha = 0).

    Example:
        >>> s = jd.VPLinear(); gd = jd.testing.GaussianData(jnp.zeros(2), jnp.ones(2))
        >>> ref = reference_solve(gd.denoiser(s), jnp.ones((1, 2)), s.t_max, s.t_min, args=gd)
        >>> ref.x.shape
        (1, 2)
    """
    import diffrax  # not needed by the rest of jaxdiff: imported on use

    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"`denoiser` must be a `jaxdiff.Denoiser`, got {type(denoiser).__name__}.")
    s = denoiser.schedule
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    t0, t1 = jnp.asarray(t_start, dtype), jnp.asarray(t_end, dtype)
    lam0, lam1 = s.lambda_(t0).astype(dtype), s.lambda_(t1).astype(dtype)
    if _concrete(t0, t1, lam0, lam1):
        if not float(t1) < float(t0):
            raise ValueError(
                f"`t_end` must be smaller than `t_start` (the solve runs from noise to data), got "
                f"t_start={float(t0)}, t_end={float(t1)}."
            )
        if not (np.isfinite(float(lam0)) and np.isfinite(float(lam1))):
            raise ValueError(
                f"log-SNR must be finite at both ends, got lambda(t_start={float(t0)}) = {float(lam0)} and "
                f"lambda(t_end={float(t1)}) = {float(lam1)}. Solve between `schedule.t_max` and `schedule.t_min` "
                "(sigma = 0 and alpha = 0 are not reachable in lambda); to compare with a grid ending at t = 0, "
                "stop both at a small positive t."
            )

    from jaxdiff import ode

    y0 = ode.to_state(s, jnp.asarray(x_T, dtype), t0)
    leaves, treedef = jax.tree.flatten(args)
    first = {}
    positions = tuple(first.setdefault(id(leaf), len(first)) for leaf in leaves)
    unique = list({id(leaf): leaf for leaf in leaves}.values())
    sol = diffrax.diffeqsolve(
        ode.term(denoiser, "data", unpack_args=_Unflatten(treedef, positions)),
        diffrax.Dopri8(),
        lam0,
        lam1,
        (lam1 - lam0) / _FIRST_STEP_FRACTION,
        y0,
        args=unique,
        # array tolerances: a new tolerance does not recompile diffrax's jitted solve
        stepsize_controller=diffrax.PIDController(rtol=jnp.asarray(rtol, dtype), atol=jnp.asarray(atol, dtype)),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
    )
    x = ode.from_state(s, sol.ys[0], t1)
    steps = sol.stats["num_steps"]
    return ReferenceSolution(x, _DOPRI8_EVALS_PER_STEP * steps + _DOPRI8_EXTRA_EVALS, steps)
