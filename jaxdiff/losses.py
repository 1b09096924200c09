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

**Weightings.** A weighting is an object with one meaning: :class:`Weighting` states the
prediction whose squared error it is defined on (``space``) and gives :math:`\lambda(t)` there;
a loss on another prediction multiplies its own error by the same objective's weight,
:math:`\lambda(t)\,k_{loss}(t)/k_{space}(t)` (:func:`jaxdiff.parameterization.eps_error_scale`).
:func:`likelihood_weighting` is :math:`g(t)^2` on the score error (Song et al. 2021), i.e.
:math:`g^2/\sigma^2` on the eps error; :func:`simple_weighting` is 1 on the eps error (Ho et al.'s
:math:`L_{simple}`), i.e. :math:`\sigma^2` on the score error and the SNR on the x0 error;
:func:`edm_weighting` is EDM's on the x0 error. A plain callable ``lambda(t)`` multiplies the
loss's own error as it is. The strings of earlier versions are deprecated aliases:
``"likelihood"`` (``eps_loss``, ``dsm_loss``) is :func:`likelihood_weighting`, ``"sigma2"``
(``dsm_loss``) and ``"snr"`` (``x0_loss``, ``denoising_loss``) are :func:`simple_weighting`.

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

import abc
import warnings
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox import AbstractVar

from jaxdiff._utils import (
    as_time,
    bcast,
    check_batch,
    check_like_x,
    is_concrete,
    mean_except_batch,
    tree_hash,
)
from jaxdiff.parameterization import denoiser as _make_denoiser
from jaxdiff.parameterization import eps_error_scale
from jaxdiff.processes import Process, time_derivative

__all__ = [
    "Weighting",
    "LikelihoodWeighting",
    "SimpleWeighting",
    "EDMWeighting",
    "likelihood_weighting",
    "simple_weighting",
    "edm_weighting",
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
# Weightings
# ----------------------------------------------------------------------------------------------
class Weighting(eqx.Module):
    r"""A loss weighting :math:`\lambda(t)` on the squared error of one prediction, ``space``.

    ``weighting(t)`` is :math:`\lambda(t)` on the ``space`` error; ``weighting.on(prediction, t)``
    is the weight of the *same objective* on the error of another prediction,
    :math:`\lambda(t)\,k_{prediction}(t)/k_{space}(t)` with :math:`k` from
    :func:`jaxdiff.parameterization.eps_error_scale`. Every loss calls ``on`` with its own
    prediction, so one weighting object means one objective whichever loss it is given to.
    Equal settings compare and hash equal.
    """

    process: AbstractVar[Process]
    space: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, t):
        r""":math:`\lambda(t)` on the squared error of ``self.space``."""

    def on(self, prediction: str, t):
        """The weight of this objective on the squared error of ``prediction``."""
        t = as_time(t)
        if prediction == self.space:
            return self(t)
        k = eps_error_scale(self.process, prediction, t)
        return self(t) * k / eps_error_scale(self.process, self.space, t)

    __hash__ = tree_hash


class LikelihoodWeighting(Weighting):
    r"""Likelihood weighting (Song et al. 2021, "Maximum Likelihood Training of Score-Based
    Diffusion Models", Thm. 1): :math:`\lambda(t) = g(t)^2` on the score error.

    With it the uniform-time DSM objective bounds the negative log-likelihood (up to a constant).
    The same objective is :math:`g^2/\sigma_t^2 = -d\lambda_t/dt` on the eps error
    (:func:`eps_loss`) and :math:`g^2\alpha_t^2/\sigma_t^4` on the x0 error.

    Example:
        >>> import jax.numpy as jnp, jaxdiff
        >>> vp = jaxdiff.VP()
        >>> w = jaxdiff.losses.likelihood_weighting(vp)
        >>> bool(jnp.allclose(w(0.5), vp.g2(0.5)))
        True
        >>> bool(jnp.allclose(w.on("eps", 0.5), vp.g2(0.5) / vp.sigma(0.5) ** 2))
        True
    """

    process: Process
    space: ClassVar[str] = "score"

    def __call__(self, t):
        return self.process.g2(as_time(t))


class SimpleWeighting(Weighting):
    r"""Ho et al.'s (2020) :math:`L_{simple}`: :math:`\lambda(t) = 1` on the eps error.

    The same objective is :math:`\sigma_t^2` on the score error (:func:`dsm_loss`'s default,
    Song et al. 2021, Eq. 7) and :math:`\alpha_t^2/\sigma_t^2` (the SNR) on the x0 error.
    """

    process: Process
    space: ClassVar[str] = "eps"

    def __call__(self, t):
        return jnp.ones_like(as_time(t))


class EDMWeighting(Weighting):
    r"""EDM's weighting (Karras et al. 2022, Eq. 8 and Table 1) on the x0 error:
    :math:`\lambda = (\tilde\sigma^2 + \sigma_d^2)/(\tilde\sigma\sigma_d)^2`,
    :math:`\tilde\sigma = \sigma_t/\alpha_t`."""

    process: Process
    sigma_data: float = 0.5
    space: ClassVar[str] = "x0"

    def __call__(self, t):
        s2 = self.process.noise_level(as_time(t)) ** 2
        return (s2 + self.sigma_data**2) / (s2 * self.sigma_data**2)


def likelihood_weighting(process: Process) -> LikelihoodWeighting:
    """:math:`g(t)^2` on the score error; see :class:`LikelihoodWeighting`."""
    return LikelihoodWeighting(process)


def simple_weighting(process: Process) -> SimpleWeighting:
    """1 on the eps error (:math:`L_{simple}`); see :class:`SimpleWeighting`."""
    return SimpleWeighting(process)


def edm_weighting(process: Process, sigma_data: float = 0.5) -> EDMWeighting:
    """EDM's weighting on the x0 error; see :class:`EDMWeighting`."""
    return EDMWeighting(process, sigma_data)


class _SimpleDefault:
    """The default of :func:`dsm_loss`: :func:`simple_weighting` of the loss's process."""

    def __repr__(self):
        return "simple_weighting(process)"


_SIMPLE = _SimpleDefault()


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
    through ``process.t_from_noise_level`` and clipped to ``[t_min, t_max]``
    (Karras et al. 2022, Sec. 5).
    """

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, key, shape, dtype=jnp.float32):
        log_sigma = self.p_mean + self.p_std * jax.random.normal(key, shape, dtype)
        return self._clip(self.process.t_from_noise_level(jnp.exp(log_sigma)), dtype)


class ImportanceTime(TimeSampler):
    r"""Importance sampling for the likelihood weighting :math:`\lambda(t) = g(t)^2`.

    Draws :math:`t` with density :math:`q(t) = -\lambda'(t)/Z = g(t)^2/(\sigma_t^2 Z)`,
    :math:`Z = \lambda(t_{min}) - \lambda(t_{max})`, i.e. the log-SNR uniform on
    :math:`[\lambda(t_{max}), \lambda(t_{min})]`, and weighs by :math:`w(t) = p_U(t)/q(t) =
    Z\sigma_t^2 / ((t_{max} - t_{min})\,g(t)^2)`, so that for any :math:`h`

    .. math:: \mathbb E_{t\sim q}[w(t)\,h(t)] = \mathbb E_{t\sim\mathcal U[t_{min}, t_{max}]}[h(t)].

    With ``dsm_loss(..., weighting=likelihood_weighting(process))`` the product :math:`w\,g^2` is the constant
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
        r"""The sampling density :math:`q(t) = g(t)^2 / (\sigma_t^2 Z)`: the likelihood weighting
        on the eps error, normalised."""
        lam_lo, lam_hi = self._lambda_range(jnp.result_type(t))
        return likelihood_weighting(self.process).on("eps", t) / (lam_hi - lam_lo)

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


def _weighting(weighting, process, prediction, t, aliases: dict):
    r""":math:`\lambda(t)` on the squared error of ``prediction``, from ``None`` (1), a
    :class:`Weighting` (converted to this error by ``on``), a callable ``lambda(t)`` (taken as
    it is) or a deprecated string alias of a weighting (``aliases``)."""
    if weighting is None:
        return jnp.ones_like(t)
    if weighting is _SIMPLE:
        weighting = simple_weighting(process)
    if isinstance(weighting, str):
        if weighting not in aliases:
            choices = ", ".join(map(repr, aliases)) or "none for this loss"
            raise ValueError(
                f"Unknown weighting {weighting!r}; pass a losses.Weighting (e.g. "
                f"losses.likelihood_weighting(process)), a callable lambda(t), or one of the "
                f"deprecated strings: {choices}."
            )
        factory = aliases[weighting]
        warnings.warn(
            f"weighting={weighting!r} is deprecated; pass weighting=losses.{factory.__name__}"
            "(process) (the same numbers).",
            DeprecationWarning,
            stacklevel=4,
        )
        weighting = factory(process)
    if isinstance(weighting, Weighting):
        return jnp.broadcast_to(weighting.on(prediction, t), t.shape)
    if callable(weighting):
        return jnp.broadcast_to(weighting(t), t.shape)
    raise TypeError(
        f"weighting must be None, a losses.Weighting or a callable lambda(t); got {weighting!r}."
    )


def _apply(apply_fn, x, t):
    return check_like_x(apply_fn(x, t), x, "apply_fn(x, t)")


def _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target, aliases=None):
    """The one engine of the regression losses: ``w * lambda * mean |net - target|^2``.

    ``target`` is ``(prediction, target_fn)``: the kind of prediction the network makes (which
    error a :class:`Weighting` is converted to) and its target from ``(x0, eps, t)``.
    """
    prediction, target_fn = target
    x0, t, eps, x_t, w = _noised(process, x0, key, t_sampler, t)
    err = _apply(apply_fn, x_t, t) - target_fn(x0, eps, t)
    lam = _weighting(weighting, process, prediction, t, aliases or {})
    return w * lam * mean_except_batch(err**2)


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
        weighting: ``None`` (1), a :class:`Weighting` (e.g. :func:`likelihood_weighting`,
            :math:`g^2/\sigma^2` on this eps error, equal to DSM with likelihood weighting), or a
            callable ``lambda(t)`` on the eps error. ``"likelihood"``: deprecated alias of
            :func:`likelihood_weighting`.
        t: explicit times (scalar or ``(batch,)``) instead of sampling.

    Returns:
        The per-example loss, shape ``(batch,)``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxdiff
        >>> net = lambda x, t: jnp.zeros_like(x)
        >>> jaxdiff.losses.eps_loss(net, jaxdiff.VP(), jnp.ones((4, 3)), key=jax.random.key(0)).shape
        (4,)
    """
    target = ("eps", lambda x0, eps, t: eps)
    aliases = {"likelihood": likelihood_weighting}
    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target, aliases)


def x0_loss(apply_fn, process, x0, *, key, t_sampler=None, weighting=None, t=None):
    r"""Data prediction: :math:`\lambda(t)\,\mathrm{mean}|\hat x_0(x_t, t) - x_0|^2`.

    ``weighting=simple_weighting(process)`` gives :math:`\alpha_t^2/\sigma_t^2` on this error,
    which equals :func:`eps_loss` for the converted model (``"snr"``: its deprecated alias).
    Arguments as in :func:`eps_loss`.
    """
    target = ("x0", lambda x0, eps, t: x0)
    aliases = {"snr": simple_weighting}
    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target, aliases)


def v_loss(apply_fn, process, x0, *, key, t_sampler=None, weighting=None, t=None):
    r"""v-prediction (Salimans & Ho 2022): target :math:`v = \alpha_t\epsilon - \sigma_t x_0`.

    Arguments as in :func:`eps_loss`.
    """

    def target(x0, eps, t):
        return bcast(process.alpha(t), x0) * eps - bcast(process.sigma(t), x0) * x0

    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, ("v", target))


def flow_loss(apply_fn, process, x0, *, key, t_sampler=None, weighting=None, t=None):
    r"""Conditional flow matching (Lipman et al. 2022; Liu et al. 2022).

    Target: the conditional velocity :math:`u = \dot\alpha_t x_0 + \dot\sigma_t\epsilon`
    (:math:`\epsilon - x_0` for :class:`~jaxdiff.RectifiedFlow`). Arguments as in :func:`eps_loss`.
    """

    def target(x0, eps, t):
        da, ds = time_derivative(process.alpha, t), time_derivative(process.sigma, t)
        return bcast(da, x0) * x0 + bcast(ds, x0) * eps

    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, ("flow", target))


def dsm_loss(apply_fn, process, x0, *, key, t_sampler=None, weighting=_SIMPLE, t=None):
    r"""Denoising score matching (Vincent 2011; Song et al. 2021): the network predicts the score.

    .. math:: \lambda(t)\,\mathrm{mean}\big|s_\theta(x_t, t) + \epsilon/\sigma_t\big|^2

    Args:
        weighting: :func:`simple_weighting` (the default: :math:`\lambda = \sigma_t^2` on the
            score error, equal to :func:`eps_loss` for the converted network
            :math:`\hat\epsilon = -\sigma_t s_\theta`), :func:`likelihood_weighting`
            (:math:`\lambda = g(t)^2`, whose uniform-time integral bounds the negative
            log-likelihood; pair it with :func:`importance_time`), ``None`` (1), another
            :class:`Weighting` or a callable ``lambda(t)`` on the score error. The strings
            ``"sigma2"`` and ``"likelihood"`` are deprecated aliases of the first two.
            Other arguments as in :func:`eps_loss`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxdiff
        >>> vp = jaxdiff.VP()
        >>> score_net = lambda x, t: -x
        >>> w, q = jaxdiff.losses.likelihood_weighting(vp), jaxdiff.losses.importance_time(vp)
        >>> jaxdiff.losses.dsm_loss(score_net, vp, jnp.ones((4, 3)), key=jax.random.key(0),
        ...                         weighting=w, t_sampler=q).shape
        (4,)
    """
    target = ("score", lambda x0, eps, t: -eps / bcast(process.sigma(t), eps))
    aliases = {"sigma2": simple_weighting, "likelihood": likelihood_weighting}
    return _regression(apply_fn, process, x0, key, t_sampler, weighting, t, target, aliases)


def denoising_loss(denoise, process, x0, *, key, t_sampler=None, weighting=None, t=None):
    r"""x0-space loss of any denoiser: :math:`\lambda(t)\,\mathrm{mean}|D(x_t, t) - x_0|^2`.

    ``denoise(x, t) -> x0_hat`` may be any denoiser (for example
    ``jaxdiff.denoiser(net, process, "v")``). ``weighting=simple_weighting(process)``
    (:math:`\alpha_t^2/\sigma_t^2` on this error; ``"snr"`` is its deprecated alias) makes it
    equal to :func:`eps_loss` of an eps-network. Arguments as in :func:`eps_loss`.
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

    weighting = edm_weighting(process, sigma_data)
    return x0_loss(denoise, process, x0, key=key, t_sampler=sampler, weighting=weighting, t=t)
