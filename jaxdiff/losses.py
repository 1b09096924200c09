r"""Per-example training losses and the time samplers they draw from.

Every loss has the shape ``loss(apply_fn, process, x0, *, key, ...) -> (batch,)``: it draws
:math:`t` and :math:`\epsilon \sim \mathcal N(0, I)`, forms :math:`x_t = \alpha_t x_0 +
\sigma_t\epsilon`, calls the network ``apply_fn(x_t, t)`` (``t`` of shape ``(batch,)``) and
returns one value per example, the **mean** over the non-batch axes of the squared error, times a
weighting :math:`\lambda(t)` and the sampler's importance weight. The caller reduces over the batch
(optax style). Class-conditional networks are closed over: ``functools.partial(net, y=labels)``.

.. math::
    \mathcal L(x_0) = w(t)\,\lambda(t)\,\operatorname{mean}\big|\mathrm{net}(x_t, t) -
    \mathrm{target}\big|^2,\qquad t \sim q,

with the targets :math:`\epsilon` (:func:`eps_loss`), :math:`x_0` (:func:`x0_loss`),
:math:`v = \alpha_t\epsilon - \sigma_t x_0` (:func:`v_loss`), the conditional velocity
:math:`\dot\alpha_t x_0 + \dot\sigma_t\epsilon` (:func:`flow_loss`) and the conditional score
:math:`-\epsilon/\sigma_t` (:func:`dsm_loss`); :func:`edm_loss` is the preconditioned loss of
Karras et al. (2022) and :func:`denoising_loss` the x0-space loss of any denoiser.

**Time samplers.** A sampler is a small module ``sampler(key, shape, dtype) -> t`` with values in
``[process.t_min, process.t_max]`` and a method ``sampler.weight(t) -> w(t)``, the importance weight
the loss multiplies by. :func:`uniform_time` and :func:`lognormal_time` define their objective
(``w = 1``); :func:`importance_time` draws :math:`t` with density :math:`q(t) \propto
g(t)^2/\sigma_t^2` and returns :math:`w(t) = p_U(t)/q(t)`, so that the estimate is unbiased for
the *uniform-time* objective (Song et al. 2021, "Maximum Likelihood Training of Score-Based
Diffusion Models", Sec. 5). Since :math:`g^2/\sigma^2 = -d\lambda/dt` this is sampling the log-SNR
uniformly, in closed form through ``process.t_from_log_snr``.

A time may be given explicitly (``t=``, a scalar or shape ``(batch,)``) for deterministic tests;
the noise then is the same as with a sampled time under the same ``key``. When ``t_sampler`` is
given too, its weight is still applied (``t`` is taken to have been drawn from it).

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> from jaxdiff import losses
    >>> net = lambda x, t: jnp.zeros_like(x)
    >>> x0 = jnp.ones((8, 2))
    >>> losses.eps_loss(net, jaxdiff.VP(), x0, key=jax.random.key(0)).shape
    (8,)
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._utils import bcast, check_batch, is_concrete, mean_except_batch
from jaxdiff.parameterization import denoiser as _make_denoiser
from jaxdiff.processes import Process, time_derivative

__all__ = [
    "TimeSampler",
    "UniformTime",
    "LogNormalTime",
    "ImportanceTime",
    "uniform_time",
    "lognormal_time",
    "importance_time",
    "eps_loss",
    "x0_loss",
    "v_loss",
    "flow_loss",
    "dsm_loss",
    "edm_loss",
    "denoising_loss",
]


# ----------------------------------------------------------------------------------------------
# Time samplers
# ----------------------------------------------------------------------------------------------
def _t_range(process: Process, dtype):
    return jnp.asarray(process.t_min, dtype), jnp.asarray(process.t_max, dtype)


class TimeSampler(eqx.Module):
    """Base of the time samplers: ``sampler(key, shape, dtype) -> t`` and ``weight(t)``."""

    process: Process

    def __call__(self, key, shape, dtype=jnp.float32):
        raise NotImplementedError

    def weight(self, t):
        """Importance weight the loss multiplies by; 1 for a sampler that defines its objective."""
        return jnp.ones_like(t)

    def _clip(self, t, dtype):
        lo, hi = _t_range(self.process, dtype)
        return jnp.clip(t.astype(dtype), lo, hi)


class UniformTime(TimeSampler):
    r""":math:`t \sim \mathcal U[t_{min}, t_{max}]`."""

    def __call__(self, key, shape, dtype=jnp.float32):
        lo, hi = _t_range(self.process, dtype)
        return jax.random.uniform(key, shape, dtype, minval=lo, maxval=hi)


class LogNormalTime(TimeSampler):
    r"""EDM's noise distribution: :math:`\log(\sigma_t/\alpha_t) \sim \mathcal N(P_{mean}, P_{std}^2)`.

    The noise level :math:`\tilde\sigma = \sigma_t/\alpha_t = e^{-\lambda/2}` is mapped to time
    through ``process.t_from_log_snr(-2 log sigma)`` and clipped to ``[t_min, t_max]``
    (Karras et al. 2022, Sec. 5).
    """

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, key, shape, dtype=jnp.float32):
        log_sigma = self.p_mean + self.p_std * jax.random.normal(key, shape, dtype)
        return self._clip(self.process.t_from_log_snr(-2.0 * log_sigma), dtype)


class ImportanceTime(TimeSampler):
    r"""Importance sampling for the likelihood weighting :math:`\lambda(t) = g(t)^2`.

    Draws :math:`t` with density :math:`q(t) = -\lambda'(t)/Z = g(t)^2/(\sigma_t^2 Z)`,
    :math:`Z = \lambda(t_{min}) - \lambda(t_{max})`, i.e. the log-SNR uniform on
    :math:`[\lambda(t_{max}), \lambda(t_{min})]`, and weighs by :math:`w(t) = p_U(t)/q(t) =
    Z\sigma_t^2 / ((t_{max} - t_{min})\,g(t)^2)`, so that for any :math:`h`

    .. math:: \mathbb E_{t\sim q}[w(t)\,h(t)] = \mathbb E_{t\sim\mathcal U[t_{min}, t_{max}]}[h(t)].

    With ``dsm_loss(..., weighting="likelihood")`` the product :math:`w\,g^2` is the constant
    :math:`Z/(t_{max}-t_{min})` times :math:`\sigma_t^2`, removing the variance that the
    :math:`1/\sigma_t^2` blow-up causes near :math:`t_{min}` (Song et al. 2021, "Maximum Likelihood
    Training of Score-Based Diffusion Models", Sec. 5).
    """

    def _lambda_range(self, dtype):
        lo, hi = _t_range(self.process, dtype)
        return self.process.log_snr(hi), self.process.log_snr(lo)

    def __call__(self, key, shape, dtype=jnp.float32):
        lam_lo, lam_hi = self._lambda_range(dtype)
        lam = jax.random.uniform(key, shape, dtype, minval=lam_lo, maxval=lam_hi)
        return self._clip(self.process.t_from_log_snr(lam), dtype)

    def density(self, t):
        r"""The sampling density :math:`q(t) = g(t)^2 / (\sigma_t^2 Z)`."""
        lam_lo, lam_hi = self._lambda_range(jnp.result_type(t))
        return self.process.g2(t) / self.process.sigma(t) ** 2 / (lam_hi - lam_lo)

    def weight(self, t):
        lo, hi = _t_range(self.process, jnp.result_type(t))
        return 1.0 / ((hi - lo) * self.density(t))


def uniform_time(process: Process) -> UniformTime:
    """Uniform time sampler on ``[process.t_min, process.t_max]`` (weight 1)."""
    return UniformTime(process)


def lognormal_time(process: Process, p_mean: float = -1.2, p_std: float = 1.2) -> LogNormalTime:
    """EDM's log-normal noise-level sampler for any process (weight 1); see :class:`LogNormalTime`."""
    return LogNormalTime(process, p_mean, p_std)


def importance_time(process: Process) -> ImportanceTime:
    """Likelihood-weighting importance sampler (log-SNR uniform); see :class:`ImportanceTime`."""
    return ImportanceTime(process)


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
def _check_x0(x0):
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise TypeError(f"x0 must be a floating array, got dtype {x0.dtype}; cast it first.")
    if x0.ndim == 0:
        raise ValueError("x0 must be batched on its leading axis, got a scalar.")
    if is_concrete(x0) and not np.all(np.isfinite(np.asarray(x0))):
        raise ValueError("x0 contains NaN or inf; clean the data batch before computing the loss.")
    return x0


def _noised(process: Process, x0, key, t_sampler, t):
    """Draw (or check) ``t``, draw ``eps``; return ``(x0, t, eps, x_t, importance weight)``."""
    x0 = _check_x0(x0)
    key_t, key_eps = jax.random.split(key)
    if t is None:
        sampler = uniform_time(process) if t_sampler is None else t_sampler
        t = sampler(key_t, x0.shape[:1], x0.dtype)
    else:
        check_batch(x0, t, "x0")
        process.check_t(t)
        t = jnp.broadcast_to(jnp.asarray(t, x0.dtype), x0.shape[:1])
    w = jnp.ones_like(t) if t_sampler is None else t_sampler.weight(t)
    eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
    return x0, t, eps, process.marginal(x0, eps, t), w


def _weighting(weighting, t, named: dict):
    r"""Resolve ``weighting``: ``None`` (1), a callable ``lambda(t)`` or one of the ``named`` ones."""
    if weighting is None:
        return jnp.ones_like(t)
    if isinstance(weighting, str):
        if weighting not in named:
            choices = ", ".join(map(repr, named)) or "none for this loss"
            raise ValueError(
                f"Unknown weighting {weighting!r}; pass a callable lambda(t) or one of: {choices}."
            )
        return named[weighting](t)
    if callable(weighting):
        return jnp.broadcast_to(weighting(t), t.shape)
    raise TypeError(f"weighting must be None, a string or a callable lambda(t); got {weighting!r}.")


def _apply(apply_fn, x, t):
    out = apply_fn(x, t)
    if jnp.shape(out) != jnp.shape(x):
        raise ValueError(
            f"apply_fn(x, t) must return an array shaped like x={tuple(jnp.shape(x))}; "
            f"got {tuple(jnp.shape(out))}."
        )
    return out


def _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target_fn, named):
    """The one engine of the regression losses: ``w * lambda * mean |net - target|^2``."""
    x0, t, eps, x_t, w = _noised(process, x0, key, t_sampler, t)
    err = _apply(apply_fn, x_t, t) - target_fn(x0, eps, t)
    return w * _weighting(weighting, t, named) * mean_except_batch(err**2)


def _likelihood_eps(process):
    return lambda t: process.g2(t) / process.sigma(t) ** 2


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def eps_loss(apply_fn, process, x0, *, key, t_sampler=None, weighting=None, t=None):
    r"""Noise prediction (Ho et al. 2020): :math:`\lambda(t)\,\mathrm{mean}|\hat\epsilon(x_t, t) -
    \epsilon|^2`.

    Args:
        apply_fn: the network ``apply_fn(x, t) -> eps_hat``.
        process: the forward process.
        x0: data, batched on the leading axis.
        key: PRNG key (split into the time key and the noise key).
        t_sampler: a time sampler (default :func:`uniform_time`); its ``weight`` is applied.
        weighting: ``None`` (1), a callable ``lambda(t)``, or ``"likelihood"``
            (:math:`g^2/\sigma^2`, equal to DSM with likelihood weighting).
        t: explicit times (scalar or ``(batch,)``) instead of sampling.

    Returns:
        The per-example loss, shape ``(batch,)``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxdiff
        >>> net = lambda x, t: jnp.zeros_like(x)
        >>> jaxdiff.losses.eps_loss(net, jaxdiff.VP(), jnp.ones((4, 3)), key=jax.random.key(0)).shape
        (4,)
    """
    named = {"likelihood": _likelihood_eps(process)}
    target = lambda x0, eps, t: eps  # noqa: E731
    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target, named)


def x0_loss(apply_fn, process, x0, *, key, t_sampler=None, weighting=None, t=None):
    r"""Data prediction: :math:`\lambda(t)\,\mathrm{mean}|\hat x_0(x_t, t) - x_0|^2`.

    ``weighting="snr"`` gives :math:`\alpha_t^2/\sigma_t^2`, which equals :func:`eps_loss` for the
    converted model. Arguments as in :func:`eps_loss`.
    """
    named = {"snr": lambda t: jnp.exp(process.log_snr(t))}
    target = lambda x0, eps, t: x0  # noqa: E731
    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target, named)


def v_loss(apply_fn, process, x0, *, key, t_sampler=None, weighting=None, t=None):
    r"""v-prediction (Salimans & Ho 2022): target :math:`v = \alpha_t\epsilon - \sigma_t x_0`.

    Arguments as in :func:`eps_loss`.
    """

    def target(x0, eps, t):
        return bcast(process.alpha(t), x0) * eps - bcast(process.sigma(t), x0) * x0

    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target, {})


def flow_loss(apply_fn, process, x0, *, key, t_sampler=None, weighting=None, t=None):
    r"""Conditional flow matching (Lipman et al. 2022; Liu et al. 2022).

    Target: the conditional velocity :math:`u = \dot\alpha_t x_0 + \dot\sigma_t\epsilon`
    (:math:`\epsilon - x_0` for :class:`~jaxdiff.RectifiedFlow`). Arguments as in :func:`eps_loss`.
    """

    def target(x0, eps, t):
        da, ds = time_derivative(process.alpha, t), time_derivative(process.sigma, t)
        return bcast(da, x0) * x0 + bcast(ds, x0) * eps

    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target, {})


def dsm_loss(apply_fn, process, x0, *, key, t_sampler=None, weighting="sigma2", t=None):
    r"""Denoising score matching (Vincent 2011; Song et al. 2021): the network predicts the score.

    .. math:: \lambda(t)\,\mathrm{mean}\big|s_\theta(x_t, t) + \epsilon/\sigma_t\big|^2

    Args:
        weighting: ``"sigma2"`` (:math:`\lambda = \sigma_t^2`; equals :func:`eps_loss` for the
            converted network :math:`\hat\epsilon = -\sigma_t s_\theta`), ``"likelihood"``
            (:math:`\lambda = g(t)^2`, whose uniform-time integral bounds the negative
            log-likelihood; pair it with :func:`importance_time`), ``None`` (1) or a callable
            ``lambda(t)``. Other arguments as in :func:`eps_loss`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxdiff
        >>> vp = jaxdiff.VP()
        >>> score_net = lambda x, t: -x
        >>> jaxdiff.losses.dsm_loss(score_net, vp, jnp.ones((4, 3)), key=jax.random.key(0),
        ...                         weighting="likelihood", t_sampler=jaxdiff.losses.importance_time(vp)).shape
        (4,)
    """
    named = {"sigma2": lambda t: process.sigma(t) ** 2, "likelihood": process.g2}
    target = lambda x0, eps, t: -eps / bcast(process.sigma(t), eps)  # noqa: E731
    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target, named)


def denoising_loss(denoise, process, x0, *, key, t_sampler=None, weighting=None, t=None):
    r"""x0-space loss of any denoiser: :math:`\lambda(t)\,\mathrm{mean}|D(x_t, t) - x_0|^2`.

    ``denoise(x, t) -> x0_hat`` may be any denoiser (for example
    ``jaxdiff.denoiser(net, process, "v")``). ``weighting="snr"`` (:math:`\alpha_t^2/\sigma_t^2`)
    makes it equal to :func:`eps_loss` of an eps-network. Arguments as in :func:`eps_loss`.
    """
    return x0_loss(denoise, process, x0, key=key, t_sampler=t_sampler, weighting=weighting, t=t)


def edm_loss(
    apply_fn, process, x0, *, key, sigma_data=0.5, p_mean=-1.2, p_std=1.2, t_sampler=None, t=None
):
    r"""The EDM loss with its preconditioning (Karras et al. 2022, Eq. 8 and Table 1).

    The raw network :math:`F` is wrapped by ``jaxdiff.denoiser(apply_fn, process, "edm")``
    (:math:`D = c_{skip}\,x/\alpha_t + c_{out}F(c_{in}\,x/\alpha_t, c_{noise})`) and

    .. math:: \mathcal L = \frac{\tilde\sigma^2 + \sigma_d^2}{(\tilde\sigma\sigma_d)^2}
        \,\mathrm{mean}|D(x_t, t) - x_0|^2,\qquad \tilde\sigma = \sigma_t/\alpha_t,

    with :math:`\log\tilde\sigma \sim \mathcal N(P_{mean}, P_{std}^2)` (:func:`lognormal_time`,
    used unless ``t_sampler`` is given). The weight makes the effective target of :math:`F` unit
    variance at every noise level. Karras et al. sum over dimensions; this loss takes the mean.

    Example:
        >>> import jax, jax.numpy as jnp, jaxdiff
        >>> F = lambda x, c_noise: jnp.zeros_like(x)
        >>> jaxdiff.losses.edm_loss(F, jaxdiff.EDM(), jnp.ones((4, 3)), key=jax.random.key(0)).shape
        (4,)
    """
    sampler = lognormal_time(process, p_mean, p_std) if t_sampler is None else t_sampler
    denoise = _make_denoiser(apply_fn, process, "edm", sigma_data=sigma_data)

    def edm_weight(t):
        s2 = jnp.exp(-process.log_snr(t))
        return (s2 + sigma_data**2) / (s2 * sigma_data**2)

    return x0_loss(denoise, process, x0, key=key, t_sampler=sampler, weighting=edm_weight, t=t)
