r"""DDPM ancestral sampling (Ho et al. 2020): draw :math:`x_s` from the posterior :math:`q(x_s\mid x_t,\hat x_0)`.

For :math:`s < t` the forward process gives the Gaussian posterior (Kingma et al. 2021,
"Variational Diffusion Models", Eq. 23 and App. A), written with the log-SNR
:math:`\lambda` so that it holds for every process:

.. math::
    q(x_s \mid x_t, x_0) = \mathcal N\!\left(\frac{\alpha_s}{\alpha_t}e^{\lambda_t-\lambda_s}x_t
    + \alpha_s\left(1 - e^{\lambda_t-\lambda_s}\right)x_0,\;
    \sigma_s^2\left(1 - e^{\lambda_t-\lambda_s}\right)I\right).

Ancestral sampling plugs in :math:`\hat x_0 = D(x_t, t)`. It is a discretization of the reverse SDE
:math:`dx = [f x - g^2\nabla\log p_t(x)]\,dt + g\,d\bar W` (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", App. E: the "reverse diffusion" / ancestral predictor), and it
equals DDIM with ``eta = 1`` (Song, Meng & Ermon 2021, Eq. 16).

Example:
    >>> import jax, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = vp.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(jaxdiff.samplers.ddpm(vp), target.denoiser(vp), x_T,
    ...                      jaxdiff.schedules.log_snr_uniform(vp, 20), key=jax.random.key(1))
    >>> res.x.shape, int(res.nfe)
    ((4, 2), 20)
"""

import jax.numpy as jnp

from jaxdiff._utils import bcast
from jaxdiff.processes import Process
from jaxdiff.samplers.base import EmptyState, OneCallSampler, normal_like

__all__ = ["DDPM", "ddpm", "ddpm_step"]

DDPMState = EmptyState


def ddpm_step(process: Process, x, x0_hat, t, s, noise):
    r"""One ancestral move of ``x`` from ``t`` to ``s < t``: a draw from :math:`q(x_s\mid x_t,\hat x_0)`.

    ``noise`` is a standard normal draw shaped like ``x`` (see the module docstring).
    """
    d_lam = bcast(process.log_snr(t) - process.log_snr(s), x)  # <= 0
    e, r = jnp.exp(d_lam), -jnp.expm1(d_lam)  # e = alpha_{t|s}^2 sigma_s^2 / sigma_t^2, r = 1 - e
    a_s, a_t = bcast(process.alpha(s), x), bcast(process.alpha(t), x)
    mean = a_s / a_t * e * x + a_s * r * x0_hat
    return mean + bcast(process.sigma(s), x) * jnp.sqrt(r) * noise


class DDPM(OneCallSampler):
    """DDPM ancestral sampler; built by :func:`ddpm`."""

    process: Process

    def update(self, x, x0_hat, t, s, key):
        return ddpm_step(self.process, x, x0_hat, t, s, normal_like(key, x))

    @property
    def stochastic(self) -> bool:
        return True


def ddpm(process: Process) -> DDPM:
    r"""DDPM ancestral sampler: one denoiser call per step, fresh noise every step (needs ``key``).

    Example:
        >>> import jaxdiff
        >>> jaxdiff.samplers.ddpm(jaxdiff.VP()).stochastic
        True
    """
    return DDPM(process)
