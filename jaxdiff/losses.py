"""Training losses for diffusion models: denoising losses, loss weightings, time sampling, label dropout, EMA.

One loss covers the usual objectives. For data x0, noise eps ~ N(0, I) and one time per sample,
x_t = alpha_t x0 + sigma_t eps, and the model's output is converted (through ``Denoiser``) to a *target*
space:

- ``"epsilon"``: eps (Ho et al., 2020); ``"x0"``: x0;
- ``"v"``: v = alpha eps - sigma x0 (Salimans & Ho, 2022);
- ``"velocity"``: dx_t/dt = alpha' x0 + sigma' eps (flow matching; Lipman et al., 2023; Liu et al., 2023).

At fixed x_t every target is affine in x0 (eps = (x_t - alpha x0)/sigma), so the error of a prediction in
any target is c times its x0-space error, with c = d target / d x0:

    c_x0 = 1,  c_eps = -alpha/sigma,  c_v = -(alpha^2 + sigma^2)/sigma,  c_velocity = alpha' - sigma' alpha/sigma.

A *weighting* is a weight w(lambda) on the x0-space squared error (lambda = log(alpha/sigma), the half log-SNR),
and is applied in the target space as w / c^2: the same weighting gives the same loss whatever the target.
``"uniform"`` is the exception by definition: plain mean squared error in the chosen target space.

- ``MinSNR(gamma)`` (Hang et al., 2023, arXiv 2303.09556): w = min(SNR, gamma), SNR = alpha^2/sigma^2; that is
  min(SNR, gamma)/SNR on the eps error and min(SNR, gamma)/(SNR + 1) on the v error of a VP schedule.
- ``EDMWeight(sigma_data)`` (Karras et al., 2022): w = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2 with
  sigma = sigma_t/alpha_t, the EDM noise level.

Times come from a ``TimeSampling``: ``UniformTime`` (t ~ U[t_min, t_max]; the default for continuous
schedules), ``TableTime`` (a uniform DDPM index, what DDPM training does; the default for ``VPDiscrete``) or
``LogNormalTime`` (EDM's ln sigma ~ N(-1.2, 1.2^2)). ``drop_labels`` does classifier-free guidance training
(Ho & Salimans, 2022) and ``ema_init``/``ema_update`` keep an exponential moving average of the parameters
(diffusers' ``EMAModel`` warm-up rule). Everything is a pure function of arrays and keys; there is no
training loop here.

Example:
    >>> import jax, jax.numpy as jnp, optax, jaxdiff as jd
    >>> fn = lambda x, t, w: w * x  # a (tiny) epsilon-prediction model with parameters ``w``
    >>> den = jd.Denoiser(fn, jd.VPLinear(), "epsilon")
    >>> x0 = jax.random.normal(jax.random.key(0), (64, 2))
    >>> loss, grad = jax.value_and_grad(
    ...     lambda w: jd.losses.denoising_loss(den, w, x0, jax.random.key(1), weighting=jd.losses.MinSNR(5.0))
    ... )(jnp.ones(()))
    >>> ema = jd.losses.ema_update(jd.losses.ema_init(jnp.ones(())), jnp.ones(()) - 0.1 * grad)
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import _checks
from jaxdiff.models import Denoiser
from jaxdiff.schedules import Schedule, VPDiscrete

__all__ = [
    "TARGETS",
    "denoising_loss",
    "per_sample_loss",
    "PerSampleLoss",
    "loss_weight",
    "Weighting",
    "MinSNR",
    "EDMWeight",
    "TimeSampling",
    "UniformTime",
    "TableTime",
    "LogNormalTime",
    "drop_labels",
    "EMA",
    "ema_init",
    "ema_update",
]

TARGETS = ("epsilon", "x0", "v", "velocity")

# The model's own parameterization is the default target ("score" models are trained on eps).
_DEFAULT_TARGET = {"epsilon": "epsilon", "score": "epsilon", "x0": "x0", "v": "v", "velocity": "velocity"}

# Weights are evaluated at lambda clipped to +-40 (SNR in [e^-80, e^80], finite in float32). This changes
# nothing inside that range; at lambda = -inf (alpha = 0: a zero terminal SNR table at t = 1) it turns the
# 0/0 of an x0-space weight divided by c_eps^2 = SNR into its limit (1 for min-SNR on eps, as diffusers sets).
_LAMBDA_CLIP = 40.0


_concrete = _checks.concrete  # ``x`` as a NumPy array, or None when traced (value checks are then skipped)


def _per_sample(c, ndim: int):
    """(B,) coefficients as (B, 1, ..., 1): explicit, since rank promotion may be set to raise."""
    return c.reshape(c.shape + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------------------- weightings


class Weighting(abc.ABC):
    """A loss weighting, given as a weight on the x0-space squared error as a function of lambda.

    Subclass it (as a frozen dataclass, so it is hashable static configuration) and define ``x0_weight``;
    ``loss_weight`` converts it to any target space.
    """

    @abc.abstractmethod
    def x0_weight(self, lam):
        """Weight on ||x0_hat - x0||^2 at half log-SNR ``lam`` (any shape; finite ``lam``)."""


@dataclasses.dataclass(frozen=True)
class MinSNR(Weighting):
    """Min-SNR-gamma weighting (Hang et al., 2023, arXiv 2303.09556): w_x0 = min(SNR, gamma).

    In the eps space this is min(SNR, gamma)/SNR, in the v space of a VP schedule min(SNR, gamma)/(SNR + 1),
    the forms of the paper and of diffusers' training scripts. ``gamma = inf`` gives w_x0 = SNR, i.e. plain
    eps-MSE whatever the target.

    Args:
        gamma: the clamp, > 0 (the paper's default is 5).

    Example:
        >>> w = jd.losses.loss_weight(jd.losses.MinSNR(5.0), jd.VPLinear(), jnp.array([0.1, 0.9]), "epsilon")
    """

    gamma: float = 5.0

    def __post_init__(self):
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not self.gamma > 0:
            raise ValueError(f"`MinSNR(gamma={self.gamma!r})`: `gamma` must be a number > 0 (the paper uses 5.0).")

    def x0_weight(self, lam):
        return jnp.minimum(jnp.exp(2.0 * lam), self.gamma)


@dataclasses.dataclass(frozen=True)
class EDMWeight(Weighting):
    """EDM's loss weighting (Karras et al., 2022, eq. 8): lambda(sigma) = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2.

    sigma = sigma_t/alpha_t = exp(-lambda) is the EDM noise level of any schedule, so
    w_x0 = 1/sigma_data^2 + SNR. With the EDM preconditioning this is unit weight on the network output.

    Args:
        sigma_data: the data standard deviation, > 0 (EDM uses 0.5 for images in [-1, 1]).
    """

    sigma_data: float = 0.5

    def __post_init__(self):
        value = self.sigma_data
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise ValueError(
                f"`EDMWeight(sigma_data={value!r})`: `sigma_data` must be a finite number > 0 (EDM uses 0.5)."
            )

    def x0_weight(self, lam):
        # (sigma^2 + sigma_data^2)/(sigma sigma_data)^2 = 1/sigma_data^2 + 1/sigma^2, finite at sigma = inf
        return 1.0 / self.sigma_data**2 + jnp.exp(2.0 * lam)


def _resolve_weighting(weighting):
    if isinstance(weighting, Weighting) or (isinstance(weighting, str) and weighting == "uniform"):
        return weighting
    raise ValueError(
        f"Unknown `weighting={weighting!r}`; expected \"uniform\", `MinSNR(gamma)`, `EDMWeight(sigma_data)` or "
        "an instance of a `jaxdiff.losses.Weighting` subclass."
    )


def _resolve_target(denoiser: Denoiser, target):
    if target is None:
        return _DEFAULT_TARGET[denoiser.prediction]
    if target not in TARGETS:
        raise ValueError(f"Unknown `target={target!r}`; expected one of {TARGETS} (or None for the model's own).")
    return target


def _target_factor_sq(schedule: Schedule, t, target: str, lam_c):
    """c^2 = (d target / d x0)^2 at fixed x_t, shape of t."""
    if target == "x0":
        return jnp.ones_like(lam_c)
    if target == "epsilon":
        return jnp.exp(2.0 * lam_c)  # alpha^2/sigma^2, at the same clipped lambda as the weight
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    if target == "v":
        return ((alpha**2 + sigma**2) / sigma) ** 2
    d_alpha, d_sigma = _time_derivatives(schedule, t)
    return (d_alpha - d_sigma * alpha / sigma) ** 2


def _time_derivatives(schedule: Schedule, t):
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    return jax.jvp(lambda u: (schedule.alpha(u), schedule.sigma(u)), (t,), (jnp.ones_like(t),))[1]


def loss_weight(weighting, schedule: Schedule, t, target: str):
    """The weight a weighting puts on the squared error in ``target`` space at times ``t``.

    w_target = w_x0(lambda_t) / c_target^2 with c = d target / d x0 at fixed x_t (module docstring);
    ``"uniform"`` gives 1.

    Args:
        weighting: ``"uniform"``, ``MinSNR(gamma)``, ``EDMWeight(sigma_data)`` or another ``Weighting``.
        schedule: the noise schedule.
        t: times, any shape (usually ``(B,)``), inside (0, t_max].
        target: one of ``TARGETS``.

    Returns:
        Weights with the shape of ``t``.

    Raises:
        ValueError: an unknown ``weighting`` or ``target``.

    Example:
        >>> w = jd.losses.loss_weight(jd.losses.MinSNR(5.0), jd.VPLinear(), jnp.array([0.05, 0.5]), "v")
        >>> w.shape
        (2,)
    """
    weighting = _resolve_weighting(weighting)
    if target not in TARGETS:
        raise ValueError(f"Unknown `target={target!r}`; expected one of {TARGETS}.")
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    if isinstance(weighting, str):  # "uniform"
        return jnp.ones_like(t)
    lam_c = jnp.clip(schedule.lambda_(t), -_LAMBDA_CLIP, _LAMBDA_CLIP)
    return weighting.x0_weight(lam_c) / _target_factor_sq(schedule, t, target, lam_c)


# ------------------------------------------------------------------------------------------- time sampling


class TimeSampling(abc.ABC):
    """How training times are drawn: ``sample(key, schedule, num) -> t`` of shape ``(num,)``."""

    @abc.abstractmethod
    def sample(self, key, schedule: Schedule, num: int):
        """``num`` training times for ``schedule``."""


def _check_number(owner: str, name: str, value, *, positive: bool = False, optional: bool = False):
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and not value > 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"`{owner}({name}={value!r})`: `{name}` must be {need}{' or None' if optional else ''}.")


@dataclasses.dataclass(frozen=True)
class UniformTime(TimeSampling):
    """t ~ U[t_min, t_max], continuous (the default for continuous schedules).

    On ``VPDiscrete`` this gives fractional DDPM indices in [0, N - 1], so every sampler grid is in
    distribution.

    Args:
        t_min, t_max: the interval, default the schedule's ``t_min``/``t_max``; 0 < t_min < t_max.
    """

    t_min: float | None = None
    t_max: float | None = None

    def __post_init__(self):
        _check_number("UniformTime", "t_min", self.t_min, positive=True, optional=True)
        _check_number("UniformTime", "t_max", self.t_max, positive=True, optional=True)
        if self.t_min is not None and self.t_max is not None and not self.t_min < self.t_max:
            raise ValueError(f"`UniformTime(t_min={self.t_min!r}, t_max={self.t_max!r})`: need t_min < t_max.")

    def sample(self, key, schedule: Schedule, num: int):
        dtype = jnp.result_type(float)
        lo = schedule.t_min if self.t_min is None else self.t_min
        hi = schedule.t_max if self.t_max is None else self.t_max
        return jax.random.uniform(key, (num,), dtype, minval=jnp.asarray(lo, dtype), maxval=jnp.asarray(hi, dtype))


@dataclasses.dataclass(frozen=True)
class TableTime(TimeSampling):
    """A uniform table entry of a ``VPDiscrete`` schedule: n ~ U{0, ..., N-1}, t = (n + 1)/N.

    What DDPM training does (an integer timestep per sample); the default for ``VPDiscrete``. The model
    receives the integer index n.
    """

    def sample(self, key, schedule: Schedule, num: int):
        if not isinstance(schedule, VPDiscrete):
            raise ValueError(
                f"`TableTime()` draws DDPM table entries and needs a `VPDiscrete` schedule, got "
                f"{type(schedule).__name__}; use `UniformTime()` or `LogNormalTime()`."
            )
        n = schedule.num_train_steps
        idx = jax.random.randint(key, (num,), 0, n)
        # looked up, not divided under jit (XLA turns / n into * (1/n), one ulp off): t_n is exactly
        # the grid point of `jaxdiff.timesteps`, and the model receives the integer index n
        entries = np.arange(1, n + 1) / n
        return jnp.asarray(entries, dtype=jnp.result_type(float))[idx]


@dataclasses.dataclass(frozen=True)
class LogNormalTime(TimeSampling):
    """EDM's training noise levels (Karras et al., 2022): ln sigma ~ N(p_mean, p_std^2), sigma = sigma_t/alpha_t.

    Mapped to time through the schedule's inverse, t = t_of_lambda(-ln sigma), and clipped to
    [t_min, t_max] of the schedule (for ``jd.EDM``, t = sigma clipped to [sigma_min, sigma_max]).

    Args:
        p_mean: mean of ln sigma (EDM: -1.2).
        p_std: standard deviation of ln sigma, > 0 (EDM: 1.2).
    """

    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self):
        _check_number("LogNormalTime", "p_mean", self.p_mean)
        _check_number("LogNormalTime", "p_std", self.p_std, positive=True)

    def sample(self, key, schedule: Schedule, num: int):
        dtype = jnp.result_type(float)
        log_sigma = self.p_mean + self.p_std * jax.random.normal(key, (num,), dtype)
        t = schedule.t_of_lambda(-log_sigma)
        return jnp.clip(t, jnp.asarray(schedule.t_min, dtype), jnp.asarray(schedule.t_max, dtype))


_TIME_SAMPLINGS = {"uniform": UniformTime, "table": TableTime, "lognormal": LogNormalTime}


def _resolve_time_sampling(time_sampling, schedule: Schedule) -> TimeSampling:
    if time_sampling is None:
        return TableTime() if isinstance(schedule, VPDiscrete) else UniformTime()
    if isinstance(time_sampling, TimeSampling):
        return time_sampling
    if isinstance(time_sampling, str) and time_sampling in _TIME_SAMPLINGS:
        return _TIME_SAMPLINGS[time_sampling]()
    raise ValueError(
        f"Unknown `time_sampling={time_sampling!r}`; expected None (the schedule's default), one of "
        f"{tuple(_TIME_SAMPLINGS)}, or a `TimeSampling` such as `UniformTime(t_min, t_max)` or "
        "`LogNormalTime(p_mean, p_std)`."
    )


# ------------------------------------------------------------------------------------------------- losses


def _check_zero_snr(denoiser: Denoiser, target: str) -> None:
    """A noise-prediction model has no x0 at alpha = 0, so only the eps target is defined there."""
    schedule = denoiser.schedule
    if denoiser.prediction not in ("epsilon", "score") or target == "epsilon" or not isinstance(schedule, VPDiscrete):
        return
    table = _concrete(schedule.log_alphas)
    if table is not None and table.ndim == 1 and np.isneginf(table[-1]):
        raise ValueError(
            f"`target={target!r}` is undefined for a model with `prediction={denoiser.prediction!r}` on a zero "
            "terminal SNR table: at t = 1 alpha = 0 and x0 = (x - sigma eps)/alpha does not exist. Train a \"v\" "
            "(or \"x0\") model, as Lin et al. (2023) do, or use `target=\"epsilon\"`."
        )


class PerSampleLoss(NamedTuple):
    """Per-sample denoising losses and the times they were drawn at."""

    loss: jax.Array  # shape=(B,): weight * mean squared error over the trailing axes
    t: jax.Array  # shape=(B,): continuous times


def per_sample_loss(
    denoiser: Denoiser,
    args: Any,
    x0,
    key,
    *,
    target: str | None = None,
    weighting="uniform",
    time_sampling=None,
    t=None,
    noise=None,
) -> PerSampleLoss:
    """Per-sample weighted denoising losses, for users who reweight or log by time.

    For each sample b: t_b from ``time_sampling``, eps_b ~ N(0, I), x_t = alpha_t x0_b + sigma_t eps_b, and

        loss_b = w_target(t_b) * mean over the trailing axes of (target_hat - target)^2,

    with the model's output converted to ``target`` through ``denoiser`` (one batched model call,
    ``denoiser.x0_and_eps(x_t, t, args)`` with ``t`` of shape ``(B,)``) and w_target from ``loss_weight``.
    The mean (not the sum) over the trailing axes keeps the scale independent of the data size and equal to
    the ``F.mse_loss`` of diffusers' training scripts for ``weighting="uniform"``.

    Args:
        denoiser: the ``Denoiser`` being trained (no guidance, no thresholding).
        args: the model's third argument, e.g. ``params`` or ``(params, labels)`` with per-sample
            conditioning of shape ``(B, ...)`` as the model expects.
        x0: clean data, shape ``(B, ...)``, floating point.
        key: PRNG key for the times and the noise (may be None when both ``t`` and ``noise`` are given).
        target: one of ``TARGETS``; default the model's own prediction type ("score" -> "epsilon").
        weighting: ``"uniform"`` (plain MSE in the target space), ``MinSNR(gamma)``, ``EDMWeight(sigma_data)``
            or another ``Weighting``.
        time_sampling: None (``TableTime()`` for ``VPDiscrete``, else ``UniformTime()``), ``"uniform"``,
            ``"table"``, ``"lognormal"`` or a ``TimeSampling`` instance.
        t: optional times of shape ``(B,)`` to use instead of drawing them.
        noise: optional eps of the shape of ``x0`` to use instead of drawing it (e.g. a fixed validation set).

    Returns:
        ``PerSampleLoss(loss, t)``, both of shape ``(B,)``.

    Raises:
        ValueError: at trace time, for an unknown target, weighting or time sampling, a denoiser with guidance
            or thresholding, a target other than eps for a noise-prediction model on a zero terminal SNR table
            (x0 does not exist at alpha = 0), ``x0`` without a batch axis or not floating point, or
            ``t``/``noise`` of the wrong shape.

    Example:
        >>> den = jd.Denoiser(lambda x, t, w: w * x, jd.VPDiscrete(jnp.linspace(1e-4, 0.02, 1000)), "epsilon")
        >>> out = jd.losses.per_sample_loss(den, 0.5, jnp.ones((8, 3)), jax.random.key(0))
        >>> out.loss.shape, out.t.shape
        ((8,), (8,))
    """
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"`denoiser` must be a `jaxdiff.Denoiser`, got {type(denoiser).__name__}.")
    if denoiser.guidance is not None or denoiser.threshold is not None:
        raise ValueError(
            "Train the plain model: `denoiser` has guidance or thresholding, which act at sampling time. "
            "Use `dataclasses.replace(denoiser, guidance=None, threshold=None)`."
        )
    target = _resolve_target(denoiser, target)
    weighting = _resolve_weighting(weighting)
    _check_zero_snr(denoiser, target)
    if jnp.ndim(x0) < 1 or not jnp.issubdtype(jnp.result_type(x0), jnp.floating):
        raise ValueError(
            f"`x0` must be floating-point data with a batch axis first, shape (B, ...); got shape {jnp.shape(x0)} "
            f"and dtype {jnp.result_type(x0)}. Scale integer data to floats first."
        )
    x0 = jnp.asarray(x0)
    batch, data_dtype = x0.shape[0], x0.dtype
    schedule = denoiser.schedule
    if t is None or noise is None:
        if key is None:
            raise ValueError("`key` is None: pass `key=jax.random.key(...)` (it draws the times and the noise).")
        k_t, k_eps = jax.random.split(key)
    if t is None:
        t = _resolve_time_sampling(time_sampling, schedule).sample(k_t, schedule, batch)
    elif jnp.shape(t) != (batch,):
        raise ValueError(f"`t` must have shape ({batch},), one time per sample of `x0`; got shape {jnp.shape(t)}.")
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    dtype = jnp.result_type(x0.dtype, jnp.float32)
    if noise is None:
        eps = jax.random.normal(k_eps, x0.shape, dtype)
    elif jnp.shape(noise) != x0.shape:
        raise ValueError(f"`noise` must have the shape of `x0`, {x0.shape}; got {jnp.shape(noise)}.")
    else:
        eps = jnp.asarray(noise).astype(dtype)

    nd = x0.ndim
    alpha = _per_sample(schedule.alpha(t).astype(dtype), nd)
    sigma = _per_sample(schedule.sigma(t).astype(dtype), nd)
    x0 = x0.astype(dtype)
    # the model sees x_t in the data's dtype; the loss is computed in at least float32
    x_t = (alpha * x0 + sigma * eps).astype(data_dtype)
    x0_hat, eps_hat = denoiser.x0_and_eps(x_t, t, args)
    x0_hat, eps_hat = x0_hat.astype(dtype), eps_hat.astype(dtype)

    if target == "x0":
        err = x0_hat - x0
    elif target == "epsilon":
        err = eps_hat - eps
    elif target == "v":
        err = alpha * (eps_hat - eps) - sigma * (x0_hat - x0)
    else:  # velocity
        d_alpha, d_sigma = _time_derivatives(schedule, t)
        d_alpha, d_sigma = _per_sample(d_alpha.astype(dtype), nd), _per_sample(d_sigma.astype(dtype), nd)
        err = d_alpha * (x0_hat - x0) + d_sigma * (eps_hat - eps)
    mse = jnp.mean(jnp.square(err).reshape(batch, -1), axis=1)
    return PerSampleLoss(loss_weight(weighting, schedule, t, target).astype(dtype) * mse, t)


def denoising_loss(
    denoiser: Denoiser,
    args: Any,
    x0,
    key,
    *,
    target: str | None = None,
    weighting="uniform",
    time_sampling=None,
    t=None,
    noise=None,
):
    """The denoising training loss: the batch mean of ``per_sample_loss``.

    E_{t, eps} w_target(t) mean_d (target_hat(x_t, t) - target)^2 with x_t = alpha_t x0 + sigma_t eps, one
    time per sample and one batched model call. With ``target="epsilon"`` and ``weighting="uniform"`` this
    is the loss of Ho et al. (2020); see the module docstring for the targets, weightings and times.

    Args:
        denoiser, args, x0, key, target, weighting, time_sampling, t, noise: as in ``per_sample_loss``.

    Returns:
        A scalar.

    Raises:
        ValueError: as ``per_sample_loss``.

    Example:
        >>> den = jd.Denoiser(lambda x, t, a: a[0] * x + a[1][:, None], jd.VPLinear(), "v")
        >>> labels = jnp.arange(4.0)  # per-sample conditioning travels in `args`
        >>> loss = jd.losses.denoising_loss(den, (0.5, labels), jnp.ones((4, 2)), jax.random.key(0),
        ...                                 weighting=jd.losses.MinSNR(5.0))
    """
    losses = per_sample_loss(
        denoiser, args, x0, key, target=target, weighting=weighting, time_sampling=time_sampling, t=t, noise=noise
    ).loss
    return jnp.mean(losses)


# ---------------------------------------------------------------------------------------- label dropout


def drop_labels(key, labels, rate, null_label):
    """Classifier-free guidance training (Ho & Salimans, 2022): each label becomes ``null_label`` with prob. ``rate``.

    One Bernoulli(rate) draw per sample (the leading axis), so a label vector or embedding of shape
    ``(B, ...)`` is dropped as a whole.

    Args:
        key: PRNG key.
        labels: shape ``(B, ...)``, e.g. class indices ``(B,)`` or embeddings ``(B, D)``.
        rate: drop probability in [0, 1] (0.1 to 0.2 is usual); may be traced.
        null_label: the unconditional label: a scalar or an array of shape ``labels.shape[1:]``.

    Returns:
        Labels with the shape and dtype of ``labels``.

    Raises:
        ValueError: ``labels`` without a batch axis, a concrete ``rate`` outside [0, 1], or ``null_label`` of
            another shape.

    Example:
        >>> y = jd.losses.drop_labels(jax.random.key(0), jnp.arange(8), 0.1, 10)
    """
    labels = jnp.asarray(labels)
    if labels.ndim < 1:
        raise ValueError(f"`labels` must have a batch axis first, shape (B, ...); got shape {labels.shape}.")
    r = _concrete(rate)
    if r is not None and (r.shape != () or not 0.0 <= float(r) <= 1.0):
        raise ValueError(f"`rate` must be a probability in [0, 1], got {rate!r}.")
    if jnp.shape(null_label) not in ((), labels.shape[1:]):
        raise ValueError(
            f"`null_label` must be a scalar or have shape {labels.shape[1:]} (one label), "
            f"got shape {jnp.shape(null_label)}."
        )
    drop = jax.random.bernoulli(key, rate, labels.shape[:1])
    null = jnp.broadcast_to(jnp.asarray(null_label, labels.dtype), labels.shape)
    return jnp.where(_per_sample(drop, labels.ndim), null, labels)


# -------------------------------------------------------------------------------------------------- EMA


class EMA(NamedTuple):
    """Exponential moving average of parameters (a pytree, checkpointable)."""

    params: Any  # pytree with the structure, shapes and dtypes of the model parameters
    count: jax.Array  # shape=(), dtype=int32: updates so far


def ema_init(params) -> EMA:
    """An EMA starting at ``params`` with no updates yet.

    Example:
        >>> ema = jd.losses.ema_init({"w": jnp.ones(3)})
        >>> int(ema.count)
        0
    """
    return EMA(jax.tree.map(jnp.asarray, params), jnp.zeros((), jnp.int32))


def ema_update(state: EMA, params, decay=0.9999, *, warmup: bool = True) -> EMA:
    """One EMA step: ema <- d ema + (1 - d) params.

    With ``warmup`` (diffusers' ``EMAModel`` rule, its ``use_ema_warmup=False`` default), with k = the
    number of earlier updates: d = 0 at the first update (the EMA takes the current parameters) and
    d = min(decay, (1 + k)/(10 + k)) after, so early averages forget the random initialisation quickly.
    Without ``warmup``, d = ``decay`` throughout. Pure and jit-able; each leaf keeps its dtype.

    Args:
        state: the ``EMA`` so far.
        params: current parameters, the pytree structure of ``state.params``.
        decay: the maximal decay in [0, 1] (may be traced).
        warmup: use the warm-up rule (static).

    Returns:
        The updated ``EMA`` (count + 1).

    Raises:
        ValueError: a concrete ``decay`` outside [0, 1].

    Example:
        >>> ema = jd.losses.ema_init(jnp.zeros(2))
        >>> ema = jd.losses.ema_update(ema, jnp.ones(2), 0.999)  # first update: the EMA becomes params
        >>> ema = jd.losses.ema_update(ema, jnp.zeros(2), 0.999)  # d = 2/11
        >>> [round(float(v), 4) for v in ema.params]
        [0.1818, 0.1818]
    """
    d_max = _concrete(decay)
    if d_max is not None and (d_max.shape != () or not 0.0 <= float(d_max) <= 1.0):
        raise ValueError(f"`decay` must be in [0, 1] (e.g. 0.9999), got {decay!r}.")
    fdtype = jnp.result_type(float)
    decay = jnp.asarray(decay, fdtype)
    if warmup:
        k = state.count.astype(fdtype)
        d = jnp.where(state.count == 0, jnp.zeros((), fdtype), jnp.minimum(decay, (1.0 + k) / (10.0 + k)))
    else:
        d = decay

    def leaf(e, p):
        e = jnp.asarray(e)
        one_minus = (1.0 - d).astype(e.dtype) if jnp.issubdtype(e.dtype, jnp.inexact) else 1.0 - d
        return (e - one_minus * (e - p)).astype(e.dtype)

    return EMA(jax.tree.map(leaf, state.params, params), state.count + 1)
