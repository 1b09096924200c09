r"""DDPM's ancestral sampler over the integer steps of a discrete chain, with a choice of variance.

From step time :math:`t` to the next kept step :math:`s < t` (every step of a
:class:`~jaxdiff.processes.DiscreteVP`, or a respaced subset: :func:`jaxdiff.discrete.grid`):

.. math:: x_s = \tilde\mu(x_t, \hat x_0) + \Sigma^{1/2} z,\qquad
    \tilde\mu = \frac{\sqrt{\bar\alpha_s}\,\beta_{t|s}}{1 - \bar\alpha_t}\hat x_0
    + \frac{\sqrt{1 - \beta_{t|s}}\,(1 - \bar\alpha_s)}{1 - \bar\alpha_t}x_t,

with :math:`\beta_{t|s} = 1 - \bar\alpha_t/\bar\alpha_s` (the respaced beta of Improved DDPM,
Sec. 4), :math:`\hat x_0 = D(x_t, t)` and :math:`\Sigma` from a
:class:`jaxdiff.discrete.ReverseVariance`: ``FixedSmall()`` (:math:`\tilde\beta`, Ho et al.
2020; the same step as :func:`jaxdiff.samplers.ddpm`), ``FixedLarge()`` (:math:`\beta`),
``Learned(v_fn)`` (Nichol & Dhariwal 2021) or an ``AnalyticDPM`` (Bao et al. 2022). With
:math:`\hat\epsilon` in place of :math:`\hat x_0` the mean is Ho et al.'s Eq. 11,
:math:`\frac{1}{\sqrt{1-\beta}}\big(x_t - \frac{\beta}{\sqrt{1-\bar\alpha_t}}\hat\epsilon\big)`.
The last step of a grid ending at 0 returns :math:`\hat x_0` (DDPM's noiseless last step).

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> from jaxdiff import discrete
    >>> ddpm = jaxdiff.DiscreteVP.linear(n=100)
    >>> target = jaxdiff.analytic.Gaussian(jnp.zeros(2), jnp.eye(2))
    >>> sampler = jaxdiff.samplers.discrete_ddpm(ddpm, discrete.FixedLarge())
    >>> x_T = ddpm.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(sampler, target.denoiser(ddpm), x_T, discrete.grid(ddpm),
    ...                      key=jax.random.key(1))
    >>> int(res.nfe)
    100
"""

import jax.numpy as jnp

from jaxdiff.discrete import FixedSmall, ReverseVariance, reverse
from jaxdiff.processes import Process
from jaxdiff.samplers.base import EmptyState, Sampler, normal_like

__all__ = ["DiscreteDDPM", "discrete_ddpm"]


class DiscreteDDPM(Sampler):
    """DDPM ancestral sampling with a reverse variance; built by :func:`discrete_ddpm`."""

    process: Process
    variance: ReverseVariance

    def init(self, x_T, ts):
        return EmptyState()

    def step(self, denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        x0_hat = denoise(x, t)
        mean, logvar = reverse(self.process, self.variance, x, x0_hat, t, s)
        return mean + jnp.exp(0.5 * logvar) * normal_like(key, x), state, x0_hat, 1

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return f"discrete_ddpm({type(self.variance).__name__})"


def discrete_ddpm(process: Process, variance: ReverseVariance | None = None) -> DiscreteDDPM:
    """DDPM ancestral sampler with reverse variance ``variance`` (default ``FixedSmall()``).

    Run it on the grid of the chain's steps, ``jaxdiff.discrete.grid(process, steps)``, where the
    network of a pretrained model is called at its integer steps.

    Example:
        >>> import jaxdiff
        >>> from jaxdiff.discrete import FixedLarge
        >>> s = discrete_ddpm(jaxdiff.DiscreteVP.linear(), FixedLarge())
        >>> bool(s == discrete_ddpm(jaxdiff.DiscreteVP.linear(), FixedLarge())), s.stochastic
        (True, True)
    """
    return DiscreteDDPM(process, FixedSmall() if variance is None else variance)
