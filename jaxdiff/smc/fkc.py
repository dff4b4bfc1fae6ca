"""Feynman-Kac correctors (FKC): SMC-weighted sampling of annealed, product, guided and tilted targets.

Plain score arithmetic does not sample p^beta, p1 p2 or p_u^(1-w) p_c^w: the sum of scores is the score
of the target at every time, but the reverse SDE driven by it has the wrong marginals. FKC (Skreta et al.,
"Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of Experts", ICML 2025) simulates
the SDE together with a log-weight process and resamples, so that the weighted particles follow
p_t ∝ prod_i q_{i,t}^{beta_i} exactly in continuous time.

Score combinations (``Geometric`` and its presets ``Anneal``, ``Product``, ``Guidance``,
``AnnealedProduct``). Forward noising dx = f_t x dt + g_t dW (f = dlog alpha/dt, g^2 = dsigma^2/dt
- 2 f sigma^2), reverse time tau = 1 - t, S = sum_i beta_i s_i with s_i = -eps_i / sigma_t:

    dx = [-f_t x + (sigma_n^2 + g_t^2)/2 S(x)] dtau + sigma_n dW,      d log w = G(x) dtau,
    G(x) = (sum_i beta_i - 1) D f_t + g_t^2/2 (|S|^2 - sum_i beta_i |s_i|^2)      (``log_weight_rate``)

for any noise level sigma_n ("target_score": sigma_n = g, "tempered_noise": sigma_n^2 = g^2 / sum beta);
D is the number of elements of one particle. The drift coefficient (sigma_n^2 + g^2)/2 cancels every
divergence-of-score term, so no Hutchinson estimator is needed. The weights track the *unnormalized*
prod_i q_{i,t}^{beta_i}, so ``log_Z`` estimates log of Z(ts[-1]) / Z(ts[0]) with Z(t) = int prod_i q_{i,t}^{beta_i} dx.
"target_score" is the stable choice (reference notes: tempered noise is unstable for beta >~ 3).

Reward tilt (``Tilt``): p(x) exp(r(x)/alpha) without reward gradients, in the spirit of soft value-based
decoding (SVDD, Li et al., 2024): every step proposes M candidates from the pretrained reverse SDE per
particle, values them by v(x) = r(x0_hat(x)) and keeps one with probability ∝ exp(v/alpha). The particle
weight mean_m exp(v_m/alpha) / exp(v(x)/alpha) makes this a proper SMC scheme whose weighted particles
follow p_{t_end}(x) exp(v(x)/alpha) for any value estimate (the estimate only affects the variance).
SVDD itself is ``weighted=False``.

Discretization: at step k the particles are weighted, resampled if the trigger fires, then moved, with the
model's noise predictions frozen at x_k (left point) and everything else integrated exactly in the
schedule. The move is the exact solution of the linear SDE with E frozen (an exponential integrator; for
"target_score" it is SDE-DPM-Solver-1):

    x' = (alpha'/alpha) x + 2c (sigma' - alpha' rho) E + alpha' sqrt(r (rho^2 - rho'^2)) z,     rho = sigma/alpha,

with c = (r + 1)/2 and r = sigma_n^2 / g^2; the log-weight increment integrates f and g^2/sigma^2 exactly,

    (sum_i beta_i - 1) D (log alpha_t - log alpha_t') + (lambda_t' - lambda_t) (|sum_i beta_i eps_i|^2 - sum_i beta_i |eps_i|^2).

Both agree with Euler-Maruyama and the left-point rule h G(x_k) to first order, but stay exact where f and
g^2 blow up (near alpha = 0, e.g. RectifiedFlow near t = 1, where Euler-Maruyama on a time grid diverged:
log Z = 1.1e4 instead of 0 for Anneal(2) of N(1, 1) from t = 0.999). A grid may not start at alpha = 0
itself: the SDE is singular there. One model call per denoiser per step (M per step for ``Tilt``); the final
time ``ts[-1]`` is never evaluated for score combinations (it may be 0).

Non-finite values: a particle whose state becomes NaN/inf, or whose weight increment is NaN, gets weight
zero (-inf) and is counted in ``num_nonfinite``; if every weight is zero at a step the weights are reset and
``num_degenerate`` counts it. ``FKCResult.raise_if_degenerate()`` or ``checks=True`` turn either into errors.

Example:
    >>> import jaxdiff as jd
    >>> s = jd.VPLinear(); gd = jd.testing.GaussianData(jnp.array(1.0), jnp.array(1.0))
    >>> den = gd.denoiser(s)
    >>> x_T = jax.random.normal(jax.random.key(0), (1024, 1)) / jnp.sqrt(2.0)
    >>> res = jd.fkc.sample(jd.fkc.Anneal(den, beta=2.0), x_T, jd.timesteps(s, 200, "time"), jax.random.key(1), args=gd)
    >>> res.x.shape, res.log_weights.shape, res.ess.shape
    ((1024, 1), (1024,), (200,))
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import checkify

from jaxdiff import _checks
from jaxdiff.models import Denoiser
from jaxdiff.schedules import Schedule
from jaxdiff.smc import resampling as rs

__all__ = [
    "FKCResult",
    "Geometric",
    "Anneal",
    "Product",
    "Guidance",
    "AnnealedProduct",
    "Tilt",
    "sample",
    "log_weight_rate",
    "sde_coefficients",
    "log_weight_increment",
    "NOISE_CHOICES",
]

NOISE_CHOICES = ("target_score", "tempered_noise")
DEGENERATE_MSG = (
    "FKC: every particle weight was -inf or NaN at {count} step(s) (a model returned NaN/inf, or a reward "
    "is -inf everywhere); the weights were reset to uniform there and `log_Z` is NaN. Check the model and "
    "reward on the particles, or use more particles / resample more often."
)
NONFINITE_MSG = (
    "FKC: particle states or weight increments were NaN/inf at {count} step(s) (a model or reward "
    "returned NaN/inf there, or a custom resampler returned an out-of-range index); those particles got weight "
    "zero, and with `weighted=False` or without resampling they are still in `x`. Check the model on the particles."
)


class FKCResult(NamedTuple):
    """What ``sample`` returns.

    Attributes:
        x: particles at ``ts[-1]``, shape ``(N, ...)`` (the shape of ``x_T``).
        log_weights: normalized log-weights, shape ``(N,)`` (uniform after a final resampling; all 0
            minus log N for ``weighted=False``). With ``axis_name`` and global resampling they are
            normalized over all devices.
        ess: effective sample size before each step's resampling decision, shape ``(num_steps,)``.
        resampled: whether each step resampled, shape ``(num_steps,)``, bool.
        log_Z: estimate of log Z(ts[-1]) - log Z(ts[0]) (plus log E[exp(v/alpha)] at ``ts[0]`` for
            ``Tilt``), shape ``()``; NaN after a degenerate step.
        num_degenerate: steps (and the initial weighting) at which all weights were -inf/NaN and were reset to
            uniform, int32 ``()``.
        num_nonfinite: steps (and the initial weighting) at which some particle's state was NaN/inf or its
            weight increment NaN, int32 ``()``; those particles got weight zero. Nonzero means the model (or
            reward, or a custom resampler) misbehaved: with ``weighted=False`` or ``resample=None`` such
            particles stay in ``x``.
    """

    x: jax.Array
    log_weights: jax.Array
    ess: jax.Array
    resampled: jax.Array
    log_Z: jax.Array
    num_degenerate: jax.Array
    num_nonfinite: jax.Array

    def raise_if_degenerate(self):
        """Raise ``FloatingPointError`` on the host if any step was degenerate or any particle went non-finite.

        Call it outside ``jit``; under ``jit`` use ``sample(..., checks=True)`` with ``checkify``.
        """
        count = int(np.max(np.asarray(self.num_degenerate)))
        if count:
            raise FloatingPointError(DEGENERATE_MSG.format(count=count))
        count = int(np.max(np.asarray(self.num_nonfinite)))
        if count:
            raise FloatingPointError(NONFINITE_MSG.format(count=count))
        return self


def sde_coefficients(schedule: Schedule, t):
    """(f_t, g_t^2 / sigma_t^2) of the forward SDE dx = f_t x dt + g_t dW, from the schedule by autodiff.

    f = dlog alpha/dt = alpha'/alpha and g^2/sigma^2 = 2 (sigma'/sigma - alpha'/alpha) = -2 dlambda/dt: the
    ratio stays finite where sigma is small, and it is all the weights and the drift need (with eps = -sigma s).
    Both are computed from the derivatives of alpha and sigma, so at pure noise (alpha = 0, e.g.
    ``RectifiedFlow`` at t = 1) they are their limits, f = -inf and g^2/sigma^2 = +inf: the SDE is singular there.
    """
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    one = jnp.ones_like(t)
    (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(lambda u: (schedule.alpha(u), schedule.sigma(u)), (t,), (one,))
    f = d_alpha / alpha
    return f, 2.0 * (d_sigma / sigma - f)


def _event_sum(a):
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def log_weight_rate(schedule: Schedule, t, eps, betas):
    """The FKC log-weight rate G for p_t ∝ prod_i q_{i,t}^{beta_i}, and the combined noise prediction.

    G = (sum_i beta_i - 1) D f_t + g_t^2 / (2 sigma_t^2) (|sum_i beta_i eps_i|^2 - sum_i beta_i |eps_i|^2),
    the score form of the module docstring with s_i = -eps_i / sigma_t. Shared by every score combination.

    Args:
        schedule: the forward process of all models.
        t: scalar time.
        eps: sequence of noise predictions eps_i, each ``(N, ...)``.
        betas: sequence of exponents beta_i (scalars), same length.

    Returns:
        ``(G, E)``: G of shape ``(N,)`` (per unit of reverse time tau) and E = sum_i beta_i eps_i.
    """
    f, g2_over_s2 = sde_coefficients(schedule, t)
    combined = sum(b * e for b, e in zip(betas, eps))
    own = sum(b * _event_sum(e * e) for b, e in zip(betas, eps))
    size = math.prod(eps[0].shape[1:])
    rate = (sum(betas) - 1.0) * size * f + 0.5 * g2_over_s2 * (_event_sum(combined * combined) - own)
    return rate.astype(eps[0].dtype), combined


def log_weight_increment(schedule: Schedule, t, t_next, eps, betas):
    """The log-weight increment of one step from t to t_next (< t), with the eps_i frozen at t.

    inc = (sum_i beta_i - 1) D (log alpha_t - log alpha_t_next) + (lambda_t_next - lambda_t) (|sum_i beta_i eps_i|^2
    - sum_i beta_i |eps_i|^2): ``log_weight_rate`` integrated over the step with f and g^2/sigma^2 exact
    (int f dtau = log alpha_t - log alpha_t', int g^2/(2 sigma^2) dtau = lambda_t' - lambda_t).

    Returns:
        ``(inc, E)``: inc of shape ``(N,)`` and E = sum_i beta_i eps_i.
    """
    combined = sum(b * e for b, e in zip(betas, eps))
    own = sum(b * _event_sum(e * e) for b, e in zip(betas, eps))
    size = math.prod(eps[0].shape[1:])
    la, la_n = schedule.log_alpha(t), schedule.log_alpha(t_next)
    dlam = schedule.lambda_(t_next) - schedule.lambda_(t)
    inc = (sum(betas) - 1.0) * size * (la - la_n) + dlam * (_event_sum(combined * combined) - own)
    return inc.astype(eps[0].dtype), combined


def _transition(schedule: Schedule, t, t_next, drift: float, ratio):
    """(A, B, std) of x' = A x + B E + std z: the linear SDE dx = [-f x + drift g^2 S] dtau + sqrt(ratio) g dW
    (S = -E/sigma, E frozen) solved exactly from t to t_next (see the module docstring)."""
    la, la_n = schedule.log_alpha(t), schedule.log_alpha(t_next)
    ls, ls_n = schedule.log_sigma(t), schedule.log_sigma(t_next)
    cross = jnp.exp(la_n + ls - la)  # alpha' sigma / alpha = alpha' rho
    sigma_n = jnp.exp(ls_n)
    var = ratio * (cross - sigma_n) * (cross + sigma_n)
    return jnp.exp(la_n - la), 2.0 * drift * (sigma_n - cross), jnp.sqrt(jnp.maximum(var, 0.0))


def _concrete(x):
    return _checks.concrete(x)


def _finite_rows(x):
    """Per particle: every entry of its state is finite."""
    return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


class Geometric(struct.PyTreeNode):
    """Target p_t ∝ prod_i q_{i,t}^{beta_i} from denoisers sharing one forward process.

    Prefer the presets ``Anneal``, ``Product``, ``Guidance`` and ``AnnealedProduct``. ``args`` passed to
    ``sample`` is the single model's args for one denoiser, otherwise a tuple with one entry per denoiser.

    Args:
        denoisers: tuple of ``jaxdiff.Denoiser`` with the same schedule.
        betas: tuple of exponents (array leaves, so they can be traced or vmapped).
        noise: ``"target_score"`` (sigma_n = g, stable, default) or ``"tempered_noise"`` (sigma_n^2 = g^2 / sum beta).
    """

    denoisers: tuple
    betas: tuple
    noise: str = struct.field(pytree_node=False, default="target_score")
    annealing: bool = struct.field(pytree_node=False, default=False)  # betas are inverse temperatures (> 0)

    def __post_init__(self):
        # static structure only: JAX rebuilds this pytree with gradients as `betas` and schedule leaves, so
        # value checks live in `check` (called by `sample`)
        if not self.denoisers or not all(isinstance(d, Denoiser) for d in self.denoisers):
            raise ValueError(f"`denoisers` must be a non-empty tuple of `jaxdiff.Denoiser`, got {self.denoisers!r}.")
        if len(self.betas) != len(self.denoisers):
            raise ValueError(f"Got {len(self.betas)} `betas` for {len(self.denoisers)} denoisers; give one exponent per denoiser.")
        if self.noise not in NOISE_CHOICES:
            raise ValueError(f"Unknown `noise={self.noise!r}`; expected one of {NOISE_CHOICES}.")

    def check(self) -> None:
        """Trace-time checks of concrete values (``sample`` calls it): one forward process, finite exponents."""
        ref = self.denoisers[0].schedule
        for d in self.denoisers[1:]:
            same = type(d.schedule) is type(ref) and jax.tree.structure(d.schedule) == jax.tree.structure(ref)
            if same:
                pairs = [(_concrete(a), _concrete(b)) for a, b in zip(jax.tree.leaves(d.schedule), jax.tree.leaves(ref))]
                same = all(a is None or b is None or np.allclose(a, b) for a, b in pairs)
            if not same:
                raise ValueError(
                    f"All denoisers must share one forward process; got schedules {ref!r} and {d.schedule!r}. "
                    "FKC weights assume the same f_t and g_t for every model."
                )
        for i, b in enumerate(self.betas):
            v = _concrete(b)
            if v is not None and not np.all(np.isfinite(v)):
                raise ValueError(_checks.message(f"betas[{i}]", b, "finite", "The target prod_i q_i^beta_i needs finite exponents."))
        total = _concrete(sum(self.betas))
        if self.noise == "tempered_noise" and total is not None and not total > 0:
            raise ValueError(f"`noise='tempered_noise'` needs sum(betas) > 0, got {float(total)}.")

    def check_grid(self, ts) -> None:
        """Refuse a concrete grid whose weight increments would have infinite variance (``sample`` calls it).

        One step's increment contains (B^2 - B) (lambda' - lambda) |E|^2, B = sum_i beta_i. Near pure noise every
        eps_i is about x/sigma with x ~ N(0, sigma^2 / B) under the target, so this is a chi-square whose
        exponential moment (the expected weight) is infinite once (B - 1) (lambda' - lambda) >= 1/2; for data of
        unit scale the variance of E is sigma^2 / B at any time, hence the rule (B - 1) dlambda sigma_t^2 < 1/2
        checked here (toward the data, E shrinks with sigma and large lambda steps are harmless). Past it ESS
        collapses and ``log_Z`` is meaningless: measured 1.2e4 instead of 0 for Anneal(2) of N(1, 1) on
        RectifiedFlow with a 200-step time grid from t = 0.999, whose first step has dlambda = 1.8.
        """
        total = _concrete(sum(self.betas))
        lam = _checks.eager(lambda: self.schedule.lambda_(ts))
        sigma = _checks.eager(lambda: self.schedule.sigma(ts))
        if total is None or lam is None or sigma is None or total.ndim or not total > 1:
            return
        risk = (float(total) - 1.0) * np.diff(lam) * sigma[:-1] ** 2
        risk = np.where(np.isfinite(risk), risk, 0.0)
        k = int(np.argmax(risk))
        if risk[k] >= 0.5:
            t = np.asarray(_checks.eager(lambda: ts))
            raise ValueError(
                f"`ts` is too coarse in log-SNR near pure noise for this target: the step from t = {t[k]:.4g} to "
                f"{t[k + 1]:.4g} moves lambda by {lam[k + 1] - lam[k]:.3g} at sigma = {sigma[k]:.3g}, and with sum(betas) = "
                f"{float(total):g} its weight increments have infinite variance ((sum(betas) - 1) dlambda sigma^2 = "
                f"{risk[k]:.3g} >= 0.5): the weights would collapse. Use a grid that is fine in lambda there, e.g. "
                "`jd.timesteps(s, n, 'logsnr')`, or more steps."
            )

    def runtime_checks(self):
        """(predicate, message) pairs for traced values, checked with ``sample(..., checks=True)``."""
        out = []
        for i, b in enumerate(self.betas):
            if _checks.is_traced(b):
                out.append((jnp.all(jnp.isfinite(b)), f"`betas[{i}]` must be finite."))
        if self.annealing:
            for i, b in enumerate(self.betas):
                if _checks.is_traced(b):
                    out.append((jnp.all(b > 0), f"The inverse temperature `beta` (betas[{i}]) must be > 0."))
        return out

    @property
    def schedule(self):
        return self.denoisers[0].schedule

    def split_args(self, args):
        k = len(self.denoisers)
        if k == 1:
            return (args,)
        if args is None:
            return (None,) * k
        if not (isinstance(args, (tuple, list)) and len(args) == k):
            raise ValueError(
                f"This target combines {k} denoisers, so `args` must be a tuple of {k} model args "
                f"(one per denoiser, in order) or None; got {type(args).__name__}."
            )
        return tuple(args)

    def init(self, x, t, args):
        return None, jnp.zeros(x.shape[:1], x.dtype)

    def weight(self, x, state, t, t_next, args, weighted):
        """Pre-move log-weight increment over the step and the combined noise prediction (resampled with x)."""
        eps = [d.eps(x, t, a).astype(x.dtype) for d, a in zip(self.denoisers, self.split_args(args))]
        betas = [jnp.asarray(b, x.dtype) for b in self.betas]
        if not weighted:
            return jnp.zeros(x.shape[:1], x.dtype), sum(b * e for b, e in zip(betas, eps))
        return log_weight_increment(self.schedule, t, t_next, eps, betas)

    def move(self, key, x, combined, t, t_next, args, weighted):
        """One step of the FKC SDE from t to t_next, exact in the schedule with E frozen (module docstring)."""
        ratio = 1.0 if self.noise == "target_score" else 1.0 / sum(self.betas)  # sigma_n^2 / g^2
        a, b, std = _transition(self.schedule, t, t_next, 0.5 * (ratio + 1.0), ratio)
        x_next = a.astype(x.dtype) * x + b.astype(x.dtype) * combined
        x_next = x_next + std.astype(x.dtype) * jax.random.normal(key, x.shape, x.dtype)
        return x_next, jnp.zeros(x.shape[:1], x.dtype), None


def Anneal(den: Denoiser, beta=2.0, *, noise: str = "target_score") -> Geometric:
    """Temperature annealing p_t ∝ q_t^beta (beta = 1/T), with weight rate (beta - 1) D f + g^2/2 beta (beta - 1) |s|^2.

    Start from x_T ~ q_1^beta (≈ N(0, I/beta) for VP schedules). ``args`` is the model's args.

    Raises:
        ValueError: a concrete ``beta`` that is not finite and > 0. A traced one (``vmap`` over temperatures)
            cannot be checked when the target is built; ``sample(..., checks=True)`` checks it at run time.
    """
    _check_inverse_temperature(beta)
    return Geometric((den,), (jnp.asarray(beta, dtype=jnp.result_type(float)),), noise, annealing=True)


def Product(den1: Denoiser, den2: Denoiser, *, noise: str = "target_score") -> Geometric:
    """Product of experts p_t ∝ q1_t q2_t, with weight rate D f + g^2 <s1, s2>. ``args=(args1, args2)``.

    Start from x_T ~ q1_1 q2_1 (≈ N(0, I/2) for VP schedules).
    """
    one = jnp.asarray(1.0, dtype=jnp.result_type(float))
    return Geometric((den1, den2), (one, one), noise)


def Guidance(den_uncond: Denoiser, den_cond: Denoiser, w=3.0) -> Geometric:
    """Classifier-free guidance done right: p_t ∝ q_u^(1-w) q_c^w, weight rate g^2/2 w (w-1) |s_c - s_u|^2.

    The SDE is ordinary CFG; only the weights differ. ``args=(uncond_args, cond_args)``. For w > 1 the
    target exists only where (1-w) log q_u + w log q_c is normalizable (for Gaussians: positive precision).
    """
    w = jnp.asarray(w, dtype=jnp.result_type(float))
    return Geometric((den_uncond, den_cond), (1.0 - w, w), "target_score")


def AnnealedProduct(den1: Denoiser, den2: Denoiser, beta=2.0, *, noise: str = "target_score") -> Geometric:
    """Annealed product (q1_t q2_t)^beta, as in FKC's dual-target molecule design. ``args=(args1, args2)``."""
    _check_inverse_temperature(beta)
    beta = jnp.asarray(beta, dtype=jnp.result_type(float))
    return Geometric((den1, den2), (beta, beta), noise, annealing=True)


def _check_inverse_temperature(beta):
    """A concrete beta must be finite and > 0; a traced one (``vmap`` over betas) is checked with ``checks=True``."""
    b = _concrete(beta)
    if b is not None and not (np.issubdtype(b.dtype, np.number) and np.all(np.isfinite(b)) and np.all(b > 0)):
        raise ValueError(_checks.message(
            "beta", beta, "a finite inverse temperature > 0",
            "p^beta with beta <= 0 or beta = inf is no distribution to sample; a traced beta (vmap) is checked at run "
            "time with `fkc.sample(..., checks=True)`."))


class Tilt(struct.PyTreeNode):
    """Reward tilt p(x) exp(r(x)/alpha) by M candidates per step, selected by value (derivative-free).

    Value v_t(x) = r(x0_hat_t(x)) (SVDD's posterior-mean estimate). Each step draws ``num_candidates``
    proposals per particle from the pretrained reverse SDE (Euler-Maruyama), evaluates the model at them
    (that evaluation is reused by the next step, so a step costs M model calls on N particles), keeps one
    with probability ∝ exp(v/alpha) and multiplies the particle weight by mean_m exp(v_m/alpha) / exp(v/alpha).
    The initial weight is exp(v(x_T)/alpha). ``ts[-1]`` must be > 0 (the value is evaluated there).

    Args:
        den: the pretrained denoiser.
        reward: ``reward(x0) -> (N,)`` on a batch of data predictions ``(N, ...)``; need not be differentiable.
        alpha: temperature of the tilt (> 0).
        num_candidates: M >= 1 (static).
    """

    den: Denoiser
    reward: Callable = struct.field(pytree_node=False)
    alpha: jax.Array = 1.0
    num_candidates: int = struct.field(pytree_node=False, default=4)

    def __post_init__(self):
        if not isinstance(self.den, Denoiser):
            raise ValueError(f"`den` must be a `jaxdiff.Denoiser`, got {type(self.den).__name__}.")
        if not callable(self.reward):
            raise ValueError(f"`reward` must be callable `reward(x0) -> (N,)`, got {self.reward!r}.")
        if isinstance(self.num_candidates, bool) or not isinstance(self.num_candidates, int) or self.num_candidates < 1:
            raise ValueError(f"`num_candidates` must be a positive int, got {self.num_candidates!r}.")

    def check(self) -> None:
        """Trace-time check of a concrete ``alpha`` (``sample`` calls it; JAX rebuilds this pytree with gradients)."""
        a = _concrete(self.alpha)
        if a is not None and not (np.all(np.isfinite(a)) and np.all(a > 0)):
            raise ValueError(f"`alpha` must be a finite number > 0, got {a}; for best-of-M selection use a small alpha.")

    def runtime_checks(self):
        if _checks.is_traced(self.alpha):
            return [(jnp.all(self.alpha > 0) & jnp.all(jnp.isfinite(self.alpha)), "`Tilt.alpha` must be a finite number > 0.")]
        return []

    @property
    def schedule(self):
        return self.den.schedule

    def _evaluate(self, x, t, args):
        x0, eps = self.den.x0_and_eps(x, t, args)
        value = jnp.asarray(self.reward(x0.astype(x.dtype)), x.dtype)
        if value.shape != x.shape[:1]:
            raise ValueError(f"`reward` must return shape {x.shape[:1]} (one value per particle), got {value.shape}.")
        return eps.astype(x.dtype), value

    def init(self, x, t, args):
        eps, value = self._evaluate(x, t, args)
        return (eps, value), value / self.alpha

    def weight(self, x, state, t, t_next, args, weighted):
        return jnp.zeros(x.shape[:1], x.dtype), state

    def move(self, key, x, state, t, t_next, args, weighted):
        eps, value = state
        # the pretrained reverse SDE, exact in the schedule with eps frozen (drift g^2 S, noise g)
        a, b, std = _transition(self.schedule, t, t_next, 1.0, 1.0)
        mean = a.astype(x.dtype) * x + b.astype(x.dtype) * eps
        k_noise, k_pick = jax.random.split(key)
        m, n = self.num_candidates, x.shape[0]
        z = jax.random.normal(k_noise, (n, m) + x.shape[1:], x.dtype)
        cand = (mean[:, None] + std.astype(x.dtype) * z).reshape((n * m,) + x.shape[1:])
        eps_c, value_c = self._evaluate(cand, t_next, args)
        logits = (value_c / self.alpha).reshape(n, m)
        pick = jax.random.categorical(k_pick, jnp.where(jnp.isnan(logits), -jnp.inf, logits), axis=1)
        flat = jnp.arange(n) * m + pick
        inc = jax.scipy.special.logsumexp(logits, axis=1) - math.log(m) - value / self.alpha
        inc = inc if weighted else jnp.zeros_like(inc)
        return cand[flat], inc, (eps_c[flat], value_c[flat])


def _take(tree, idx):
    """Rows ``idx`` of every leaf; an out-of-range index gives a NaN row (flagged downstream), never a clamp."""

    def take(a):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return a.at[idx].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)
        return a[idx]

    return jax.tree.map(take, tree)


def _varying(tree, axis_name):
    """Mark carry leaves as varying over ``axis_name`` (shard_map types scan carries by it); no-op otherwise."""
    if axis_name is None:
        return tree

    def cast(a):
        if axis_name in getattr(jax.typeof(a), "vma", frozenset()):
            return a
        try:
            return jax.lax.pcast(a, axis_name, to="varying")
        except Exception:  # a mapped axis without varying-type tracking (e.g. vmap): nothing to mark
            return a

    return jax.tree.map(cast, tree)


def sample(
    target,
    x_T,
    ts,
    key,
    *,
    resample="systematic",
    ess_threshold: float = 1.0,
    resample_window: tuple | None = None,
    num_particles: int | None = None,
    args: Any = None,
    weighted: bool = True,
    axis_name: str | None = None,
    global_resampling: bool = False,
    checks: bool = False,
) -> FKCResult:
    """Sample ``target`` with Feynman-Kac correctors: SDE + log-weights + resampling, one ``lax.scan``.

    Args:
        target: ``Anneal``/``Product``/``Guidance``/``AnnealedProduct``/``Geometric`` or ``Tilt``.
        x_T: initial particles ``(N, ...)``, drawn from the target at ``ts[0]`` (e.g. N(0, I/beta) for VP annealing).
        ts: strictly decreasing times ``(num_steps + 1,)`` (``jaxdiff.timesteps``; fine grids, e.g. 200+
            steps, since the SDE is Euler-Maruyama).
        key: PRNG key.
        resample: ``"systematic"`` (default), ``"stratified"``, ``"residual"``, ``"multinomial"``, a function
            ``(key, log_weights, num_samples) -> ancestors``, or None (never; importance sampling only).
        ess_threshold: resample when ESS <= ess_threshold * N; 1.0 (default) resamples at every step, which
            was the most accurate choice in every check in the reference notes.
        resample_window: ``(t_lo, t_hi)``: resample only at steps whose start time lies in [t_lo, t_hi]
            (FKC's molecule experiments resample early only). Default: every step.
        num_particles: optional check that ``x_T.shape[0]`` is the number of particles (vmap independent
            runs over an extra leading axis instead).
        args: model args (one denoiser) or a tuple of them (one per denoiser).
        weighted: False runs the same SDE without weights or resampling (the negative control; for
            ``Tilt`` it is plain SVDD selection).
        axis_name: name of a mapped axis (``shard_map``/``pmap``/``vmap(axis_name=...)``) over which the
            particles are split. Each shard then uses ``jax.random.fold_in(key, axis_index)``, so with
            per-shard resampling (default) shard j equals ``sample(..., key=fold_in(key, j))`` without it.
        global_resampling: with ``axis_name``, normalize weights and resample over all shards (all-gather of
            log-weights and particles; resampling keys shared, move keys per shard).
        checks: add ``checkify.check``s that no step was degenerate, no particle went non-finite, and that
            traced arguments are valid (grid, ``ess_threshold``, inverse temperatures, resampler indices); wrap
            the call in ``jax.experimental.checkify.checkify``. Without it, see ``FKCResult.num_degenerate`` and
            ``num_nonfinite``.

    Returns:
        ``FKCResult(x, log_weights, ess, resampled, log_Z, num_degenerate, num_nonfinite)``.

    Raises:
        ValueError: at trace time, for a bad grid (not decreasing, outside the schedule, or starting at pure
            noise, where the SDE is singular), threshold, window, particle count or resampler.
        TypeError: ``x_T`` is not a real floating array, ``key`` is not a PRNG key, or a custom resampler
            returns something else than ``num_samples`` integer indices.

    Degenerate weights: if at some step every weight is -inf or NaN (e.g. the model returned NaN), the
    weights are reset to uniform, ``num_degenerate`` counts it and ``log_Z`` becomes NaN. A particle whose
    state becomes NaN/inf or whose increment is NaN gets weight zero (never resampled) and is counted in
    ``num_nonfinite``; an index out of range from a custom resampler gives such a particle. With
    ``weighted=False`` or ``resample=None`` non-finite particles stay in ``x``. ``result.raise_if_degenerate()``
    or ``checks=True`` turn all of this into an error.

    Traced arguments (``vmap``/``jit`` over ``ess_threshold``, ``beta``, the grid) cannot be checked while
    tracing: ``checks=True`` checks them at run time.
    """
    if not (hasattr(target, "init") and hasattr(target, "weight") and hasattr(target, "move")):
        raise ValueError(f"`target` must be an FKC target (e.g. `fkc.Anneal(den, beta)`), got {type(target).__name__}.")
    if hasattr(target, "check"):
        target.check()
    _checks.float_array("x_T", x_T)
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"`x_T` must have a leading particle axis, got shape {x_T.shape}.")
    n = x_T.shape[0]
    if num_particles is not None and num_particles != n:
        raise ValueError(
            f"`num_particles={num_particles}` but `x_T` has {n} particles on its leading axis (shape {x_T.shape}); "
            "vmap independent runs over an extra axis instead of stacking them into the particle axis."
        )
    schedule = target.schedule
    ts = _checks.validate_grid(schedule, ts)
    grid = _concrete(ts)
    if isinstance(target, Tilt) and grid is not None and not grid[-1] > 0:
        raise ValueError(f"`Tilt` evaluates the value at `ts[-1]`, which must be > 0; got {grid[-1]}. Use `final='sigma_min'`.")
    alpha0 = _checks.eager(lambda: schedule.alpha(ts[0]))
    if alpha0 is not None and alpha0 == 0:
        raise ValueError(
            f"`ts[0] = {float(grid[0]):g}` is pure noise for {type(schedule).__name__} (alpha = 0), where the FKC SDE is "
            "singular (f = dlog alpha/dt = -inf, g^2 = +inf) and the annealed/product targets have no finite drift. "
            "Start where alpha > 0, e.g. `jd.timesteps(s, n, 'logsnr', t_start=0.999)`."
        )
    if grid is not None and hasattr(target, "check_grid"):
        target.check_grid(ts)
    _checks.real_number("ess_threshold", ess_threshold, lo=0.0, hi=1.0,
                        hint="It is a fraction of the number of particles: resample when ESS <= ess_threshold * N.")
    if resample_window is not None:
        if len(resample_window) != 2 or not resample_window[0] <= resample_window[1]:
            raise ValueError(f"`resample_window` must be `(t_lo, t_hi)` with t_lo <= t_hi, got {resample_window!r}.")
    resampler = None if resample is None else rs.get_resampler(resample)
    if global_resampling and axis_name is None:
        raise ValueError("`global_resampling=True` needs `axis_name` (the mapped axis the particles are split over).")
    if key is None:
        raise ValueError("FKC is stochastic: pass `key=jax.random.key(...)`.")
    _checks.prng_key("key", key)

    dtype = jnp.result_type(x_T.dtype, jnp.float32)
    x = x_T.astype(dtype)
    num_steps = ts.shape[0] - 1

    shard = 0 if axis_name is None else jax.lax.axis_index(axis_name)
    num_shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    key_res, key_move = jax.random.split(key if axis_name is None or global_resampling else jax.random.fold_in(key, shard))
    if global_resampling:
        key_move = jax.random.split(jax.random.fold_in(key, shard))[1]
    total = n * num_shards if global_resampling else n
    gather = (lambda a: jax.lax.all_gather(a, axis_name, tiled=True)) if global_resampling else (lambda a: a)
    if resampler is not None:
        rs.check_ancestors(resampler, total, dtype)

    def reweight(logw, inc, x):
        """Add an increment, renormalize (over all shards when global); returns (logw, log-normalizer, bad, lost).

        A particle whose state is not finite, or whose increment is NaN, gets weight zero and is counted.
        """
        lost = jnp.isnan(inc) | ~_finite_rows(x)
        new = jnp.where(lost, -jnp.inf, logw + inc)
        normed, lse = rs.log_normalize(gather(new))
        if global_resampling:
            normed = jax.lax.dynamic_slice_in_dim(normed, shard * n, n)
        bad = ~jnp.isfinite(lse)
        uniform = jnp.full_like(normed, -math.log(total))
        return jnp.where(bad, uniform, normed), jnp.where(bad, jnp.nan, lse), bad, jnp.any(lost)

    window = (-jnp.inf, jnp.inf) if resample_window is None else resample_window

    def body(carry, row):
        x, logw, state, log_z, degenerate, nonfinite = carry
        t, t_next, k_res, k_move = row
        inc, aux = target.weight(x, state, t, t_next, args, weighted)
        if weighted:
            logw, lse, bad, lost = reweight(logw, inc, x)
            log_z = log_z + lse
        else:
            bad, lost = jnp.zeros((), bool), ~jnp.all(_finite_rows(x))
        ess = rs.ess(gather(logw))
        do = jnp.zeros((), bool)
        if weighted and resampler is not None:
            do = (ess <= ess_threshold * total) & (t >= window[0]) & (t <= window[1])
            ancestors = resampler(k_res, gather(logw), total)
            if global_resampling:
                mine = jax.lax.dynamic_slice_in_dim(ancestors, shard * n, n)
                keep = shard * n + jnp.arange(n, dtype=jnp.int32)
                idx = jnp.where(do, mine, keep)
                x, aux = _take(gather(x), idx), _take(jax.tree.map(gather, aux), idx)
            else:
                idx = jnp.where(do, ancestors, jnp.arange(n, dtype=jnp.int32))
                x, aux = _take(x, idx), _take(aux, idx)
            logw = jnp.where(do, -math.log(total), logw)
            # an out-of-range ancestor (custom resampler) became a NaN particle in _take: weight zero
            finite = _finite_rows(x)
            lost, logw = lost | ~jnp.all(finite), jnp.where(finite, logw, -jnp.inf)
        x, inc, state = target.move(k_move, x, aux, t, t_next, args, weighted)
        if weighted:
            logw, lse, bad_move, lost_move = reweight(logw, inc, x)
            log_z, bad, lost = log_z + lse, bad | bad_move, lost | lost_move
        # counted once per step (the pre- and post-move weightings of a step are one event)
        degenerate, nonfinite = degenerate + bad.astype(jnp.int32), nonfinite + lost.astype(jnp.int32)
        return _varying((x, logw, state, log_z, degenerate, nonfinite), axis_name), (ess, do)

    state, log_w0 = target.init(x, ts[0], args)
    logw = jnp.full((n,), -math.log(total), dtype)
    log_z, degenerate, nonfinite = jnp.zeros((), dtype), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    if weighted:
        # The initial weight enters log_Z as log mean(exp(log_w0)) (0 for score combinations).
        logw, lse, bad, lost = reweight(logw, log_w0, x)
        log_z, degenerate, nonfinite = log_z + lse, degenerate + bad.astype(jnp.int32), nonfinite + lost.astype(jnp.int32)
    rows = (ts[:-1], ts[1:], jax.random.split(key_res, num_steps), jax.random.split(key_move, num_steps))
    carry = _varying((x, logw, state, log_z, degenerate, nonfinite), axis_name)
    (x, logw, _, log_z, degenerate, nonfinite), (ess, resampled) = jax.lax.scan(body, carry, rows)
    if not weighted:
        nonfinite = nonfinite + (~jnp.all(_finite_rows(x))).astype(jnp.int32)
    if checks:
        for pred, msg in _runtime_checks(target, ts, schedule, ess_threshold):
            checkify.check(pred, msg)
        checkify.check(degenerate == 0, DEGENERATE_MSG, count=degenerate)
        checkify.check(nonfinite == 0, NONFINITE_MSG, count=nonfinite)
    return FKCResult(x, logw, ess, resampled, log_z, degenerate, nonfinite)


def _runtime_checks(target, ts, schedule, ess_threshold):
    """(predicate, message) pairs for the traced arguments (``checks=True``)."""
    out = list(target.runtime_checks()) if hasattr(target, "runtime_checks") else []
    if _checks.is_traced(ts):
        lo, hi = schedule.t_domain
        out.append((jnp.all(jnp.isfinite(ts)) & jnp.all(jnp.diff(ts) < 0),
                    "`ts` must be finite and strictly decreasing (from noise to data)."))
        out.append(((ts[0] <= hi) & (ts[-1] >= lo), f"`ts` must lie in the schedule's domain [{lo:g}, {hi:g}]."))
    if _checks.is_traced(ess_threshold):
        out.append(((ess_threshold >= 0) & (ess_threshold <= 1), "`ess_threshold` must lie in [0, 1]."))
    return out
