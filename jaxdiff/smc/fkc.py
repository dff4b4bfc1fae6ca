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

Discretization: Euler-Maruyama, log-weights by the left-point rule; at step k the particles are weighted
by G(x_k) h_k, resampled if the trigger fires, then moved. One model call per denoiser per step (M per
step for ``Tilt``); the final time ``ts[-1]`` is never evaluated for score combinations (it may be 0).

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
    "NOISE_CHOICES",
]

NOISE_CHOICES = ("target_score", "tempered_noise")
DEGENERATE_MSG = (
    "FKC: every particle weight was -inf or NaN at {count} step(s) (a model returned NaN/inf, or a reward "
    "is -inf everywhere); the weights were reset to uniform there and `log_Z` is NaN. Check the model and "
    "reward on the particles, or use more particles / resample more often."
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
        num_degenerate: steps at which all weights were -inf/NaN and were reset to uniform, int32 ``()``.
    """

    x: jax.Array
    log_weights: jax.Array
    ess: jax.Array
    resampled: jax.Array
    log_Z: jax.Array
    num_degenerate: jax.Array

    def raise_if_degenerate(self):
        """Raise ``FloatingPointError`` on the host if any step was degenerate (call outside ``jit``)."""
        count = int(np.max(np.asarray(self.num_degenerate)))
        if count:
            raise FloatingPointError(DEGENERATE_MSG.format(count=count))
        return self


def sde_coefficients(schedule: Schedule, t):
    """(f_t, g_t^2 / sigma_t^2) of the forward SDE dx = f_t x dt + g_t dW, from the schedule by autodiff.

    f = dlog alpha/dt and g^2/sigma^2 = 2 (dlog sigma/dt - dlog alpha/dt) = -2 dlambda/dt: the ratio stays
    finite where sigma is small, and it is all the weights and the drift need (with eps = -sigma s).
    """
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    one = jnp.ones_like(t)
    f = jax.jvp(schedule.log_alpha, (t,), (one,))[1]
    dlam = jax.jvp(schedule.lambda_, (t,), (one,))[1]
    return f, -2.0 * dlam


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


def _concrete(x):
    try:
        return np.asarray(x)
    except Exception:  # traced
        return None


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

    def __post_init__(self):
        if not self.denoisers or not all(isinstance(d, Denoiser) for d in self.denoisers):
            raise ValueError(f"`denoisers` must be a non-empty tuple of `jaxdiff.Denoiser`, got {self.denoisers!r}.")
        if len(self.betas) != len(self.denoisers):
            raise ValueError(f"Got {len(self.betas)} `betas` for {len(self.denoisers)} denoisers; give one exponent per denoiser.")
        if self.noise not in NOISE_CHOICES:
            raise ValueError(f"Unknown `noise={self.noise!r}`; expected one of {NOISE_CHOICES}.")
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
        total = _concrete(sum(self.betas))
        if self.noise == "tempered_noise" and total is not None and not total > 0:
            raise ValueError(f"`noise='tempered_noise'` needs sum(betas) > 0, got {float(total)}.")

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
        """Pre-move log-weight increment h G(x) and the combined noise prediction (resampled with x)."""
        eps = [d.eps(x, t, a).astype(x.dtype) for d, a in zip(self.denoisers, self.split_args(args))]
        betas = [jnp.asarray(b, x.dtype) for b in self.betas]
        if not weighted:
            return jnp.zeros(x.shape[:1], x.dtype), sum(b * e for b, e in zip(betas, eps))
        rate, combined = log_weight_rate(self.schedule, t, eps, betas)
        return (t - t_next).astype(x.dtype) * rate, combined

    def move(self, key, x, combined, t, t_next, args, weighted):
        """One Euler-Maruyama step of the FKC SDE from t to t_next."""
        s = self.schedule
        f, g2_over_s2 = sde_coefficients(s, t)
        sigma = s.sigma(t)
        ratio = 1.0 if self.noise == "target_score" else 1.0 / sum(self.betas)  # sigma_n^2 / g^2
        h = t - t_next
        # (sigma_n^2 + g^2)/2 * S with S = -combined / sigma and g^2 / sigma = (g^2 / sigma^2) sigma.
        drift = -f * x - (0.5 * (ratio + 1.0) * g2_over_s2 * sigma) * combined
        noise_std = jnp.sqrt(h * ratio * g2_over_s2) * sigma
        x_next = x + (h * drift).astype(x.dtype) + noise_std.astype(x.dtype) * jax.random.normal(key, x.shape, x.dtype)
        return x_next, jnp.zeros(x.shape[:1], x.dtype), None


def Anneal(den: Denoiser, beta=2.0, *, noise: str = "target_score") -> Geometric:
    """Temperature annealing p_t ∝ q_t^beta (beta = 1/T), with weight rate (beta - 1) D f + g^2/2 beta (beta - 1) |s|^2.

    Start from x_T ~ q_1^beta (≈ N(0, I/beta) for VP schedules). ``args`` is the model's args.
    """
    b = _concrete(beta)
    if b is not None and not np.all(b > 0):
        raise ValueError(f"`beta` (inverse temperature) must be > 0, got {b}.")
    return Geometric((den,), (jnp.asarray(beta, dtype=jnp.result_type(float)),), noise)


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
    b = _concrete(beta)
    if b is not None and not np.all(b > 0):
        raise ValueError(f"`beta` (inverse temperature) must be > 0, got {b}.")
    beta = jnp.asarray(beta, dtype=jnp.result_type(float))
    return Geometric((den1, den2), (beta, beta), noise)


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
        if not isinstance(self.num_candidates, int) or self.num_candidates < 1:
            raise ValueError(f"`num_candidates` must be a positive int, got {self.num_candidates!r}.")
        a = _concrete(self.alpha)
        if a is not None and not np.all(a > 0):
            raise ValueError(f"`alpha` must be > 0, got {a}; for best-of-M selection use a small alpha.")

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
        s = self.schedule
        f, g2_over_s2 = sde_coefficients(s, t)
        sigma = s.sigma(t)
        h = t - t_next
        mean = x + (h * (-f * x - g2_over_s2 * sigma * eps)).astype(x.dtype)
        k_noise, k_pick = jax.random.split(key)
        m, n = self.num_candidates, x.shape[0]
        z = jax.random.normal(k_noise, (n, m) + x.shape[1:], x.dtype)
        cand = (mean[:, None] + jnp.sqrt(h * g2_over_s2 * sigma**2).astype(x.dtype) * z).reshape((n * m,) + x.shape[1:])
        eps_c, value_c = self._evaluate(cand, t_next, args)
        logits = (value_c / self.alpha).reshape(n, m)
        pick = jax.random.categorical(k_pick, jnp.where(jnp.isnan(logits), -jnp.inf, logits), axis=1)
        flat = jnp.arange(n) * m + pick
        inc = jax.scipy.special.logsumexp(logits, axis=1) - math.log(m) - value / self.alpha
        inc = inc if weighted else jnp.zeros_like(inc)
        return cand[flat], inc, (eps_c[flat], value_c[flat])


def _take(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


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
        checks: add a ``checkify.check`` that no step was degenerate; wrap the call in
            ``jax.experimental.checkify.checkify`` under ``jit``. Without it, see ``FKCResult.num_degenerate``.

    Returns:
        ``FKCResult(x, log_weights, ess, resampled, log_Z, num_degenerate)``.

    Raises:
        ValueError: at trace time, for a bad grid, threshold, window, particle count or resampler.

    Degenerate weights: if at some step every weight is -inf or NaN (e.g. the model returned NaN), the
    weights are reset to uniform, ``num_degenerate`` counts it and ``log_Z`` becomes NaN; particles with
    NaN weights otherwise get weight zero and are never resampled. ``result.raise_if_degenerate()`` or
    ``checks=True`` turn this into an error.
    """
    if not (hasattr(target, "init") and hasattr(target, "weight") and hasattr(target, "move")):
        raise ValueError(f"`target` must be an FKC target (e.g. `fkc.Anneal(den, beta)`), got {type(target).__name__}.")
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"`x_T` must have a leading particle axis, got shape {x_T.shape}.")
    n = x_T.shape[0]
    if num_particles is not None and num_particles != n:
        raise ValueError(
            f"`num_particles={num_particles}` but `x_T` has {n} particles on its leading axis (shape {x_T.shape}); "
            "vmap independent runs over an extra axis instead of stacking them into the particle axis."
        )
    if jnp.ndim(ts) != 1 or jnp.shape(ts)[0] < 2:
        raise ValueError(f"`ts` must be a 1-D array of at least 2 times, got shape {jnp.shape(ts)}.")
    grid = _concrete(ts)
    if grid is not None and not np.all(np.diff(grid) < 0):
        raise ValueError(f"`ts` must be strictly decreasing (noise to data); got {grid.tolist()[:6]}... Use `jaxdiff.timesteps`.")
    if isinstance(target, Tilt) and grid is not None and not grid[-1] > 0:
        raise ValueError(f"`Tilt` evaluates the value at `ts[-1]`, which must be > 0; got {grid[-1]}. Use `final='sigma_min'`.")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"`ess_threshold` must be in [0, 1] (a fraction of N), got {ess_threshold}.")
    if resample_window is not None:
        if len(resample_window) != 2 or not resample_window[0] <= resample_window[1]:
            raise ValueError(f"`resample_window` must be `(t_lo, t_hi)` with t_lo <= t_hi, got {resample_window!r}.")
    resampler = None if resample is None else rs.get_resampler(resample)
    if global_resampling and axis_name is None:
        raise ValueError("`global_resampling=True` needs `axis_name` (the mapped axis the particles are split over).")
    if key is None:
        raise ValueError("FKC is stochastic: pass `key=jax.random.key(...)`.")

    dtype = jnp.result_type(x_T.dtype, jnp.float32)
    x = x_T.astype(dtype)
    ts = jnp.asarray(ts, dtype=jnp.result_type(ts, float))
    num_steps = ts.shape[0] - 1

    shard = 0 if axis_name is None else jax.lax.axis_index(axis_name)
    num_shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    key_res, key_move = jax.random.split(key if axis_name is None or global_resampling else jax.random.fold_in(key, shard))
    if global_resampling:
        key_move = jax.random.split(jax.random.fold_in(key, shard))[1]
    total = n * num_shards if global_resampling else n
    gather = (lambda a: jax.lax.all_gather(a, axis_name, tiled=True)) if global_resampling else (lambda a: a)

    def reweight(logw, inc):
        """Add an increment, renormalize (over all shards when global); returns (logw, log-normalizer, bad)."""
        new = jnp.where(jnp.isnan(inc), -jnp.inf, logw + inc)
        normed, lse = rs.log_normalize(gather(new))
        if global_resampling:
            normed = jax.lax.dynamic_slice_in_dim(normed, shard * n, n)
        bad = ~jnp.isfinite(lse)
        uniform = jnp.full_like(normed, -math.log(total))
        return jnp.where(bad, uniform, normed), jnp.where(bad, jnp.nan, lse), bad

    window = (-jnp.inf, jnp.inf) if resample_window is None else resample_window

    def body(carry, row):
        x, logw, state, log_z, degenerate = carry
        t, t_next, k_res, k_move = row
        inc, aux = target.weight(x, state, t, t_next, args, weighted)
        if weighted:
            logw, lse, bad = reweight(logw, inc)
            log_z, degenerate = log_z + lse, degenerate + bad
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
        x, inc, state = target.move(k_move, x, aux, t, t_next, args, weighted)
        if weighted:
            logw, lse, bad = reweight(logw, inc)
            log_z, degenerate = log_z + lse, degenerate + bad
        return _varying((x, logw, state, log_z, degenerate), axis_name), (ess, do)

    state, log_w0 = target.init(x, ts[0], args)
    logw = jnp.full((n,), -math.log(total), dtype)
    log_z, degenerate = jnp.zeros((), dtype), jnp.zeros((), jnp.int32)
    if weighted:
        # The initial weight enters log_Z as log mean(exp(log_w0)) (0 for score combinations).
        logw, lse, bad = reweight(logw, log_w0)
        log_z, degenerate = log_z + lse, degenerate + bad
    rows = (ts[:-1], ts[1:], jax.random.split(key_res, num_steps), jax.random.split(key_move, num_steps))
    carry = _varying((x, logw, state, log_z, degenerate), axis_name)
    (x, logw, _, log_z, degenerate), (ess, resampled) = jax.lax.scan(body, carry, rows)
    if checks:
        checkify.check(degenerate == 0, DEGENERATE_MSG, count=degenerate)
    return FKCResult(x, logw, ess, resampled, log_z, degenerate)
