r"""The discrete-time DDPM chain, its reverse variances and its variational bound.

A :class:`~jaxdiff.processes.DiscreteVP` of ``N`` steps is the Markov chain of Ho et al. (2020,
"Denoising Diffusion Probabilistic Models"). Steps are 0-based as in the table (and in diffusers):
step ``n`` sits at time :math:`t_n = (n + 1)/N` and Ho et al.'s step :math:`t \in \{1..T\}` is
our ``n = t - 1``; "step -1" is the data, at ``t = 0``. With :math:`\bar\alpha_n =
\prod_{i \le n}(1 - \beta_i)` (``process.alphas_cumprod``):

.. math::
    q(x_n \mid x_{n-1}) = \mathcal N\big(\sqrt{1 - \beta_n}\,x_{n-1}, \beta_n I\big),\qquad
    q(x_n \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_n}\,x_0, (1 - \bar\alpha_n) I\big),

and the posterior (Ho et al. Eq. 6-7)

.. math::
    q(x_{n-1} \mid x_n, x_0) = \mathcal N\big(\tilde\mu_n(x_n, x_0), \tilde\beta_n I\big),\quad
    \tilde\mu_n = \frac{\sqrt{\bar\alpha_{n-1}}\beta_n}{1 - \bar\alpha_n}x_0
    + \frac{\sqrt{1-\beta_n}(1 - \bar\alpha_{n-1})}{1 - \bar\alpha_n}x_n,\quad
    \tilde\beta_n = \frac{1 - \bar\alpha_{n-1}}{1 - \bar\alpha_n}\beta_n.

Every formula here is written for a move between two times :math:`s < t` of the process
(:func:`transition`), with :math:`\alpha_{t|s} = \alpha_t/\alpha_s` and
:math:`r = 1 - e^{\lambda_t - \lambda_s}`: :math:`\beta_{t|s} = \sigma_t^2 r`,
:math:`\tilde\beta_{t|s} = \sigma_s^2 r`. Between consecutive knots ``t_n, t_{n-1}`` these are the
table's :math:`\beta_n, \tilde\beta_n`; between any two kept steps they are the **respaced** chain of
Improved DDPM (Nichol & Dhariwal 2021, Sec. 4), whose betas are recomputed from the kept
:math:`\bar\alpha`: :math:`\beta'_k = 1 - \bar\alpha_{s_k}/\bar\alpha_{s_{k-1}}` (:func:`respace`).
Sampling a respaced chain is sampling over a sub-grid (:func:`grid`) with
:func:`jaxdiff.samplers.discrete_ddpm`.

The reverse step :math:`p(x_s \mid x_t) = \mathcal N(\tilde\mu(x_t, \hat x_0), \Sigma)` takes its
variance from a :class:`ReverseVariance`: :class:`FixedLarge` (:math:`\beta`),
:class:`FixedSmall` (:math:`\tilde\beta`), :class:`Learned` (Improved DDPM's interpolation) or
:class:`AnalyticDPM` (Bao et al. 2022). The variational bound (:func:`vlb_terms`,
:func:`bits_per_dim`) and the hybrid loss of Improved DDPM (:func:`hybrid_loss`) are at the end.

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> from jaxdiff import discrete
    >>> ddpm = jaxdiff.DiscreteVP.linear(n=100)
    >>> target = jaxdiff.analytic.Gaussian(jnp.zeros(2), jnp.eye(2))
    >>> ts = discrete.grid(ddpm, discrete.respaced_steps(100, 10))   # 10 of the 100 steps
    >>> sampler = jaxdiff.samplers.discrete_ddpm(ddpm, discrete.FixedLarge())
    >>> x_T = ddpm.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(sampler, target.denoiser(ddpm), x_T, ts, key=jax.random.key(1))
    >>> res.x.shape, int(res.nfe)
    ((4, 2), 10)
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from jaxdiff._utils import as_time, bcast, in_dtype_of, is_concrete, sum_except_batch, tree_hash
from jaxdiff.parameterization import to_x0
from jaxdiff.processes import DiscreteVP, Process

__all__ = [
    "Transition",
    "transition",
    "step_times",
    "forward_step",
    "posterior",
    "respaced_steps",
    "respace",
    "grid",
    "ReverseVariance",
    "FixedLarge",
    "FixedSmall",
    "Learned",
    "AnalyticDPM",
    "analytic_dpm",
    "expected_eps_norm",
    "reverse",
    "learned_variance_model",
    "SplitOutput",
    "normal_kl",
    "Decoder",
    "GaussianDecoder",
    "DiscretizedGaussianDecoder",
    "prior_kl",
    "vlb_term",
    "vlb_terms",
    "bits_per_dim",
    "StepSampler",
    "UniformSteps",
    "ImportanceSteps",
    "hybrid_terms",
    "hybrid_loss",
    "vlb_loss",
]


# ----------------------------------------------------------------------------------------------
# The chain between two times
# ----------------------------------------------------------------------------------------------
class Transition(NamedTuple):
    r"""The chain's move between times :math:`s < t` (arrays shaped like ``t``, at least float32).

    Attributes:
        alpha: :math:`\alpha_{t|s} = \alpha_t/\alpha_s` (:math:`\sqrt{1 - \beta_n}` between knots).
        beta: :math:`\beta_{t|s} = \sigma_t^2 - \alpha_{t|s}^2\sigma_s^2`, the variance of
            :math:`q(x_t \mid x_s)`.
        beta_tilde: :math:`\tilde\beta_{t|s} = \beta_{t|s}\sigma_s^2/\sigma_t^2`, the variance of
            the posterior :math:`q(x_s \mid x_t, x_0)` (0 when ``s = 0``).
        coef_x0, coef_xt: the posterior mean :math:`\tilde\mu = c_0 x_0 + c_t x_t`,
            :math:`c_0 = \alpha_s\beta_{t|s}/\sigma_t^2`,
            :math:`c_t = \alpha_{t|s}\sigma_s^2/\sigma_t^2`.
        noise_level: :math:`\sigma_t/\alpha_t`, the scale of the error of :math:`\hat x_0` per unit
            error of :math:`\hat\epsilon`.
    """

    alpha: jax.Array
    beta: jax.Array
    beta_tilde: jax.Array
    coef_x0: jax.Array
    coef_xt: jax.Array
    noise_level: jax.Array


def transition(process: Process, t, s, like=None) -> Transition:
    r"""The coefficients of the chain's move from ``s`` to ``t > s`` (``s = 0``: the data).

    Written with :math:`r = 1 - e^{\lambda_t - \lambda_s}` (``-expm1``, exact for small steps), so
    it holds for every Gaussian path: :math:`\beta_{t|s} = \sigma_t^2 r`,
    :math:`\tilde\beta_{t|s} = \sigma_s^2 r`, :math:`c_0 = \alpha_s r`,
    :math:`c_t = (\alpha_s/\alpha_t)(1 - r)`. Times and coefficients are in at least float32
    (the dtype of ``like``, when given, if wider).

    Example:
        >>> import jax.numpy as jnp, jaxdiff
        >>> ddpm = jaxdiff.DiscreteVP.linear(n=10)
        >>> tr = transition(ddpm, ddpm.t_min * 5, ddpm.t_min * 4)       # steps 3 -> 4
        >>> bool(jnp.allclose(tr.beta, ddpm.betas[4], rtol=1e-5))
        True
    """
    t, s = as_time(t, like), as_time(s, like)
    a_t, a_s = process.alpha(t), process.alpha(s)
    r = -jnp.expm1(process.log_snr(t) - process.log_snr(s))
    sig2_t, sig2_s = process.sigma(t) ** 2, process.sigma(s) ** 2
    return Transition(
        alpha=a_t / a_s,
        beta=sig2_t * r,
        beta_tilde=sig2_s * r,
        coef_x0=a_s * r,
        coef_xt=a_s / a_t * (1.0 - r),
        noise_level=process.noise_level(t),
    )


def step_times(process: DiscreteVP, n):
    r"""The times :math:`t_n = (n + 1)/N` of integer steps ``n`` (0 for ``n = -1``, the data)."""
    return (jnp.asarray(n) + 1) / process.n_steps


def forward_step(process: Process, x_s, t, s):
    r"""Mean and variance of :math:`q(x_t \mid x_s) = \mathcal N(\alpha_{t|s}x_s, \beta_{t|s}I)`.

    Between knots of a :class:`~jaxdiff.processes.DiscreteVP` this is DDPM's one noising step;
    ``mean + sqrt(var) * z`` draws it. The variance has the shape of ``t`` (broadcast with
    :func:`jaxdiff._utils.bcast`-style ``(batch,)`` or scalar), the mean that of ``x_s``.
    """
    tr = transition(process, t, s, x_s)
    return in_dtype_of(bcast(tr.alpha, x_s) * x_s, x_s), tr.beta


def posterior(process: Process, x_t, x0, t, s):
    r"""Mean and variance of :math:`q(x_s \mid x_t, x_0) = \mathcal N(\tilde\mu, \tilde\beta I)`.

    Ho et al. Eq. 7 (see the module docstring), between any two times ``s < t``; with
    :math:`x_0 = \hat x_0` the mean is the reverse step's mean.

    Example:
        >>> import jax.numpy as jnp, jaxdiff
        >>> ddpm = jaxdiff.DiscreteVP.linear(n=10)
        >>> mean, var = posterior(ddpm, jnp.ones((2, 3)), jnp.zeros((2, 3)), 0.5, 0.4)
        >>> mean.shape, bool(var < ddpm.betas[4])
        ((2, 3), True)
    """
    tr = transition(process, t, s, x_t)
    mean = bcast(tr.coef_x0, x_t) * x0 + bcast(tr.coef_xt, x_t) * x_t
    return in_dtype_of(mean, x_t, x0), tr.beta_tilde


# ----------------------------------------------------------------------------------------------
# Respacing
# ----------------------------------------------------------------------------------------------
def respaced_steps(n_steps: int, count: int) -> np.ndarray:
    """``count`` integer steps evenly spaced over ``0 .. n_steps - 1``, both ends kept (increasing).

    Improved DDPM's respacing (Nichol & Dhariwal 2021, Sec. 4): ``round(linspace(0, N - 1, K))``.

    Example:
        >>> respaced_steps(1000, 5)
        array([  0, 250, 500, 749, 999])
    """
    if not 2 <= count <= n_steps:
        raise ValueError(f"count must lie in [2, n_steps={n_steps}]; got count={count}.")
    return np.round(np.linspace(0, n_steps - 1, count)).astype(np.int64)


def _check_steps(process: DiscreteVP, steps) -> np.ndarray:
    if not is_concrete(steps):
        raise TypeError("steps must be concrete integers (they fix the chain's length).")
    a = np.asarray(steps)
    if a.ndim != 1 or a.size < 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"steps must be a 1-D array of integer steps; got {a!r}.")
    if a[0] < 0 or a[-1] > process.n_steps - 1 or np.any(np.diff(a) <= 0):
        raise ValueError(
            f"steps must be strictly increasing integers in [0, {process.n_steps - 1}] (the "
            f"process's steps); got {a}. Build them with respaced_steps(n_steps, count)."
        )
    return a


def respace(process: DiscreteVP, steps) -> DiscreteVP:
    r"""The :class:`~jaxdiff.processes.DiscreteVP` of the chain that keeps only ``steps``.

    Improved DDPM Sec. 4: :math:`\beta'_k = 1 - \bar\alpha_{s_k}/\bar\alpha_{s_{k-1}}`
    (:math:`\bar\alpha_{s_{-1}} = 1`), so the new table's cumulative products are the kept
    :math:`\bar\alpha_{s_k}`. Its step ``k`` is the old step ``steps[k]``, where the network is
    called. Sampling it equals sampling the original over ``grid(process, steps)``.

    Example:
        >>> import jax.numpy as jnp, jaxdiff
        >>> ddpm = jaxdiff.DiscreteVP.linear()
        >>> short = respace(ddpm, respaced_steps(1000, 50))
        >>> short.n_steps, bool(jnp.allclose(short.alphas_cumprod[-1], ddpm.alphas_cumprod[-1]))
        (50, True)
    """
    steps = _check_steps(process, steps)
    log_abar = 2.0 * process.log_alpha(step_times(process, jnp.asarray(steps)))
    prev = jnp.concatenate([jnp.zeros((1,), log_abar.dtype), log_abar[:-1]])
    return DiscreteVP(-jnp.expm1(log_abar - prev))


def grid(process: DiscreteVP, steps=None):
    r"""The decreasing time grid of a chain over ``steps`` (default: every step), ending at 0.

    ``(steps[::-1] + 1)/N`` followed by 0: :func:`jaxdiff.sample` runs the chain's reverse steps
    between consecutive kept steps and returns :math:`\hat x_0` at the last (DDPM's last step has
    no noise and :math:`\tilde\mu_0 = \hat x_0`). Works for every sampler, not only
    :func:`~jaxdiff.samplers.discrete_ddpm`.

    Example:
        >>> import jaxdiff
        >>> [round(float(t), 6) for t in grid(jaxdiff.DiscreteVP.linear(n=10), [0, 4, 9])]
        [1.0, 0.5, 0.1, 0.0]
    """
    steps = np.arange(process.n_steps) if steps is None else _check_steps(process, steps)
    times = (steps[::-1] + 1) / process.n_steps
    return jnp.asarray(np.concatenate([times, [0.0]]))


# ----------------------------------------------------------------------------------------------
# Reverse variances
# ----------------------------------------------------------------------------------------------
class ReverseVariance(eqx.Module):
    r"""The variance :math:`\Sigma` of the reverse step :math:`p(x_s\mid x_t) = \mathcal N(\tilde\mu,
    \Sigma)`; abstract. ``log_variance(process, x, t, tr)`` returns :math:`\log\Sigma`,
    broadcastable against ``x``, for the move ``tr = transition(process, t, s)``."""

    @abc.abstractmethod
    def log_variance(self, process: Process, x, t, tr: Transition):
        """:math:`\\log\\Sigma` at ``(x, t)`` for the move ``tr``."""


class FixedLarge(ReverseVariance):
    r""":math:`\Sigma = \beta_{t|s}`: the upper bound of Ho et al. (Sec. 3.2), optimal for
    :math:`x_0 \sim \mathcal N(0, I)`."""

    def log_variance(self, process, x, t, tr):
        return bcast(jnp.log(tr.beta), x)


class FixedSmall(ReverseVariance):
    r""":math:`\Sigma = \tilde\beta_{t|s}`: the lower bound of Ho et al. (Sec. 3.2), optimal for a
    deterministic :math:`x_0`; the same step as :func:`jaxdiff.samplers.ddpm`."""

    def log_variance(self, process, x, t, tr):
        return bcast(jnp.log(tr.beta_tilde), x)


def _interpolate(v, tr: Transition, x):
    r""":math:`v\log\beta + (1 - v)\log\tilde\beta` (Improved DDPM Eq. 15)."""
    return v * bcast(jnp.log(tr.beta), x) + (1.0 - v) * bcast(jnp.log(tr.beta_tilde), x)


class Learned(ReverseVariance):
    r"""Improved DDPM's learned variance (Nichol & Dhariwal 2021, Eq. 15):

    .. math:: \Sigma_\theta(x_t, t) = \exp\big(v\log\beta_{t|s} + (1 - v)\log\tilde\beta_{t|s}\big)

    with :math:`v = ` ``v_fn(x, t)`` shaped like ``x`` (one interpolation per dimension, not
    constrained to [0, 1]). ``v_fn`` is the second half of a network with twice the output
    channels: build both halves with :func:`learned_variance_model`.
    """

    v_fn: Callable

    def log_variance(self, process, x, t, tr):
        t = jnp.broadcast_to(as_time(t, x), x.shape[:1])
        return _interpolate(self.v_fn(x, t), tr, x)


class AnalyticDPM(ReverseVariance):
    r"""Analytic-DPM's optimal variance (Bao et al. 2022, Thm. 1, for the DDPM step
    :math:`\lambda^2 = \tilde\beta`):

    .. math:: \Sigma^* = \tilde\beta_{t|s} + \frac{\beta_{t|s}^2}{\alpha_{t|s}^2\sigma_t^2}
        \big(1 - \Gamma_t\big),\qquad \Gamma_t = \frac1d\,\mathbb E_{q(x_t)}\|\hat\epsilon(x_t, t)\|^2,

    i.e. :math:`\tilde\beta + c_0^2(\sigma_t/\alpha_t)^2(1 - \Gamma_t)`: the posterior variance
    plus the variance of :math:`c_0 x_0` given :math:`x_t`, since
    :math:`\frac1d\mathbb E\,\mathrm{tr}\,\mathrm{Cov}[x_0\mid x_t] = (\sigma_t/\alpha_t)^2(1 -
    \Gamma_t)` for the exact denoiser. :math:`\Gamma` is clipped to [0, 1] (Thm. 2's bounds:
    :math:`\tilde\beta \le \Sigma^* \le \tilde\beta + c_0^2\sigma_t^2/\alpha_t^2`).

    ``times`` and ``gamma`` hold :math:`\Gamma` at a few times (increasing), linearly
    interpolated in between; estimate them with :func:`analytic_dpm`.
    """

    times: jax.Array
    gamma: jax.Array

    __hash__ = tree_hash

    def gamma_at(self, t):
        r""":math:`\Gamma_t`, interpolated from the table and clipped to [0, 1]."""
        t = as_time(t)
        g = jnp.interp(t, self.times.astype(t.dtype), self.gamma.astype(t.dtype))
        return jnp.clip(g, 0.0, 1.0)

    def log_variance(self, process, x, t, tr):
        gamma = self.gamma_at(jnp.broadcast_to(as_time(t, x), jnp.shape(tr.beta)))
        var = tr.beta_tilde + (tr.coef_x0 * tr.noise_level) ** 2 * (1.0 - gamma)
        return bcast(jnp.log(var), x)


def expected_eps_norm(process: Process, denoise: Callable, x0, t, *, key):
    r""":math:`\Gamma_t = \frac1d\,\mathbb E\|\hat\epsilon(x_t, t)\|^2` by Monte Carlo over the data
    batch ``x0`` (one noise draw per example); ``t`` a scalar time."""
    x_t, _ = process.sample_marginal(x0, t, key=key)
    eps_hat = process.eps_from_x0(x_t, denoise(x_t, t), t)
    return jnp.mean(eps_hat.astype(jnp.promote_types(eps_hat.dtype, jnp.float32)) ** 2)


def analytic_dpm(process: DiscreteVP, denoise: Callable, x0, *, key, steps=None) -> AnalyticDPM:
    r"""Estimate :math:`\Gamma` at the times of ``steps`` (default: every step) from a data batch.

    One denoiser call per step on the whole batch ``x0`` (Bao et al. 2022, Sec. 3: "the
    expectation is estimated by Monte Carlo over the data"); pass the steps of the grid you sample
    on to estimate only those. Run it once and reuse the result: it is a pytree of two arrays.

    Example:
        >>> import jax, jax.numpy as jnp, jaxdiff
        >>> ddpm = jaxdiff.DiscreteVP.linear(n=100)
        >>> target = jaxdiff.analytic.Gaussian(jnp.zeros(2), 0.25 * jnp.eye(2))
        >>> x0 = target.sample(512, key=jax.random.key(0))
        >>> var = analytic_dpm(ddpm, target.denoiser(ddpm), x0, key=jax.random.key(1),
        ...                    steps=respaced_steps(100, 10))
        >>> var.gamma.shape
        (10,)
    """
    steps = np.arange(process.n_steps) if steps is None else _check_steps(process, steps)
    times = step_times(process, jnp.asarray(steps)).astype(jnp.result_type(float))
    keys = jax.random.split(key, len(steps))
    gamma = jax.lax.map(lambda tk: expected_eps_norm(process, denoise, x0, tk[0], key=tk[1]),
                        (times, keys))  # fmt: skip
    return AnalyticDPM(times, gamma)


def reverse(process: Process, variance: ReverseVariance, x, x0_hat, t, s):
    r"""Mean and log-variance of the reverse step :math:`p(x_s \mid x_t) = \mathcal N(\tilde\mu(x_t,
    \hat x_0), \Sigma)`: the posterior mean through :math:`\hat x_0` and ``variance``'s
    :math:`\log\Sigma` (broadcastable against ``x``)."""
    tr = transition(process, t, s, x)
    mean = bcast(tr.coef_x0, x) * x0_hat + bcast(tr.coef_xt, x) * x
    return in_dtype_of(mean, x, x0_hat), variance.log_variance(process, x, t, tr)


class SplitOutput(eqx.Module):
    """One half of the channels (last axis) of a network with twice the output channels.

    ``half = 0`` is the mean's prediction (eps, x0 or v), ``half = 1`` the variance's :math:`v`.
    """

    apply_fn: Callable
    half: int = eqx.field(static=True)

    def __call__(self, x, t):
        out = self.apply_fn(x, t)
        c = x.shape[-1]
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != 2 * c:
            raise ValueError(
                f"a learned-variance network must return twice the channels of x (the mean's "
                f"prediction, then v, on the last axis); got shape {out.shape} for x of shape "
                f"{x.shape}. Build a UNet with out_channels=2 * in_channels."
            )
        return out[..., c:] if self.half else out[..., :c]


def learned_variance_model(apply_fn: Callable, process: Process, prediction: str = "eps"):
    r"""``(denoise, Learned(v_fn))`` from a network ``apply_fn(x, t)`` with twice the channels.

    The first half of the output channels is the mean's ``prediction``, the second the
    interpolation :math:`v` of :class:`Learned`. Under ``jax.jit`` both halves come from the same
    call ``apply_fn(x, t)`` (both see ``t`` broadcast to ``(batch,)``), which XLA computes once.

    Example:
        >>> import jax.numpy as jnp, jaxdiff
        >>> net = lambda x, t: jnp.concatenate([jnp.zeros_like(x), 0.5 + jnp.zeros_like(x)], -1)
        >>> denoise, variance = learned_variance_model(net, jaxdiff.DiscreteVP.linear(n=10))
        >>> sampler = jaxdiff.samplers.discrete_ddpm(jaxdiff.DiscreteVP.linear(n=10), variance)
    """
    from jaxdiff.parameterization import Denoiser

    return Denoiser(SplitOutput(apply_fn, 0), process, prediction), Learned(
        SplitOutput(apply_fn, 1)
    )


# ----------------------------------------------------------------------------------------------
# The variational bound
# ----------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    r"""Elementwise :math:`\mathrm{KL}(\mathcal N(m_1, e^{l_1}) \,\|\, \mathcal N(m_2, e^{l_2}))` in
    nats:

    .. math:: \tfrac12\big(l_2 - l_1 + e^{l_1 - l_2} + (m_1 - m_2)^2 e^{-l_2} - 1\big).
    """
    return 0.5 * (logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2) - 1.0)  # fmt: skip


class Decoder(eqx.Module):
    r"""The last reverse step :math:`p(x_0 \mid x_{t_0})`: ``nll(x0, mean, logvar)`` elementwise
    negative log-likelihood in nats; abstract."""

    @abc.abstractmethod
    def nll(self, x0, mean, logvar):
        """Elementwise :math:`-\\log p(x_0)` under a Gaussian of ``mean`` and ``exp(logvar)``."""


class GaussianDecoder(Decoder):
    r"""A Gaussian density for continuous data:
    :math:`\tfrac12(\log 2\pi + l + (x_0 - m)^2 e^{-l})`."""

    def nll(self, x0, mean, logvar):
        return 0.5 * (math.log(2 * math.pi) + logvar + (x0 - mean) ** 2 * jnp.exp(-logvar))


class DiscretizedGaussianDecoder(Decoder):
    r"""Ho et al.'s discretized Gaussian decoder (Eq. 13) for data of ``levels`` values evenly
    spaced in [-1, 1] (256 for 8-bit images; 17 for scikit-learn's digits).

    The probability of the bin of width :math:`\delta = 2/(\text{levels} - 1)` around :math:`x_0`,
    :math:`\Phi((x_0 + \delta/2 - m)/\sigma) - \Phi((x_0 - \delta/2 - m)/\sigma)`, with the edge
    bins extended to :math:`\pm\infty` (so the bins' probabilities sum to 1). Computed from
    ``log_ndtr`` on the side of the Gaussian where the bin lies (accurate in both tails).
    """

    levels: int = eqx.field(static=True, default=256)

    def nll(self, x0, mean, logvar):
        half = 1.0 / (self.levels - 1)
        inv = jnp.exp(-0.5 * logvar)
        upper = jnp.where(x0 > 1.0 - half, jnp.inf, (x0 + half - mean) * inv)
        lower = jnp.where(x0 < -1.0 + half, -jnp.inf, (x0 - half - mean) * inv)
        # the mass between lower and upper, from the tail on the bin's side of the mean
        right = (upper + lower) > 0  # mirror: Phi(u) - Phi(l) = Phi(-l) - Phi(-u)
        hi = jnp.where(right, -lower, upper)
        lo = jnp.where(right, -upper, lower)
        log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
        return -(log_hi + jnp.log(-jnp.expm1(jnp.minimum(log_lo - log_hi, -1e-30))))


def prior_kl(process: Process, x0):
    r""":math:`L_T = \mathrm{KL}(q(x_{t_{max}} \mid x_0) \,\|\, \mathcal N(0, \sigma_{t_{max}}^2 I))`
    per example, in nats (the prior term of the bound; no parameters)."""
    t = as_time(process.t_max, x0)
    a, s = process.alpha(t), process.sigma(t)
    logvar = 2.0 * jnp.log(s)
    return sum_except_batch(normal_kl(a * x0, logvar, 0.0, logvar))


def _decoder_transition(process: DiscreteVP, n, like):
    r"""The move of step ``n`` (``n - 1 -> n``); at ``n = 0`` :math:`\tilde\beta_0 = 0` is replaced
    by :math:`\tilde\beta_1` (its log would be :math:`-\infty`; Improved DDPM's clipping)."""
    tr = transition(process, step_times(process, n), step_times(process, n - 1), like)
    tr1 = transition(process, step_times(process, 1), step_times(process, 0), like)
    return tr._replace(beta_tilde=jnp.where(n == 0, tr1.beta_tilde, tr.beta_tilde))


def vlb_term(process: DiscreteVP, x0, x_t, x0_hat, logvar, n, decoder: Decoder):
    r"""The bound's term of step ``n`` (``(batch,)`` or scalar integers) per example, in nats:

    .. math:: L_n = \mathrm{KL}\big(q(x_{n-1}\mid x_n, x_0)\,\|\,p(x_{n-1}\mid x_n)\big)\ (n\ge 1),
        \qquad L_0 = -\log p(x_0 \mid x_{t_0})\ \text{(the decoder)},

    for :math:`x_t \sim q(x_n \mid x_0)`, the model's :math:`\hat x_0 = D(x_t, t_n)` and
    :math:`\log\Sigma` = ``logvar`` (from :func:`reverse` or :meth:`ReverseVariance.log_variance`).
    """
    tr = _decoder_transition(process, jnp.asarray(n), x_t)
    mean_q = bcast(tr.coef_x0, x_t) * x0 + bcast(tr.coef_xt, x_t) * x_t
    mean_p = bcast(tr.coef_x0, x_t) * x0_hat + bcast(tr.coef_xt, x_t) * x_t
    logvar_q = bcast(jnp.log(tr.beta_tilde), x_t)
    kl = sum_except_batch(normal_kl(mean_q, logvar_q, mean_p, logvar + jnp.zeros_like(x_t)))
    nll = sum_except_batch(decoder.nll(x0, mean_p, logvar + jnp.zeros_like(x_t)))
    return jnp.where(jnp.asarray(n) == 0, nll, kl)


def _term_at(process, denoise, variance, decoder, x0, n, key):
    """``L_n`` for a scalar step ``n``: draw ``x_n``, denoise, the reverse variance, the term."""
    t = step_times(process, n).astype(jnp.promote_types(x0.dtype, jnp.float32))
    x_t, _ = process.sample_marginal(x0, t, key=key)
    x0_hat = denoise(x_t, t)
    logvar = variance.log_variance(process, x_t, t, _decoder_transition(process, n, x_t))
    return vlb_term(process, x0, x_t, x0_hat, logvar, n, decoder)


def vlb_terms(process: DiscreteVP, denoise, variance: ReverseVariance, x0, *, key, decoder=None):
    r"""Every term of the variational bound per example, shape ``(batch, N + 1)``, in nats:
    :math:`L_0, L_1, \dots, L_{N-1}` (:func:`vlb_term`, one draw of :math:`x_n` each) and the prior
    :math:`L_N` (:func:`prior_kl`). Their sum bounds :math:`-\log p_\theta(x_0)` in expectation
    (Ho et al. Eq. 5; Sohl-Dickstein et al. 2015):

    .. math:: \mathbb E_q\Big[\sum_n L_n\Big] \ge -\log p_\theta(x_0).

    ``decoder`` defaults to :class:`GaussianDecoder` (continuous data); use
    :class:`DiscretizedGaussianDecoder` for 8-bit images in [-1, 1]. One denoiser call per step
    (``lax.map`` over the N steps).
    """
    decoder = GaussianDecoder() if decoder is None else decoder
    steps = jnp.arange(process.n_steps)
    terms = jax.lax.map(
        lambda n: _term_at(process, denoise, variance, decoder, x0, n, jax.random.fold_in(key, n)),
        steps,
    )
    return jnp.concatenate([terms.T, prior_kl(process, x0)[:, None]], axis=1)


def bits_per_dim(process: DiscreteVP, denoise, variance, x0, *, key, decoder=None):
    r"""The whole variational bound per example in bits per dimension:
    :math:`\sum_{n=0}^{N} L_n / (d\ln 2)` (see :func:`vlb_terms`).

    Example:
        >>> import jax, jax.numpy as jnp, jaxdiff
        >>> ddpm = jaxdiff.DiscreteVP.linear(n=50, beta_end=0.2)
        >>> target = jaxdiff.analytic.Gaussian(jnp.zeros(2), 0.25 * jnp.eye(2))
        >>> x0 = target.sample(8, key=jax.random.key(0))
        >>> bits_per_dim(ddpm, target.denoiser(ddpm), FixedLarge(), x0, key=jax.random.key(1)).shape
        (8,)
    """
    terms = vlb_terms(process, denoise, variance, x0, key=key, decoder=decoder)
    d = math.prod(x0.shape[1:])
    return jnp.sum(terms, axis=1) / (d * math.log(2.0))


# ----------------------------------------------------------------------------------------------
# Training: the hybrid loss and importance-sampled steps
# ----------------------------------------------------------------------------------------------
class StepSampler(eqx.Module):
    r"""Draws integer steps for the bound's terms: ``sample(key, shape) -> (n, 1/p_n)``, so that
    :math:`\sum_n L_n = \mathbb E_{n\sim p}[L_n / p_n]`; abstract."""

    @abc.abstractmethod
    def sample(self, key, shape):
        """Steps ``n`` of ``shape`` and their inverse probabilities ``1/p_n``."""


class UniformSteps(StepSampler):
    r""":math:`n \sim \mathcal U\{0, \dots, N-1\}`, :math:`1/p_n = N`."""

    n_steps: int = eqx.field(static=True)

    def sample(self, key, shape):
        n = jax.random.randint(key, shape, 0, self.n_steps)
        return n, jnp.full(shape, float(self.n_steps))


class ImportanceSteps(StepSampler):
    r"""Improved DDPM's importance sampling of :math:`L_{vlb}` (Nichol & Dhariwal 2021, Eq. 18):

    .. math:: L_{vlb} = \mathbb E_{n\sim p}\Big[\frac{L_n}{p_n}\Big],\qquad
        p_n \propto \sqrt{\mathbb E[L_n^2]},\quad \textstyle\sum p_n = 1,

    with :math:`\mathbb E[L_n^2]` the mean of the last ``history`` values of each term. Until every
    step has ``history`` values the steps are drawn uniformly. The probabilities are mixed with a
    ``uniform`` fraction of the uniform distribution, so no step is starved.

    A pure pytree: :meth:`update` returns a new sampler. In a train step::

        n, w = steps.sample(k1, (batch,))
        l_simple, l_vlb = discrete.hybrid_terms(apply_fn, process, x0, n, key=k2,
                                                stop_mean_gradient=False)
        loss = jnp.mean(w * l_vlb)
        steps = steps.update(n, jax.lax.stop_gradient(l_vlb))
    """

    values: jax.Array  # (N, history) the last values of L_n, newest last
    counts: jax.Array  # (N,) how many were recorded (capped at history)
    uniform: float = 0.001

    def __init__(self, n_steps: int, history: int = 10, uniform: float = 0.001):
        self.values = jnp.zeros((n_steps, history))
        self.counts = jnp.zeros((n_steps,), jnp.int32)
        self.uniform = uniform

    def probs(self):
        r""":math:`p_n`: uniform until warm, then :math:`\propto\sqrt{\mathbb E[L_n^2]}`, mixed."""
        n, h = self.values.shape
        rms = jnp.sqrt(jnp.mean(self.values**2, axis=1))
        p = rms / jnp.sum(rms)
        p = (1.0 - self.uniform) * p + self.uniform / n
        warm = jnp.all(self.counts >= h) & jnp.all(jnp.isfinite(p))
        return jnp.where(warm, p, jnp.full((n,), 1.0 / n))

    def sample(self, key, shape):
        p = self.probs()
        n = jax.random.choice(key, p.shape[0], shape, p=p)
        return n, 1.0 / p[n]

    def update(self, n, terms) -> ImportanceSteps:
        """Record the values ``terms`` of :math:`L_n` at steps ``n`` (same shape); a new sampler."""

        def push(carry, item):
            values, counts = carry
            step, value = item
            row = jnp.concatenate([values[step, 1:], value[None].astype(values.dtype)])
            return (values.at[step].set(row), counts.at[step].add(1)), None

        flat = (jnp.ravel(n), jnp.ravel(terms))
        (values, counts), _ = jax.lax.scan(push, (self.values, self.counts), flat)
        h = values.shape[1]
        return eqx.tree_at(lambda s: (s.values, s.counts), self, (values, jnp.minimum(counts, h)))


def hybrid_terms(
    apply_fn,
    process: DiscreteVP,
    x0,
    n,
    *,
    key,
    prediction: str = "eps",
    decoder=None,
    stop_mean_gradient: bool = True,
):
    r"""Per example at steps ``n`` ``(batch,)``: :math:`L_{simple}` and :math:`L_n` in bits/dim.

    ``apply_fn(x, t)`` returns twice the channels of ``x`` (last axis): the mean's
    ``prediction`` and :math:`v` (:class:`Learned`). :math:`L_{simple} =
    \mathrm{mean}\,|\epsilon - \hat\epsilon|^2` (Ho et al. Eq. 14, the mean over dimensions);
    :math:`L_n` is :func:`vlb_term` divided by :math:`d\ln 2`, with the mean's prediction under
    ``stop_gradient`` when ``stop_mean_gradient`` (Improved DDPM Sec. 3.1: :math:`L_{vlb}` then
    trains only the variance). ``decoder`` defaults to :class:`DiscretizedGaussianDecoder`
    (8-bit data in [-1, 1]).
    """
    decoder = DiscretizedGaussianDecoder() if decoder is None else decoder
    t = step_times(process, n).astype(jnp.promote_types(x0.dtype, jnp.float32))
    x_t, eps = process.sample_marginal(x0, t, key=key)
    out = apply_fn(x_t, t)
    c = x0.shape[-1]
    pred, v = out[..., :c], out[..., c:]
    x0_hat = to_x0(process, prediction, x_t, t, pred)
    eps_hat = process.eps_from_x0(x_t, x0_hat, t)
    l_simple = jnp.mean((eps - eps_hat).reshape(x0.shape[0], -1) ** 2, axis=1)
    if stop_mean_gradient:
        x0_hat = jax.lax.stop_gradient(x0_hat)
    logvar = _interpolate(v, _decoder_transition(process, n, x_t), x_t)
    l_vlb = vlb_term(process, x0, x_t, x0_hat, logvar, n, decoder)
    return l_simple, l_vlb / (math.prod(x0.shape[1:]) * math.log(2.0))


def hybrid_loss(
    apply_fn,
    process: DiscreteVP,
    x0,
    *,
    key,
    lam: float = 0.001,
    prediction: str = "eps",
    decoder=None,
    step_sampler: StepSampler | None = None,
):
    r"""Improved DDPM's hybrid objective per example (Nichol & Dhariwal 2021, Eq. 16):

    .. math:: L_{hybrid} = L_{simple} + \lambda L_{vlb},\qquad
        L_{vlb} \approx L_n / p_n,\ n \sim p\ \text{(uniform: } N L_n\text{)},

    with :math:`\lambda = 0.001`, :math:`L_{vlb}` in bits/dim and the stop-gradient on the mean
    inside it (see :func:`hybrid_terms`). ``apply_fn`` has twice the output channels
    (``nets.UNet(..., out_channels=2 * in_channels)``); sample with
    :func:`learned_variance_model`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxdiff
        >>> ddpm = jaxdiff.DiscreteVP.cosine(n=100)
        >>> net = lambda x, t: jnp.concatenate([jnp.zeros_like(x), jnp.zeros_like(x)], -1)
        >>> x0 = jnp.zeros((4, 8, 8, 1))
        >>> hybrid_loss(net, ddpm, x0, key=jax.random.key(0)).shape
        (4,)
    """
    sampler = UniformSteps(process.n_steps) if step_sampler is None else step_sampler
    key_n, key_x = jax.random.split(key)
    n, w = sampler.sample(key_n, x0.shape[:1])
    l_simple, l_vlb = hybrid_terms(
        apply_fn, process, x0, n, key=key_x, prediction=prediction, decoder=decoder
    )
    return l_simple + lam * w * l_vlb


def vlb_loss(apply_fn, process: DiscreteVP, x0, *, key, prediction="eps", decoder=None,
             step_sampler: StepSampler | None = None):  # fmt: skip
    r""":math:`L_{vlb} \approx L_n/p_n` per example in bits/dim, with the full gradient (Improved
    DDPM's :math:`L_{vlb}` objective; pair it with :class:`ImportanceSteps`)."""
    sampler = UniformSteps(process.n_steps) if step_sampler is None else step_sampler
    key_n, key_x = jax.random.split(key)
    n, w = sampler.sample(key_n, x0.shape[:1])
    _, l_vlb = hybrid_terms(apply_fn, process, x0, n, key=key_x, prediction=prediction,
                            decoder=decoder, stop_mean_gradient=False)  # fmt: skip
    return w * l_vlb
