"""Noise schedules: x_t = alpha_t x_0 + sigma_t eps.

Every schedule is a pytree of arrays (differentiable in its parameters) with pure methods:

- ``log_alpha(t)``, ``log_sigma(t)``, ``alpha(t)``, ``sigma(t)``;
- ``lambda_(t) = log alpha_t - log sigma_t`` (half log-SNR) and its inverse ``t_of_lambda``;
- ``model_time(t)``: what the network receives (``t`` itself, or the DDPM index for tables);
- ``t_min``/``t_max``: the default sampling interval.

Convention shared by all schedules: ``t = 0`` is clean data (sigma = 0, lambda = +inf). Grids
that end "at zero" (``jd.timesteps(..., final="zero")``) end at ``t = 0``; solvers treat the step
into sigma = 0 specially and never compute through infinities.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import _checks

__all__ = ["Schedule", "VPLinear", "VPCosine", "VPDiscrete", "VE", "EDM", "RectifiedFlow", "DIFFUSERS_BETA_SCHEDULES"]

# diffusers' `beta_schedule` names that `VPDiscrete.from_diffusers` builds
DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")


def _float(x):
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _check_param(owner: str, name: str, value, *, lo=-math.inf, hi=math.inf, lo_closed=True, hi_closed=True,
                 hint: str = ""):
    """Check a concrete numeric schedule parameter (every entry, if an array); anything else is skipped.

    JAX rebuilds pytrees with placeholder leaves (None, ``object()``, tracers) through the constructor, so
    only concrete numbers are checked here; traced parameters (``vmap`` over a schedule) are unchecked.
    """
    a = _checks.concrete(value)
    if a is None or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a) or a.size == 0:
        return None
    a = a.astype(np.float64)
    inside = (a >= lo if lo_closed else a > lo) & (a <= hi if hi_closed else a < hi)
    if not np.all(inside & ~np.isnan(a)):
        span = f"{'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"
        raise ValueError(_checks.message(f"{owner}.{name}", value, f"a number in {span}", hint))
    return a


def _safe_log1mexp(a):
    """log(1 - exp(a)) for a <= 0, = -inf at a = 0, with finite gradients away from 0."""
    safe = jnp.where(a < 0, a, -1.0)
    out = jnp.where(safe > -math.log(2.0), jnp.log(-jnp.expm1(safe)), jnp.log1p(-jnp.exp(safe)))
    return jnp.where(a < 0, out, -jnp.inf)


class Schedule(struct.PyTreeNode, metaclass=abc.ABCMeta):
    """Base class. Subclasses define ``log_alpha``, ``log_sigma`` and ``t_of_lambda``.

    ``default_spacing`` (a class attribute) is the grid ``jd.timesteps`` builds when given no spacing.
    """

    default_spacing = "logsnr"

    @abc.abstractmethod
    def log_alpha(self, t):
        """log alpha_t."""

    @abc.abstractmethod
    def log_sigma(self, t):
        """log sigma_t (-inf at t = 0)."""

    @abc.abstractmethod
    def t_of_lambda(self, lam):
        """Inverse of ``lambda_``."""

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def lambda_(self, t):
        """Half log-SNR, log(alpha_t / sigma_t); +inf at t = 0."""
        return self.log_alpha(t) - self.log_sigma(t)

    def model_time(self, t):
        """The time input the network was trained with; continuous schedules pass t."""
        return t

    def t_of_model_time(self, t_model):
        """Inverse of ``model_time``."""
        return t_model

    @property
    def t_min(self):
        """Default end of sampling grids (the ``t_end`` field)."""
        return self.t_end

    @property
    def t_max(self):
        """Default start of sampling grids (the ``t_start`` field)."""
        return self.t_start

    #: (lo, hi): the times where the schedule is defined; grids must stay inside (``jd.check_grid``)
    t_domain = (0.0, math.inf)

    def check_params(self) -> None:
        """Raise ValueError for concrete parameters outside their range (traced ones are not checked).

        Called by ``jd.sample``, ``jd.timesteps``, ``jd.check_grid`` and ``jd.fkc.sample``, not by the
        constructor: JAX rebuilds schedules through it with gradients and tangents as leaves (a gradient
        ``VPLinear`` may well have beta_min < 0), and those are not schedules to check.
        """

    def _check_interval(self):
        """The default interval ``t_end < t_start`` inside ``t_domain`` (static fields, checked once)."""
        start, end = getattr(self, "t_start", None), getattr(self, "t_end", None)
        lo, hi = self.t_domain
        name = type(self).__name__
        for field, value in (("t_start", start), ("t_end", end)):
            if value is None:
                continue
            v = _checks.real_number(f"{name}.{field}", value, lo=lo, hi=hi,
                                    hint=f"{name} is defined for {lo:g} <= t <= {hi:g} (t = 0 is clean data).")
            object.__setattr__(self, field, v)
        if start is not None and end is not None and not self.t_end < self.t_start:
            raise ValueError(
                f"`{name}.t_end` must be below `t_start` (grids run from noise at t_start to data at t_end), got "
                f"t_start={self.t_start!r}, t_end={self.t_end!r}."
            )


class _VP(Schedule):
    """Variance preserving: sigma_t^2 = 1 - alpha_t^2.

    Default grid uniform in sqrt(t) ("quadratic"): on the shipped digits model it has about half the solver
    error of the log-SNR grid and a quarter of Karras' at NFE 3-20 (``benchmarks/results/digits_quality.md``),
    and it is best for 8 of 10 solver families on the demo's sharp mixture; the uniform-t grid is as good on
    digits but lets DPM-Solver++ 3M diverge at 15-20 steps.
    """

    default_spacing = "quadratic"

    def log_sigma(self, t):
        return 0.5 * _safe_log1mexp(2.0 * self.log_alpha(t))

    @staticmethod
    def _log_alpha_of_lambda(lam):
        return -0.5 * jnp.logaddexp(0.0, -2.0 * lam)


class VPLinear(_VP):
    """VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (Song et al., 2021).

    log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2; the inverse in lambda is closed form.

    Example:
        >>> s = VPLinear()
        >>> round(float(s.t_of_lambda(s.lambda_(0.5))), 6)
        0.5
    """

    beta_min: jax.Array = struct.field(default=0.1)
    beta_max: jax.Array = struct.field(default=20.0)
    t_start: float = struct.field(pytree_node=False, default=1.0)
    t_end: float = struct.field(pytree_node=False, default=1e-3)

    def __post_init__(self):
        self._check_interval()

    def check_params(self) -> None:
        hint = "VPLinear needs 0 <= beta_min <= beta_max with beta_max > 0 (e.g. 0.1 and 20)."
        lo = _check_param("VPLinear", "beta_min", self.beta_min, lo=0.0, hi=math.inf, hi_closed=False, hint=hint)
        hi = _check_param("VPLinear", "beta_max", self.beta_max, lo=0.0, hi=math.inf, lo_closed=False,
                          hi_closed=False, hint=hint)
        if lo is not None and hi is not None and not np.all(lo <= hi):
            raise ValueError(f"`VPLinear.beta_min` must not exceed `beta_max`, got beta_min={self.beta_min!r}, "
                             f"beta_max={self.beta_max!r}. {hint}")

    def log_alpha(self, t):
        t = _float(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_of_lambda(self, lam):
        # Solve (beta_max - beta_min) t^2 / 4 + beta_min t / 2 = L / 2, L = log(1 + e^{-2 lambda}),
        # in the cancellation-free form 2L / (b0 + sqrt(b0^2 + 2 (b1 - b0) L)).
        big_l = jnp.logaddexp(0.0, -2.0 * _float(lam))
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return 2.0 * big_l / (b0 + jnp.sqrt(b0**2 + 2.0 * db * big_l))


class VPCosine(_VP):
    """Cosine VP schedule (Nichol & Dhariwal, 2021): alpha_t = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2).

    Computed as sin((1 - t)/(1 + s) pi/2) / cos(s/(1+s) pi/2), the same function, so that alpha_1 = 0
    exactly (pure noise, lambda = -inf) and alpha is accurate near t = 1, where the cosine form loses all
    digits (cos(pi/2) = 6e-17 in float64). ``t_max`` defaults to 0.9946 as in the official DPM-Solver;
    grids may start at t = 1, where every solver takes a first step from pure noise (see ``jd.sample``).

    Example:
        >>> float(VPCosine(s=0.0).alpha(1.0))
        0.0
    """

    s: jax.Array = struct.field(default=0.008)
    t_end: float = struct.field(pytree_node=False, default=1e-3)
    t_start: float = struct.field(pytree_node=False, default=0.9946)

    t_domain = (0.0, 1.0)

    def __post_init__(self):
        self._check_interval()

    def check_params(self) -> None:
        _check_param("VPCosine", "s", self.s, lo=0.0, hi=math.inf, hi_closed=False,
                     hint="The offset s is small and >= 0 (Nichol & Dhariwal use 0.008).")

    def _log_alpha_0(self):
        return jnp.log(jnp.cos(self.s / (1.0 + self.s) * math.pi / 2))

    def log_alpha(self, t):
        t = _float(t)
        arg = (1.0 - t) / (1.0 + self.s) * math.pi / 2
        inside = arg > 0
        # log(sin) at its zero is -inf with a zero (not NaN) derivative: the where keeps log away from 0
        log_sin = jnp.log(jnp.sin(jnp.where(inside, arg, 1.0)))
        return jnp.where(inside, log_sin, -jnp.inf) - self._log_alpha_0()

    def alpha(self, t):
        t = _float(t)
        return jnp.sin((1.0 - t) / (1.0 + self.s) * math.pi / 2) / jnp.exp(self._log_alpha_0())

    def t_of_lambda(self, lam):
        # theta = (t + s)/(1 + s) pi/2 has cos(theta) = alpha c0 and sin(theta) = sqrt(sigma^2 + alpha^2 sin(s')^2)
        # (c0 = cos(s'), s' = s/(1+s) pi/2); atan2 of both is accurate at both ends, where arccos or arcsin of
        # alpha alone lose half the digits. t = 1 exactly at lambda = -inf.
        lam = _float(lam)
        alpha = jnp.exp(self._log_alpha_of_lambda(lam))
        sigma = jnp.exp(-0.5 * jnp.logaddexp(0.0, 2.0 * lam))
        s_prime = self.s / (1.0 + self.s) * math.pi / 2
        theta = jnp.arctan2(jnp.sqrt(sigma**2 + (alpha * jnp.sin(s_prime)) ** 2), alpha * jnp.cos(s_prime))
        return (1.0 + self.s) * theta * (2.0 / math.pi) - self.s


_NOT_GIVEN = object()


class VPDiscrete(_VP):
    """A DDPM beta table, as a continuous schedule (Lu et al., 2022, DPM-Solver's discrete VP).

    Table entry n (n = 0..N-1) sits at t_n = (n + 1) / N, with log alpha_n = sum_{m<=n} log(1 - beta_m) / 2.
    log alpha is piecewise linear in t between entries (and between t = 0, where it is 0, and t_0), so
    ``t_of_lambda`` is its exact inverse on the same breakpoints. The network receives the DDPM index
    ``N t - 1`` (a float; integer at table entries).

    A zero terminal SNR table (Lin et al., 2023: ``alphas_cumprod[-1] = 0``, ``log_alphas[-1] = -inf``) is
    supported: on its last segment alpha (not log alpha) is linear in t, alpha_t = (1 - f) alpha_{N-2} with
    f = N t - (N - 1), so alpha, sigma, lambda and ``t_of_lambda`` are finite strictly inside, alpha -> 0,
    sigma -> 1 and lambda -> -inf at t = 1, and derivatives are finite everywhere (``d alpha/dt = -N
    alpha_{N-2}`` on that segment, also at t = 1). Only the last entry may be zero.

    Build from ``betas`` or ``alphas_cumprod`` (exactly one); both are checked (betas in (0, 1], beta = 1
    only last; alphas_cumprod in [0, 1], non-increasing, zero only last) when they are concrete, and the
    checks are skipped when they are traced. ``log_alphas`` (log sqrt(alphas_cumprod)) is stored as given and
    never checked: it is the path JAX uses to rebuild the pytree from gradients and tangents. diffusers
    configs: ``VPDiscrete.from_diffusers(config)``.

    Args:
        betas: shape ``(N,)``, the per-step betas (N >= 2).
        alphas_cumprod: shape ``(N,)``, the cumulative products prod_{m<=n} (1 - beta_m).
        log_alphas: shape ``(N,)``, 0.5 log(alphas_cumprod).

    Raises:
        ValueError: not exactly one table, a table that is not 1-D with N >= 2, or (concrete tables) values
            outside the ranges above.

    Example:
        >>> s = VPDiscrete(np.linspace(1e-4, 0.02, 1000))
        >>> int(s.model_time(1.0)), s.num_train_steps
        (999, 1000)
    """

    log_alphas: jax.Array  # shape (N,), log sqrt(alphas_cumprod); the last entry may be -inf

    t_domain = (0.0, 1.0)

    def __init__(self, betas=None, *, alphas_cumprod=None, log_alphas=_NOT_GIVEN):
        # JAX rebuilds pytrees through `log_alphas`, with any placeholder leaf (None included): that path is
        # never checked; only "no table at all" and "two tables" are errors.
        given = [betas is not None, alphas_cumprod is not None, log_alphas is not _NOT_GIVEN]
        if sum(given) != 1:
            raise ValueError("`VPDiscrete` takes exactly one of `betas`, `alphas_cumprod` or `log_alphas`.")
        if log_alphas is _NOT_GIVEN:
            name, table = ("betas", betas) if betas is not None else ("alphas_cumprod", alphas_cumprod)
            if jnp.ndim(table) != 1 or jnp.shape(table)[0] < 2:
                raise ValueError(
                    f"`VPDiscrete` needs a 1-D table of at least 2 entries, got `{name}` of shape {jnp.shape(table)}."
                )
            _check_table(name, table)
            if betas is not None:
                log_alphas = 0.5 * jnp.cumsum(jnp.log1p(-_float(betas)))
            else:
                log_alphas = 0.5 * jnp.log(_float(alphas_cumprod))
        object.__setattr__(self, "log_alphas", log_alphas)

    @classmethod
    def from_diffusers(cls, config, *, zero_snr_floor: float | None = None) -> "VPDiscrete":
        """The table of a diffusers scheduler config, built as diffusers builds it.

        Reads ``num_train_timesteps`` (default 1000), ``beta_start`` (0.0001), ``beta_end`` (0.02),
        ``beta_schedule`` ("linear"), ``trained_betas`` (None) and ``rescale_betas_zero_snr`` (False), with
        diffusers' defaults for absent keys; other keys (``prediction_type``, spacings, ...) are ignored.
        ``beta_schedule`` is one of ``DIFFUSERS_BETA_SCHEDULES``:

        - ``"linear"``: beta = linspace(beta_start, beta_end, N);
        - ``"scaled_linear"``: beta = linspace(sqrt(beta_start), sqrt(beta_end), N)^2 (latent diffusion);
        - ``"squaredcos_cap_v2"``: beta_i = min(1 - abar((i+1)/N) / abar(i/N), 0.999) with the iDDPM cosine
          abar(t) = cos^2((t + 0.008)/1.008 pi/2) (Nichol & Dhariwal, 2021);
        - ``"sigmoid"``: beta = sigmoid(linspace(-6, 6, N)) (beta_end - beta_start) + beta_start (GeoDiff);
        - ``"laplace"`` and ``"exp"``: the same capped ratio with diffusers' ``betas_for_alpha_bar``
          transforms abar(t) = sqrt(s / (1 + s)), s = exp(-sign(1/2 - t) log(1 - |1 - 2t| + 1e-6) / 2),
          and abar(t) = exp(-12 t) (HeunDiscreteScheduler).

        ``rescale_betas_zero_snr`` applies Lin et al. (2023, arXiv 2305.08891, Alg. 1): sqrt(alphas_cumprod)
        is shifted and scaled, sqrt(abar) <- (sqrt(abar) - sqrt(abar_{N-1})) sqrt(abar_0) / (sqrt(abar_0) -
        sqrt(abar_{N-1})), so abar_0 is kept and the last entry is exactly 0 (lambda = -inf at t = 1).

        The betas are computed in float32 exactly as diffusers computes them (PyTorch's float32 ``linspace``,
        float32 ``1 - beta``); the products are accumulated in float64, like PyTorch's CPU ``cumprod``, and
        stored as log alphas in float64 (float32 without ``jax_enable_x64``): ``exp(2 log_alphas)`` equals
        diffusers' float32 ``alphas_cumprod`` to its last rounding (<= 3e-8). The zero-SNR rescaling is done
        in float64, so sqrt(alphas_cumprod) is exactly affine in the original one; diffusers does it in
        float32 with PyTorch's CPU ``sqrt``, which is not correctly rounded (one ulp off in about a quarter of
        the entries, CPU-dependent), so its rescaled float32 table differs from the exact one, and from this
        one, by up to about 1e-6. Run in float64, diffusers' rescaling agrees with this table to 1e-15.

        Args:
            config: a diffusers scheduler config: the dict of ``scheduler_config.json``, or any object with a
                ``.config`` mapping (a diffusers scheduler instance); diffusers itself is not imported.
            zero_snr_floor: None (default) keeps the exact zero of a zero terminal SNR table, which
                ``VPDiscrete`` handles (the right model is then v- or x0-prediction, and sampling starts at
                t = 1 with alpha = 0). A float in (0, 1) replaces that last ``alphas_cumprod`` entry by it,
                which is what diffusers' DPMSolverMultistep, UniPC, Euler and EulerAncestral schedulers do
                with ``2**-24`` so that their first sigma is finite: use it to reproduce those schedulers'
                outputs. Tables that do not end at zero are left unchanged. A floor above the previous entry
                is an error: diffusers applies it anyway (the rescaled linear 1e-4..0.02 table has
                alphas_cumprod[N-2] = 4.2e-9 < 2**-24), but the table would then increase at its end.

        Returns:
            ``VPDiscrete`` with ``N = num_train_timesteps`` entries (``len(trained_betas)`` if given).

        Raises:
            TypeError: ``config`` is not a mapping and has no ``.config`` mapping.
            ValueError: an unknown ``beta_schedule``, a value of the wrong type or range, or betas outside
                (0, 1]; the message lists what is supported.

        Example:
            >>> s = VPDiscrete.from_diffusers({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000})
            >>> s.num_train_steps
            1000
        """
        cfg = _diffusers_mapping(config)
        n = cfg.get("num_train_timesteps", 1000)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
            raise ValueError(f"`num_train_timesteps` must be an int >= 2, got {n!r} in the scheduler config.")
        n = int(n)
        rescale = cfg.get("rescale_betas_zero_snr", False)
        if not isinstance(rescale, (bool, np.bool_)):
            raise ValueError(
                f"`rescale_betas_zero_snr` must be True or False, got {rescale!r} in the scheduler config."
            )
        trained = cfg.get("trained_betas", None)
        if trained is not None:
            betas = np.asarray(trained, dtype=np.float32)
            if betas.ndim != 1 or betas.shape[0] < 2:
                raise ValueError(f"`trained_betas` must be a list of at least 2 betas, got shape {betas.shape}.")
            if "num_train_timesteps" in cfg and betas.shape[0] != n:
                raise ValueError(
                    f"`trained_betas` has {betas.shape[0]} entries but `num_train_timesteps` is {n}; "
                    "make them agree (or drop `num_train_timesteps`)."
                )
            what = "`trained_betas`"
        else:
            schedule = cfg.get("beta_schedule", "linear")
            if schedule not in DIFFUSERS_BETA_SCHEDULES:
                raise ValueError(
                    f"Unknown `beta_schedule={schedule!r}` in the scheduler config; supported: "
                    f"{DIFFUSERS_BETA_SCHEDULES} (or `trained_betas`)."
                )
            start, end = cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02)
            for key, value in (("beta_start", start), ("beta_end", end)):
                if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                    raise ValueError(f"`{key}` must be a number in (0, 1), got {value!r} in the scheduler config.")
            betas = _diffusers_betas(schedule, float(start), float(end), n)
            what = f"`beta_schedule={schedule!r}` with beta_start={start!r}, beta_end={end!r}"
        try:
            _check_table("betas", betas)
        except ValueError as e:
            raise ValueError(f"The scheduler config's {what} gives invalid betas: {e}") from None
        # diffusers rounds 1 - beta to float32; PyTorch's CPU cumprod accumulates in float64
        alphas = (np.float32(1.0) - betas).astype(np.float64)
        with np.errstate(divide="ignore"):
            if rescale:
                root = np.sqrt(np.cumprod(alphas))
                root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))
                log_alphas = np.log(root)
            else:
                log_alphas = 0.5 * np.cumsum(np.log(alphas))
        if zero_snr_floor is not None:
            if not isinstance(zero_snr_floor, (float, int)) or not 0.0 < zero_snr_floor < 1.0:
                raise ValueError(
                    f"`zero_snr_floor` must be a float in (0, 1) (diffusers uses 2**-24), got {zero_snr_floor!r}."
                )
            if log_alphas[-1] == -np.inf:
                log_alphas[-1] = 0.5 * np.log(float(zero_snr_floor))
                if log_alphas[-1] > log_alphas[-2]:
                    # diffusers applies its 2**-24 regardless (e.g. the rescaled linear 1e-4..0.02 table, whose
                    # entry N-2 is 4.2e-9), which makes its table increase at the end and lambda non-invertible
                    raise ValueError(
                        f"`zero_snr_floor={zero_snr_floor!r}` exceeds the previous `alphas_cumprod` entry "
                        f"{float(np.exp(2 * log_alphas[-2])):.3g}, so the table would not be monotone. Use "
                        "`zero_snr_floor=None` (the exact zero is supported) or a floor below that entry."
                    )
        return cls(log_alphas=jnp.asarray(log_alphas, dtype=jnp.result_type(float)))

    @property
    def num_train_steps(self) -> int:
        return self.log_alphas.shape[0]

    def _knots(self):
        n = self.num_train_steps
        t = jnp.arange(n + 1, dtype=self.log_alphas.dtype) / n
        return t, jnp.concatenate([jnp.zeros((1,), self.log_alphas.dtype), self.log_alphas])

    def _segment(self, t):
        """Segment index k (knots k, k + 1), fraction in it, its end values, and whether it ends at alpha = 0."""
        # knots are uniform in t (k / N), so the segment index is direct: no search in the sampling loop
        n = self.num_train_steps
        _, knots_la = self._knots()
        t = _float(t)
        # not jnp.clip: its derivative is 1/2 at the ends, and t = 1 is where sampling starts
        u = jnp.where(t < 0.0, 0.0, jnp.where(t > 1.0, 1.0, t)) * n
        k = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, n - 1)
        lo, hi = knots_la[k], knots_la[k + 1]
        to_zero = jnp.isneginf(hi)
        # the zero segment's -inf end is replaced before any arithmetic, so no NaN reaches values or gradients
        return u - k, lo, jnp.where(to_zero, lo, hi), to_zero

    def log_alpha(self, t):
        frac, lo, hi, to_zero = self._segment(t)
        linear = lo + frac * (hi - lo)
        inside = to_zero & (frac < 1.0)
        tail = lo + jnp.log1p(-jnp.where(inside, frac, 0.0))
        return jnp.where(to_zero, jnp.where(inside, tail, -jnp.inf), linear)

    def alpha(self, t):
        # direct on the zero segment, so d alpha/dt = -N alpha_{N-2} holds at t = 1 too (exp(-inf) would give 0)
        frac, lo, hi, to_zero = self._segment(t)
        return jnp.where(to_zero, (1.0 - frac) * jnp.exp(lo), jnp.exp(lo + frac * (hi - lo)))

    def t_of_lambda(self, lam):
        knots_t, knots_la = self._knots()
        log_alpha = self._log_alpha_of_lambda(_float(lam))
        # exact inverse of the piecewise map; log alpha increases along the reversed knots
        asc, asc_t = knots_la[::-1], knots_t[::-1]
        k = jnp.clip(jnp.searchsorted(asc, log_alpha, method="compare_all") - 1, 0, asc.shape[0] - 2)
        lo, hi = asc[k], asc[k + 1]
        t_lo, t_hi = asc_t[k], asc_t[k + 1]
        to_zero = jnp.isneginf(lo)  # the segment (t_{N-2}, 1] of a zero terminal SNR table
        lo_safe = jnp.where(to_zero, hi - 1.0, lo)
        la_safe = jnp.where(to_zero, hi, log_alpha)
        linear = t_lo + (la_safe - lo_safe) / (hi - lo_safe) * (t_hi - t_lo)
        # alpha = (1 - f) alpha_hi on that segment: f = 1 - alpha / alpha_hi
        f = -jnp.expm1(jnp.where(to_zero, log_alpha, hi) - hi)
        return jnp.where(to_zero, t_hi + f * (t_lo - t_hi), linear)

    def model_time(self, t):
        return self.num_train_steps * t - 1.0

    def t_of_model_time(self, t_model):
        return (t_model + 1.0) / self.num_train_steps

    @property
    def t_min(self):
        return 1.0 / self.num_train_steps

    @property
    def t_max(self):
        return 1.0


def _diffusers_mapping(config):
    if isinstance(config, Mapping):
        return config
    inner = getattr(config, "config", None)
    if isinstance(inner, Mapping):
        return inner
    raise TypeError(
        f"`config` must be a diffusers scheduler config (a dict, as in scheduler_config.json) or an object with a "
        f"`.config` mapping such as a diffusers scheduler; got {type(config).__name__}."
    )


def _torch_linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """``torch.linspace(start, stop, num, dtype=torch.float32)`` as PyTorch's CPU kernel computes it.

    The step is a float32 quotient; the first half counts up from ``start``, the second half down from
    ``stop``, each entry with one rounding (a fused multiply-add). This reproduces PyTorch bit for bit, where
    NumPy's float64 linspace rounded to float32 differs in a third of the entries by one ulp.
    """
    a, b = np.float32(start), np.float32(stop)
    step = np.float64(np.float32(np.float32(b - a) / np.float32(num - 1)))
    k = np.arange(num, dtype=np.float64)
    up = np.float64(a) + step * k
    down = np.float64(b) - step * (num - 1 - k)
    return np.where(k < num // 2, up, down).astype(np.float32)


def _alpha_bar_betas(alpha_bar, num: int, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = min(1 - abar((i + 1)/N) / abar(i/N), max_beta) in float64, then float32 (diffusers' rule)."""
    t = np.arange(num + 1, dtype=np.float64) / num
    abar = alpha_bar(t)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta).astype(np.float32)


def _laplace_alpha_bar(t):
    lam = -0.5 * np.copysign(1.0, 0.5 - t) * np.log(1.0 - 2.0 * np.abs(0.5 - t) + 1e-6)
    snr = np.exp(lam)
    return np.sqrt(snr / (1.0 + snr))


def _diffusers_betas(schedule: str, start: float, end: float, num: int) -> np.ndarray:
    """float32 betas of a diffusers ``beta_schedule``."""
    if schedule == "linear":
        return _torch_linspace_f32(start, end, num)
    if schedule == "scaled_linear":
        root = _torch_linspace_f32(start**0.5, end**0.5, num)
        return root * root
    if schedule == "squaredcos_cap_v2":
        return _alpha_bar_betas(lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2, num)
    if schedule == "laplace":
        return _alpha_bar_betas(_laplace_alpha_bar, num)
    if schedule == "exp":
        return _alpha_bar_betas(lambda t: np.exp(-12.0 * t), num)
    # sigmoid: float32 logistic of a float32 grid, scaled and shifted in float32
    x = _torch_linspace_f32(-6.0, 6.0, num).astype(np.float64)
    s = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    return s * np.float32(end - start) + np.float32(start)


def _check_table(name: str, table) -> None:
    """Raise ValueError unless a concrete ``betas`` or ``alphas_cumprod`` table is a valid DDPM table."""
    a = _checks.concrete(table)
    if a is None or not np.issubdtype(a.dtype, np.number):
        return
    a = a.astype(np.float64)
    if name == "betas":
        bad = np.flatnonzero(~((a > 0.0) & (a <= 1.0)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"`betas` must lie in (0, 1]; got betas[{i}] = {float(a[i])!r} ({bad.size} entries out of range). "
                "Pass the per-step noise variances beta_n = 1 - alphas_cumprod[n] / alphas_cumprod[n-1]."
            )
        ones = np.flatnonzero(a[:-1] == 1.0)
        if ones.size:
            raise ValueError(
                f"Only the last beta may be 1 (a zero terminal SNR); got betas[{int(ones[0])}] = 1 of {a.size}. "
                "alphas_cumprod must stay positive before the last entry."
            )
        return
    bad = np.flatnonzero(~((a >= 0.0) & (a <= 1.0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"`alphas_cumprod` must lie in [0, 1]; got alphas_cumprod[{i}] = {float(a[i])!r}.")
    up = np.flatnonzero(np.diff(a) > 0)
    if up.size:
        i = int(up[0])
        raise ValueError(
            f"`alphas_cumprod` must be non-increasing; got alphas_cumprod[{i}] = {float(a[i])!r} < "
            f"alphas_cumprod[{i + 1}] = {float(a[i + 1])!r}. Pass the cumulative products of (1 - beta)."
        )
    zeros = np.flatnonzero(a[:-1] == 0.0)
    if zeros.size:
        raise ValueError(
            "Only the last `alphas_cumprod` entry may be 0 (a zero terminal SNR); got "
            f"alphas_cumprod[{int(zeros[0])}] = 0 "
            f"of {a.size}."
        )


def _check_sigmas(owner: str, sigma_min, sigma_max):
    hint = f"{owner} noises from sigma_max (t_max) down to sigma_min (t_min); pass 0 < sigma_min < sigma_max."
    lo = _check_param(owner, "sigma_min", sigma_min, lo=0.0, hi=math.inf, lo_closed=False, hi_closed=False, hint=hint)
    hi = _check_param(owner, "sigma_max", sigma_max, lo=0.0, hi=math.inf, lo_closed=False, hi_closed=False, hint=hint)
    if lo is not None and hi is not None and not np.all(lo < hi):
        raise ValueError(f"`{owner}.sigma_min` must be below `sigma_max`, got sigma_min={sigma_min!r}, "
                         f"sigma_max={sigma_max!r}. {hint} (Are they swapped?)")


class VE(Schedule):
    """Variance exploding (Song et al., 2021): alpha = 1, sigma_t = sigma_min (sigma_max/sigma_min)^t.

    ``t = 0`` is clean data (sigma = 0) by the shared convention; ``t_min`` defaults to 1e-5.
    """

    sigma_min: jax.Array = struct.field(default=0.01)
    sigma_max: jax.Array = struct.field(default=50.0)
    t_start: float = struct.field(pytree_node=False, default=1.0)
    t_end: float = struct.field(pytree_node=False, default=1e-5)

    def __post_init__(self):
        self._check_interval()

    def check_params(self) -> None:
        _check_sigmas("VE", self.sigma_min, self.sigma_max)

    def log_alpha(self, t):
        return jnp.zeros_like(_float(t))

    def log_sigma(self, t):
        t = _float(t)
        log_s = jnp.log(self.sigma_min) + t * (jnp.log(self.sigma_max) - jnp.log(self.sigma_min))
        return jnp.where(t > 0, log_s, -jnp.inf)

    def t_of_lambda(self, lam):
        lo, hi = jnp.log(self.sigma_min), jnp.log(self.sigma_max)
        return (-_float(lam) - lo) / (hi - lo)


class EDM(Schedule):
    """EDM (Karras et al., 2022): alpha = 1, sigma_t = t; the network receives sigma.

    Default grid: Karras' rho = 7 ("karras"), the discretization the EDM paper tuned for this schedule.
    """

    default_spacing = "karras"

    sigma_min: jax.Array = struct.field(default=0.002)
    sigma_max: jax.Array = struct.field(default=80.0)

    def check_params(self) -> None:
        _check_sigmas("EDM", self.sigma_min, self.sigma_max)

    def log_alpha(self, t):
        return jnp.zeros_like(_float(t))

    def sigma(self, t):
        return _float(t)

    def log_sigma(self, t):
        t = _float(t)
        return jnp.where(t > 0, jnp.log(jnp.where(t > 0, t, 1.0)), -jnp.inf)

    def t_of_lambda(self, lam):
        return jnp.exp(-_float(lam))

    @property
    def t_min(self):
        return self.sigma_min

    @property
    def t_max(self):
        return self.sigma_max


class RectifiedFlow(Schedule):
    """Rectified flow / flow matching (Liu et al., 2023; Lipman et al., 2023): alpha = 1 - t, sigma = t.

    t = 1 is pure noise (alpha = 0, lambda = -inf); solvers handle a first step from there. Default grid uniform
    in t ("time"), as flow-matching models are sampled (a log-SNR grid cannot start at t = 1).
    """

    default_spacing = "time"

    t_end: float = struct.field(pytree_node=False, default=1e-3)
    t_start: float = struct.field(pytree_node=False, default=1.0)

    t_domain = (0.0, 1.0)

    def __post_init__(self):
        self._check_interval()

    def alpha(self, t):
        return 1.0 - _float(t)

    def sigma(self, t):
        return _float(t)

    def log_alpha(self, t):
        t = _float(t)
        return jnp.where(t < 1, jnp.log1p(-jnp.where(t < 1, t, 0.0)), -jnp.inf)

    def log_sigma(self, t):
        t = _float(t)
        return jnp.where(t > 0, jnp.log(jnp.where(t > 0, t, 1.0)), -jnp.inf)

    def t_of_lambda(self, lam):
        return jax.nn.sigmoid(-_float(lam))
