r"""Samplers of the reverse SDE: Euler-Maruyama and predictor-corrector with Langevin dynamics.

The reverse-time SDE of the forward process :math:`dx = f(t)\,x\,dt + g(t)\,dW` is (Anderson 1982;
Song et al. 2021, "Score-Based Generative Modeling through SDEs", Eq. 6)

.. math:: dx = \left[f(t)\,x - g(t)^2\nabla\log p_t(x)\right]dt + g(t)\,d\bar W,

with the score from the denoiser by Tweedie's formula,
:math:`\nabla\log p_t(x) = (\alpha_t D(x, t) - x)/\sigma_t^2`. Euler-Maruyama steps it from
:math:`t` to :math:`s < t`; the predictor-corrector scheme (Song et al. 2021, Alg. 1) follows each
predictor step with Langevin MCMC steps that target :math:`p_s` (Alg. 4 and 5).

Example:
    >>> import jax, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = vp.prior_sample((4, 2), key=jax.random.key(0))
    >>> pc = jaxdiff.samplers.predictor_corrector(vp, jaxdiff.samplers.euler_maruyama(vp))
    >>> res = jaxdiff.sample(pc, target.denoiser(vp), x_T, jaxdiff.schedules.log_snr_uniform(vp, 20),
    ...                      key=jax.random.key(1))
    >>> int(res.nfe)  # (1 predictor + 1 corrector) per step, 1 for the final step into 0
    39
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff._utils import bcast, sum_except_batch
from jaxdiff.processes import Process
from jaxdiff.samplers.base import Sampler

__all__ = ["euler_maruyama", "predictor_corrector", "euler_maruyama_step", "langevin_step"]


class EulerMaruyamaState(NamedTuple):
    """Euler-Maruyama keeps no history."""


def _score(process, x, x0_hat, t):
    r"""Tweedie: :math:`\nabla\log p_t(x) = (\alpha_t\hat x_0 - x)/\sigma_t^2`."""
    return (bcast(process.alpha(t), x) * x0_hat - x) / bcast(process.sigma(t), x) ** 2


def euler_maruyama_step(process: Process, x, x0_hat, t, s, noise):
    r"""One Euler-Maruyama step of the reverse SDE from ``t`` to ``s < t``.

    .. math:: x_s = x - \left[f(t)\,x - g^2(t)\nabla\log p_t(x)\right](t - s)
        + g(t)\sqrt{t - s}\;z
    """
    dt = bcast(t - s, x)
    drift = bcast(process.f(t), x) * x - bcast(process.g2(t), x) * _score(process, x, x0_hat, t)
    return x - drift * dt + jnp.sqrt(bcast(process.g2(t), x) * dt) * noise


def langevin_step(process: Process, x, x0_hat, t, noise, snr=0.16, scale=1.0):
    r"""One Langevin MCMC step targeting :math:`p_t` (Song et al. 2021, Alg. 4 and 5).

    .. math:: x \leftarrow x + \epsilon\,\nabla\log p_t(x) + \sqrt{2\epsilon}\,z,\qquad
        \epsilon = 2\,a\left(r\,\|z\| / \|\nabla\log p_t(x)\|\right)^2

    with :math:`r` the signal-to-noise ratio ``snr`` and :math:`a` = ``scale`` (Alg. 5's
    :math:`\alpha_i`). Norms are per example, so the examples of a batch stay independent
    (the reference code averages them over the batch).
    """
    score = _score(process, x, x0_hat, t)
    ratio = jnp.sqrt(sum_except_batch(noise**2) / sum_except_batch(score**2))
    eps = bcast(2.0 * scale * (snr * ratio) ** 2, x)
    return x + eps * score + jnp.sqrt(2.0 * eps) * noise


def euler_maruyama(process: Process) -> Sampler:
    r"""Euler-Maruyama on the reverse SDE: one denoiser call per step, needs ``key``.

    Example:
        >>> sampler = jaxdiff.samplers.euler_maruyama(jaxdiff.VE())  # doctest: +SKIP
    """

    def init(x_T, ts):
        return EulerMaruyamaState()

    def step(denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        x0_hat = denoise(x, t)
        noise = jax.random.normal(key, x.shape, x.dtype)
        x_next = euler_maruyama_step(process, x, x0_hat, t, s, noise)
        return x_next.astype(x.dtype), state, x0_hat, 1

    return Sampler(init, step, process=process, stochastic=True, name="euler_maruyama")


def predictor_corrector(
    process: Process, predictor: Sampler, snr: float = 0.16, n_corrector: int = 1
) -> Sampler:
    r"""Predictor-corrector sampling (Song et al. 2021, Alg. 1 with the Langevin corrector).

    Each step runs ``predictor`` from :math:`t_i` to :math:`t_{i+1}`, then ``n_corrector``
    Langevin steps (:func:`langevin_step`) at :math:`t_{i+1}` with step-size scale
    :math:`a = (\alpha_{t_{i+1}}/\alpha_{t_i})^2` (:math:`1 - \beta_i` of Alg. 5 for VP, 1 for
    VE as in Alg. 4). NFE per step: the predictor's plus ``n_corrector``; the final step into
    ``t = 0`` returns the denoiser's output (1 NFE).

    Args:
        process: the forward process (the corrector's target :math:`p_t`).
        predictor: another sampler, e.g. :func:`euler_maruyama` or ``ddpm``, built on ``process``.
        snr: the signal-to-noise ratio :math:`r` that sets the Langevin step size.
        n_corrector: Langevin steps per time step (0 gives the predictor alone).

    Example:
        >>> vp = jaxdiff.VP()  # doctest: +SKIP
        >>> pc = jaxdiff.samplers.predictor_corrector(vp, jaxdiff.samplers.ddpm(vp), snr=0.16)
    """
    if not isinstance(predictor, Sampler):
        raise TypeError(f"predictor must be a jaxdiff Sampler (from a factory); got {predictor!r}.")
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}.")
    if not isinstance(n_corrector, int) or n_corrector < 0:
        raise ValueError(f"n_corrector must be a non-negative int, got {n_corrector!r}.")

    def step(denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        key_p, key_c = jax.random.split(key)
        x, state, x0_hat, nfe = predictor.step(denoise, x, state, ts, i, key_p)
        scale = (process.alpha(s) / process.alpha(t)) ** 2

        def correct(j, x):
            noise = jax.random.normal(jax.random.fold_in(key_c, j), x.shape, x.dtype)
            return langevin_step(process, x, denoise(x, s), s, noise, snr, scale).astype(x.dtype)

        x = jax.lax.fori_loop(0, n_corrector, correct, x)
        return x, state, x0_hat, nfe + n_corrector

    name = f"predictor_corrector({predictor.name}, snr={snr}, n_corrector={n_corrector})"
    return Sampler(predictor.init, step, process=process, stochastic=True, name=name)
