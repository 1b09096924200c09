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

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff._utils import bcast
from jaxdiff.processes import Process
from jaxdiff.samplers.base import Sampler

__all__ = ["ddim", "ddim_step"]


class DDIMState(NamedTuple):
    """DDIM keeps no history."""


def ddim_step(process: Process, x, x0_hat, t, s, eta=0.0, noise=None):
    r"""One DDIM move of ``x`` from ``t`` to ``s`` given :math:`\hat x_0` (see module docstring)."""
    a_s, sig_s = bcast(process.alpha(s), x), bcast(process.sigma(s), x)
    a_t, sig_t = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    eps_hat = (x - a_t * x0_hat) / sig_t
    if noise is None:
        return a_s * x0_hat + sig_s * eps_hat
    c2 = eta**2 * sig_s**2 * bcast(-jnp.expm1(process.log_snr(t) - process.log_snr(s)), x)
    return a_s * x0_hat + jnp.sqrt(sig_s**2 - c2) * eps_hat + jnp.sqrt(c2) * noise


def ddim(process: Process, eta: float = 0.0) -> Sampler:
    r"""DDIM sampler; ``eta`` interpolates between the probability-flow ODE (0) and DDPM (1)."""
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}.")

    def init(x_T, ts):
        return DDIMState()

    def step(denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        x0_hat = denoise(x, t)
        noise = None if eta == 0 else jax.random.normal(key, x.shape, x.dtype)
        x_next = ddim_step(process, x, x0_hat, t, s, eta, noise)
        return x_next.astype(x.dtype), state, x0_hat, 1

    return Sampler(init, step, process=process, stochastic=eta != 0, name=f"ddim(eta={eta})")
