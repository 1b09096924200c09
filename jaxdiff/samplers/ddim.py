r"""DDIM (Song, Meng & Ermon 2021): the exponential-integrator step of the probability-flow ODE.

From :math:`(x, t)` to :math:`s < t` with :math:`\hat x_0 = D(x, t)` and
:math:`\hat\epsilon = (x - \alpha_t\hat x_0)/\sigma_t`:

.. math::
    x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\epsilon + c\,z,\qquad
    c^2 = \eta^2\sigma_s^2\left(1 - e^{\lambda_t - \lambda_s}\right),

with :math:`z \sim \mathcal N(0, I)`. ``eta = 0`` is the deterministic DDIM step, identical to
DPM-Solver-1 (Lu et al. 2022, Sec. 4.1); ``eta = 1`` is ancestral sampling from the DDPM posterior
:math:`q(x_s \mid x_t, \hat x_0)`, whose variance is :math:`\sigma_s^2(1 - e^{\lambda_t-\lambda_s})`
(Kingma et al. 2021, Eq. 23).

Example:
    >>> sampler = jaxdiff.samplers.ddim(jaxdiff.VP(), eta=0.0)  # doctest: +SKIP
"""

import jax
import jax.numpy as jnp

from jaxdiff._utils import bcast, is_concrete
from jaxdiff.processes import Process
from jaxdiff.samplers.base import EmptyState, OneCallSampler, is_zero, normal_like

__all__ = ["DDIM", "ddim", "ddim_step"]

DDIMState = EmptyState


def ddim_step(process: Process, x, x0_hat, t, s, eta=0.0, noise=None):
    r"""One DDIM move of ``x`` from ``t`` to ``s`` given :math:`\hat x_0` (see module docstring)."""
    a_s, sig_s = bcast(process.alpha(s), x), bcast(process.sigma(s), x)
    eps_hat = process.eps_from_x0(x, x0_hat, t)
    if noise is None:
        return a_s * x0_hat + sig_s * eps_hat
    # c = eta sigma_s sqrt(r), r = 1 - e^{lambda_t - lambda_s} > 0: no square root of 0 at eta = 0,
    # so the step stays differentiable there (schedules.optimize differentiates through it).
    # Going up in time (DDIM inversion, s > t) r < 0: no noise there, and no NaN from sqrt(r).
    r = bcast(-jnp.expm1(process.log_snr(t) - process.log_snr(s)), x)
    up = r <= 0
    sqrt_r = jnp.where(up, 0.0, jnp.sqrt(jnp.where(up, 1.0, r)))
    keep = jnp.sqrt(1.0 - eta**2 * jnp.where(up, 0.0, r))  # sqrt(sigma_s^2 - c^2) / sigma_s
    return a_s * x0_hat + sig_s * keep * eps_hat + eta * sig_s * sqrt_r * noise


class DDIM(OneCallSampler):
    """DDIM; built by :func:`ddim`."""

    process: Process
    eta: float = 0.0

    def update(self, x, x0_hat, t, s, key):
        if is_zero(self.eta):  # a concrete 0 (a step called outside the engine): no noise
            return ddim_step(self.process, x, x0_hat, t, s)
        p, eta = self.process, self.eta

        def noisy():
            return ddim_step(p, x, x0_hat, t, s, eta, normal_like(key, x)).astype(x.dtype)

        return jax.lax.cond(eta > 0, noisy, lambda: ddim_step(p, x, x0_hat, t, s).astype(x.dtype))

    @property
    def noise_scale(self):
        return self.eta

    @property
    def name(self) -> str:
        return f"ddim(eta={self.eta})"


def ddim(process: Process, eta: float = 0.0) -> DDIM:
    r"""DDIM sampler; ``eta`` interpolates between the probability-flow ODE (0) and DDPM (1).

    ``eta`` is traced: changing it (0 included) reuses the compiled sampler.
    """
    if is_concrete(eta) and eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}.")
    return DDIM(process, float(eta) if is_concrete(eta) else eta)
