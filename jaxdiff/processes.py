r"""Forward processes: Gaussian paths :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon`.

Every process is defined by :math:`\alpha(t)` and :math:`\sigma(t)`; the base class derives the rest
once (Kingma et al. 2021, "Variational Diffusion Models"; Song et al. 2021, "Score-Based Generative
Modeling through SDEs"; Karras et al. 2022, "Elucidating the Design Space"):

- log-SNR :math:`\lambda(t) = \log(\alpha_t^2 / \sigma_t^2)` and its inverse,
- the forward SDE :math:`dx = f(t)\,x\,dt + g(t)\,dW` with :math:`f = d\log\alpha/dt` and
  :math:`g^2 = d\sigma^2/dt - 2 f \sigma^2 = -\sigma^2\, d\lambda/dt`,
- the conditional ODE :math:`dx/dt = \dot\alpha_t x_0 + \dot\sigma_t (x - \alpha_t x_0)/\sigma_t`,
- marginal and prior sampling, prior log density.

Time runs from data (``t = 0``) to noise (``t_max``). Concrete processes are small final classes
(equinox modules, hence immutable pytrees that pass through ``jax.jit``) that give ``alpha`` and
``sigma`` and, where a closed form is more accurate, the log-SNR, its inverse and the SDE coefficients.

Example:
    >>> import jax, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> x0 = jax.numpy.ones((4, 2))
    >>> xt, eps = vp.sample_marginal(x0, 0.5, key=jax.random.key(0))
    >>> xt.shape
    (4, 2)
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox import AbstractVar

from jaxdiff._utils import (
    as_time,
    bcast,
    check_time_range,
    in_dtype_of,
    is_concrete,
    sum_except_batch,
    tree_hash,
)

__all__ = [
    "time_derivative",
    "Process",
    "VP",
    "VPCosine",
    "SubVP",
    "VE",
    "EDM",
    "RectifiedFlow",
    "DiscreteVP",
]


def time_derivative(fn, t):
    """Elementwise d fn / dt by forward-mode autodiff (works for scalar or batched ``t``)."""
    t = as_time(t)
    return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]


def _require(cond: bool, message: str):
    if not cond:
        raise ValueError(message)


class Process(eqx.Module):
    r"""Abstract Gaussian path :math:`x_t = \alpha(t) x_0 + \sigma(t)\epsilon`.

    Subclasses give ``alpha``, ``sigma``, ``t_min`` and ``t_max``; everything else is derived
    here once and may be overridden by a closed form. ``Process()`` itself is a ``TypeError``.
    """

    t_min: AbstractVar[float]
    t_max: AbstractVar[float]

    # --- to be given by a concrete process -------------------------------------------------
    @abc.abstractmethod
    def alpha(self, t):
        r"""Signal scale :math:`\alpha(t)`."""

    @abc.abstractmethod
    def sigma(self, t):
        r"""Noise scale :math:`\sigma(t)`."""

    # --- the conversions every sampler, loss and solver uses ------------------------------
    def noise_level(self, t):
        r"""EDM's noise level :math:`\tilde\sigma_t = \sigma_t/\alpha_t = e^{-\lambda_t/2}`."""
        t = as_time(t)
        return self.sigma(t) / self.alpha(t)

    def t_from_noise_level(self, sigma_tilde):
        r"""The time whose noise level :math:`\sigma_t/\alpha_t` is ``sigma_tilde``."""
        return self.t_from_log_snr(-2.0 * jnp.log(as_time(sigma_tilde)))

    def eps_from_x0(self, x, x0_hat, t):
        r""":math:`\hat\epsilon = (x - \alpha_t\hat x_0)/\sigma_t` (``t`` scalar or ``(batch,)``).

        Coefficients are computed in at least float32; the result has the dtype of ``x`` and
        ``x0_hat`` (so a bfloat16 ``x`` stays bfloat16), as for every conversion below.
        """
        a, s = self._coeffs(x, t)
        return in_dtype_of((x - a * x0_hat) / s, x, x0_hat)

    def x0_from_eps(self, x, eps_hat, t):
        r""":math:`\hat x_0 = (x - \sigma_t\hat\epsilon)/\alpha_t`."""
        a, s = self._coeffs(x, t)
        return in_dtype_of((x - s * eps_hat) / a, x, eps_hat)

    def score_from_x0(self, x, x0_hat, t):
        r"""Tweedie's formula: :math:`\nabla\log p_t(x) = (\alpha_t\hat x_0 - x)/\sigma_t^2`."""
        a, s = self._coeffs(x, t)
        return in_dtype_of((a * x0_hat - x) / s**2, x, x0_hat)

    def x0_from_score(self, x, score, t):
        r"""Tweedie's formula inverted: :math:`\hat x_0 = (x + \sigma_t^2\nabla\log p_t(x))/\alpha_t`."""
        a, s = self._coeffs(x, t)
        return in_dtype_of((x + s**2 * score) / a, x, score)

    def _coeffs(self, x, t):
        r""":math:`\alpha_t` and :math:`\sigma_t` broadcast against ``x`` (at least float32)."""
        t = as_time(t, x)
        return bcast(self.alpha(t), x), bcast(self.sigma(t), x)

    # --- derived quantities -----------------------------------------------------------------
    def log_alpha(self, t):
        return jnp.log(self.alpha(t))

    def log_sigma(self, t):
        return jnp.log(self.sigma(t))

    def log_snr(self, t):
        r""":math:`\lambda(t) = 2(\log\alpha_t - \log\sigma_t)`, decreasing in ``t``."""
        t = as_time(t)
        return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

    def t_from_log_snr(self, lam):
        """Inverse of ``log_snr`` by bisection on ``[0, t_max]`` (closed forms override this)."""
        lam = as_time(lam)
        lo = jnp.zeros_like(lam)
        hi = jnp.full_like(lam, self.t_max)

        def body(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            right = self.log_snr(mid) > lam  # lambda still too large: the root lies later
            return jnp.where(right, mid, lo), jnp.where(right, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 80, body, (lo, hi))
        return 0.5 * (lo + hi)

    def f(self, t):
        r"""Drift coefficient :math:`f(t) = d\log\alpha_t/dt`."""
        return time_derivative(self.log_alpha, t)

    def g2(self, t):
        r""":math:`g(t)^2 = -\sigma_t^2\,d\lambda/dt` (equal to :math:`d\sigma^2/dt - 2f\sigma^2`)."""
        t = as_time(t)
        return -(self.sigma(t) ** 2) * time_derivative(self.log_snr, t)

    def drift(self, x, t):
        r"""Forward SDE drift :math:`f(t)\,x`."""
        return bcast(self.f(as_time(t, x)), x) * x

    def diffusion(self, t):
        r"""Forward SDE diffusion :math:`g(t)`."""
        return jnp.sqrt(self.g2(t))

    def conditional_velocity(self, x, x0, t):
        r"""Velocity of the conditional ODE that moves ``x0`` along its Gaussian path.

        .. math:: \frac{dx}{dt} = \dot\alpha_t x_0 + \frac{\dot\sigma_t}{\sigma_t}(x - \alpha_t x_0)
        """
        t = as_time(t, x)
        a, s = self._coeffs(x, t)
        da = bcast(time_derivative(self.alpha, t), x)
        ds = bcast(time_derivative(self.sigma, t), x)
        return in_dtype_of(da * x0 + ds / s * (x - a * x0), x, x0)

    def marginal(self, x0, eps, t):
        r""":math:`\alpha_t x_0 + \sigma_t\epsilon` for given noise."""
        a, s = self._coeffs(x0, t)
        return in_dtype_of(a * x0 + s * eps, x0, eps)

    def sample_marginal(self, x0, t, *, key):
        r"""Draw :math:`x_t \sim p(x_t \mid x_0)`; returns ``(x_t, eps)``."""
        check_time_range(t, 0.0, self.t_max)
        eps = jax.random.normal(key, jnp.shape(x0), dtype=jnp.result_type(x0))
        return self.marginal(x0, eps, t), eps

    def prior_sample(self, shape, *, key, dtype=jnp.float32):
        r"""Draw from the prior :math:`\mathcal{N}(0, \sigma(t_{max})^2 I)`."""
        return self.sigma(jnp.asarray(self.t_max, dtype)) * jax.random.normal(key, shape, dtype)

    def prior_logp(self, x):
        """Log density of the prior, one value per example (shape ``(batch,)``)."""
        s = self.sigma(jnp.asarray(self.t_max, jnp.result_type(x)))
        d = math.prod(jnp.shape(x)[1:])
        return -0.5 * sum_except_batch(x**2) / s**2 - d * (jnp.log(s) + 0.5 * math.log(2 * math.pi))

    def check_t(self, t, name="t", allow_zero=False):
        """Eagerly check that a concrete ``t`` lies in ``[t_min, t_max]``; no-op under tracing."""
        check_time_range(t, self.t_min, self.t_max, name=name, allow_zero=allow_zero)


def _check_range(t_min, t_max):
    if is_concrete(t_min, t_max):
        _require(float(t_min) > 0, f"t_min must be positive, got t_min={t_min}.")
        _require(float(t_max) > float(t_min), f"t_max must exceed t_min, got {t_min=}, {t_max=}.")


class _LinearBeta(Process):
    r"""The linear :math:`\beta(t) = \beta_{min} + (\beta_{max} - \beta_{min})t` shared by VP and
    sub-VP: :math:`\alpha_t = e^{-B(t)/2}` with :math:`B(t) = \int_0^t\beta`, :math:`f = -\beta/2`."""

    beta_min: AbstractVar[float]
    beta_max: AbstractVar[float]

    def __check_init__(self):
        if is_concrete(self.beta_min, self.beta_max):
            _require(self.beta_min > 0, f"beta_min must be positive, got {self.beta_min}.")
            _require(self.beta_max > self.beta_min, "beta_max must exceed beta_min.")
        _check_range(self.t_min, self.t_max)

    def _B(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def _t_from_B(self, B):
        """Invert :math:`B(t)` (the positive root of the quadratic)."""
        d = self.beta_max - self.beta_min
        return 2.0 * B / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * d * B))

    def beta(self, t):
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def log_alpha(self, t):
        return -0.5 * self._B(as_time(t))

    def f(self, t):
        return -0.5 * self.beta(as_time(t))


class VP(_LinearBeta):
    r"""Variance-preserving process with a linear :math:`\beta(t)` (DDPM; Song et al. 2021).

    :math:`\log\alpha_t = -\tfrac12 B(t)`, :math:`B(t) = \beta_{min} t + \tfrac12(\beta_{max} -
    \beta_{min})t^2`, :math:`\sigma_t^2 = 1 - \alpha_t^2`; :math:`f = -\beta/2`, :math:`g^2 = \beta`.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(-self._B(as_time(t))))

    def log_sigma(self, t):
        return 0.5 * jnp.log(-jnp.expm1(-self._B(as_time(t))))

    def log_snr(self, t):
        return -jnp.log(jnp.expm1(self._B(as_time(t))))

    def t_from_log_snr(self, lam):
        return self._t_from_B(jax.nn.softplus(-as_time(lam)))

    def g2(self, t):
        return self.beta(as_time(t))


class VPCosine(Process):
    r"""Variance-preserving cosine schedule (Nichol & Dhariwal 2021).

    :math:`\alpha_t = \cos(a_t)/\cos(a_0)` with :math:`a_t = \frac{t + s}{1 + s}\frac{\pi}{2}`,
    :math:`\sigma_t^2 = 1 - \alpha_t^2 = \sin(a_t - a_0)\sin(a_t + a_0)/\cos^2 a_0`. ``t_max`` stays
    below 1, where :math:`\alpha` vanishes (0.9946 as in DPM-Solver).
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946

    def __check_init__(self):
        if is_concrete(self.s):
            _require(self.s >= 0, f"s must be non-negative, got {self.s}.")
        _check_range(self.t_min, self.t_max)
        if is_concrete(self.t_max):
            _require(
                self.t_max < 1.0, f"VPCosine needs t_max < 1 (alpha(1) = 0), got {self.t_max}."
            )

    def _a(self, t):
        return (as_time(t) + self.s) / (1.0 + self.s) * (math.pi / 2)

    def alpha(self, t):
        return jnp.cos(self._a(t)) / jnp.cos(self.s / (1.0 + self.s) * math.pi / 2)

    def sigma(self, t):
        a0 = self.s / (1.0 + self.s) * math.pi / 2
        a = self._a(t)
        diff = as_time(t) / (1.0 + self.s) * (math.pi / 2)  # a - a0, exactly
        return jnp.sqrt(jnp.sin(diff) * jnp.sin(a + a0)) / jnp.cos(a0)

    def log_snr(self, t):
        t = as_time(t)
        return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

    def t_from_log_snr(self, lam):
        lam = as_time(lam)
        a0 = self.s / (1.0 + self.s) * math.pi / 2
        c0, s0 = jnp.cos(a0), jnp.sin(a0)  # jnp: s may be traced under jit
        alpha, sigma = jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))
        a = jnp.arctan2(jnp.sqrt(s0**2 + (c0 * sigma) ** 2), alpha * c0)
        return a / (math.pi / 2) * (1.0 + self.s) - self.s


class SubVP(_LinearBeta):
    r"""Sub-VP process (Song et al. 2021): VP's :math:`\alpha`, :math:`\sigma_t = 1 - \alpha_t^2`.

    :math:`f = -\beta/2`, :math:`g^2 = \beta(t)(1 - e^{-2B(t)})`.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def sigma(self, t):
        return -jnp.expm1(-self._B(as_time(t)))

    def log_sigma(self, t):
        return jnp.log(-jnp.expm1(-self._B(as_time(t))))

    def t_from_log_snr(self, lam):
        # alpha / (1 - alpha^2) = exp(lam / 2)  =>  B = 2 asinh(exp(-lam / 2) / 2)
        return self._t_from_B(2.0 * jnp.arcsinh(0.5 * jnp.exp(-0.5 * as_time(lam))))

    def g2(self, t):
        t = as_time(t)
        return self.beta(t) * -jnp.expm1(-2.0 * self._B(t))


class VE(Process):
    r"""Variance-exploding process (SMLD; Song & Ermon 2019, Song et al. 2021).

    :math:`\alpha_t = 1`, :math:`\sigma_t = \sigma_{min}(\sigma_{max}/\sigma_{min})^t`;
    :math:`f = 0`, :math:`g^2 = 2\sigma_t^2\log(\sigma_{max}/\sigma_{min})`.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0

    def __check_init__(self):
        if is_concrete(self.sigma_min, self.sigma_max):
            _require(self.sigma_min > 0, f"sigma_min must be positive, got {self.sigma_min}.")
            _require(self.sigma_max > self.sigma_min, "sigma_max must exceed sigma_min.")
        _check_range(self.t_min, self.t_max)

    def _log_ratio(self):
        return jnp.log(self.sigma_max) - jnp.log(self.sigma_min)

    def alpha(self, t):
        return jnp.ones_like(as_time(t))

    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def log_alpha(self, t):
        return jnp.zeros_like(as_time(t))

    def log_sigma(self, t):
        t = as_time(t)
        return jnp.log(self.sigma_min).astype(t.dtype) + t * self._log_ratio().astype(t.dtype)

    def t_from_log_snr(self, lam):
        lam = as_time(lam)
        return (-0.5 * lam - jnp.log(self.sigma_min).astype(lam.dtype)) / self._log_ratio().astype(
            lam.dtype
        )

    def f(self, t):
        return jnp.zeros_like(as_time(t))

    def g2(self, t):
        t = as_time(t)
        return 2.0 * self.sigma(t) ** 2 * self._log_ratio().astype(t.dtype)


class EDM(Process):
    r"""The EDM process (Karras et al. 2022): :math:`\alpha_t = 1`, :math:`\sigma_t = t`.

    Time is the noise level: ``t_min = sigma_min``, ``t_max = sigma_max``; :math:`g^2 = 2t`.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __check_init__(self):
        if is_concrete(self.sigma_min, self.sigma_max):
            _require(self.sigma_min > 0, f"sigma_min must be positive, got {self.sigma_min}.")
            _require(self.sigma_max > self.sigma_min, "sigma_max must exceed sigma_min.")

    @property
    def t_min(self):
        return self.sigma_min

    @property
    def t_max(self):
        return self.sigma_max

    def alpha(self, t):
        return jnp.ones_like(as_time(t))

    def sigma(self, t):
        return as_time(t)

    def log_alpha(self, t):
        return jnp.zeros_like(as_time(t))

    def log_snr(self, t):
        return -2.0 * jnp.log(as_time(t))

    def t_from_log_snr(self, lam):
        return jnp.exp(-0.5 * as_time(lam))

    def f(self, t):
        return jnp.zeros_like(as_time(t))

    def g2(self, t):
        return 2.0 * as_time(t)


class RectifiedFlow(Process):
    r"""Rectified flow / linear interpolant (Liu et al. 2022; Lipman et al. 2022).

    :math:`\alpha_t = 1 - t`, :math:`\sigma_t = t`; :math:`f = -1/(1 - t)`, :math:`g^2 = 2t/(1-t)`.
    ``t_max`` stays below 1, where the log-SNR is infinite.
    """

    t_min: float = 1e-3
    t_max: float = 0.999

    def __check_init__(self):
        _check_range(self.t_min, self.t_max)
        if is_concrete(self.t_max):
            _require(self.t_max < 1.0, f"RectifiedFlow needs t_max < 1, got {self.t_max}.")

    def alpha(self, t):
        return 1.0 - as_time(t)

    def sigma(self, t):
        return as_time(t)

    def log_alpha(self, t):
        return jnp.log1p(-as_time(t))

    def t_from_log_snr(self, lam):
        return jax.nn.sigmoid(-0.5 * as_time(lam))

    def f(self, t):
        return -1.0 / (1.0 - as_time(t))

    def g2(self, t):
        t = as_time(t)
        return 2.0 * t / (1.0 - t)


def _as_betas(betas):
    """A beta table as a floating array leaf (float64 under ``jax_enable_x64``)."""
    return jnp.asarray(betas, dtype=jnp.result_type(float))


class DiscreteVP(Process):
    r"""The variance-preserving process of a discrete beta table (DDPM; Ho et al. 2020).

    A table :math:`\beta_0, \dots, \beta_{N-1}` defines :math:`\bar\alpha_n = \prod_{i\le n}
    (1 - \beta_i)`. Following DPM-Solver's ``NoiseScheduleVP('discrete')`` (Lu et al. 2022,
    App. D), step ``n`` sits at :math:`t_n = (n + 1)/N`, and :math:`\log\alpha_t` is piecewise
    linear in :math:`t` through the knots

    .. math:: \log\alpha_{t_n} = \tfrac12\sum_{i\le n}\log(1 - \beta_i),\qquad
        \log\alpha_0 = 0,

    so :math:`\alpha(t_n)^2 = \bar\alpha_n` exactly, :math:`\sigma_t = \sqrt{1 - \alpha_t^2}`
    (computed as :math:`\sqrt{-\mathrm{expm1}(2\log\alpha_t)}`), ``t_min = 1/N``, ``t_max = 1``.
    The knot :math:`(0, 0)` (the data) extends the table below ``t_min``, so ``alpha(0) = 1``.
    The drift :math:`f = d\log\alpha/dt` is piecewise constant and :math:`g^2 = -2f`.
    The network of a pretrained model is called at ``timestep(t)`` :math:`= Nt - 1`.

    ``betas`` is an array leaf: under ``jax.jit``/``eqx.filter_jit`` it is traced, so a process
    rebuilt from the same (or another) table of the same length never recompiles. Equal tables
    compare equal and hash equal (the hash reads the concrete table; do not hash under a trace).

    Example:
        >>> import jax.numpy as jnp, jaxdiff
        >>> ddpm = jaxdiff.DiscreteVP.linear()          # DDPM's 1000 steps
        >>> bool(jnp.allclose(ddpm.alpha(1.0) ** 2, jnp.prod(1 - ddpm.betas)))
        True
        >>> float(ddpm.timestep(ddpm.t_min))
        0.0
    """

    betas: jax.Array = eqx.field(converter=_as_betas)

    def __check_init__(self):
        _require(
            self.betas.ndim == 1 and self.betas.shape[0] >= 2,
            f"betas must be a 1-D table of at least 2 steps; got shape {self.betas.shape}.",
        )
        if is_concrete(self.betas):
            b = np.asarray(self.betas)
            _require(bool(np.all(np.isfinite(b))), "betas must be finite; the table has NaN/inf.")
            bad = b[(b <= 0) | (b >= 1)]
            _require(bad.size == 0, f"betas must lie in (0, 1); got values {bad[:5]}.")

    __hash__ = tree_hash

    # --- the standard tables ----------------------------------------------------------------
    @classmethod
    def linear(cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        r"""DDPM's linear table (Ho et al. 2020): :math:`\beta_i` evenly spaced in
        ``[beta_start, beta_end]`` (diffusers' ``"linear"``)."""
        return cls(np.linspace(beta_start, beta_end, n, dtype=np.float64))

    @classmethod
    def scaled_linear(cls, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        r"""Latent diffusion's table (Rombach et al. 2022; diffusers' ``"scaled_linear"``):
        :math:`\sqrt{\beta_i}` evenly spaced in :math:`[\sqrt{\beta_{start}}, \sqrt{\beta_{end}}]`."""
        return cls(np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2)

    @classmethod
    def cosine(cls, n: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        r"""Improved DDPM's cosine table (Nichol & Dhariwal 2021, Eq. 17; diffusers'
        ``"squaredcos_cap_v2"``): :math:`\beta_i = \min(1 - \bar a((i+1)/n)/\bar a(i/n),
        \beta_{max})` with :math:`\bar a(u) = \cos^2\big(\frac{u + s}{1 + s}\frac\pi2\big)`."""
        u = np.arange(n + 1, dtype=np.float64) / n
        abar = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return cls(np.minimum(1.0 - abar[1:] / abar[:-1], max_beta))

    # --- the table ----------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        """``N``, the length of the table."""
        return self.betas.shape[0]

    @property
    def t_min(self):
        return 1.0 / self.n_steps

    @property
    def t_max(self):
        return 1.0

    @property
    def alphas_cumprod(self):
        r""":math:`\bar\alpha_n = \prod_{i\le n}(1 - \beta_i)`, shape ``(N,)``."""
        return jnp.exp(2.0 * self._knots()[1:])

    def _knots(self, dtype=None):
        r""":math:`\log\alpha` at :math:`t = 0, 1/N, \dots, 1`, shape ``(N + 1,)``."""
        knots = jnp.concatenate(
            [jnp.zeros((1,), self.betas.dtype), 0.5 * jnp.cumsum(jnp.log1p(-self.betas))]
        )
        return knots if dtype is None else knots.astype(dtype)

    def _segment(self, t):
        """The segment ``k`` (between knots ``k`` and ``k + 1``) holding ``t``, and ``Nt - k``."""
        u = self.n_steps * t
        k = jnp.clip(jnp.floor(u), 0, self.n_steps - 1)
        return k.astype(jnp.int32), u - k

    def timestep(self, t):
        """The network's (float) step index :math:`Nt - 1`: ``n`` at :math:`t_n = (n + 1)/N`."""
        return self.n_steps * as_time(t) - 1.0

    # --- the path -----------------------------------------------------------------------------
    def log_alpha(self, t):
        t = as_time(t)
        knots = self._knots(t.dtype)
        k, r = self._segment(t)
        return knots[k] + r * (knots[k + 1] - knots[k])

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

    def log_sigma(self, t):
        return 0.5 * jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))

    def t_from_log_snr(self, lam):
        # alpha^2 = sigmoid(lam); invert the piecewise-linear log alpha on its (decreasing) knots
        lam = as_time(lam)
        log_alpha = 0.5 * jax.nn.log_sigmoid(lam)
        knots = self._knots(lam.dtype)
        k = jnp.searchsorted(-knots, -log_alpha, side="right") - 1
        k = jnp.clip(k, 0, self.n_steps - 1)
        r = (log_alpha - knots[k]) / (knots[k + 1] - knots[k])
        return (k + r) / self.n_steps

    def f(self, t):
        t = as_time(t)
        knots = self._knots(t.dtype)
        k, _ = self._segment(t)
        return self.n_steps * (knots[k + 1] - knots[k])

    def g2(self, t):
        return -2.0 * self.f(t)
