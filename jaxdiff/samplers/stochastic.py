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

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._utils import bcast, is_concrete, sum_except_batch
from jaxdiff.processes import Process
from jaxdiff.samplers.base import EmptyState, OneCallSampler, Sampler, normal_like

__all__ = [
    "EulerMaruyama",
    "PredictorCorrector",
    "euler_maruyama",
    "predictor_corrector",
    "euler_maruyama_step",
    "langevin_step",
]


EulerMaruyamaState = EmptyState


def euler_maruyama_step(process: Process, x, x0_hat, t, s, noise):
    r"""One Euler-Maruyama step of the reverse SDE from ``t`` to ``s < t``.

    .. math:: x_s = x - \left[f(t)\,x - g^2(t)\nabla\log p_t(x)\right](t - s)
        + g(t)\sqrt{t - s}\;z
    """
    dt = bcast(t - s, x)
    score = process.score_from_x0(x, x0_hat, t)  # Tweedie: (alpha_t x0_hat - x) / sigma_t^2
    drift = bcast(process.f(t), x) * x - bcast(process.g2(t), x) * score
    return x - drift * dt + jnp.sqrt(bcast(process.g2(t), x) * dt) * noise


def finite_mean(v):
    """Mean of the finite entries of ``v`` (NaN only if none is finite)."""
    ok = jnp.isfinite(v)
    return jnp.sum(jnp.where(ok, v, 0.0)) / jnp.sum(ok)


def langevin_step(process: Process, x, x0_hat, t, noise, snr=0.16, scale=1.0):
    r"""One Langevin MCMC step targeting :math:`p_t` (Song et al. 2021, Alg. 4 and 5).

    .. math:: x \leftarrow x + \epsilon\,\nabla\log p_t(x) + \sqrt{2\epsilon}\,z,\qquad
        \epsilon = 2\,a\left(r\,\overline{\|z\|} / \overline{\|\nabla\log p_t(x)\|}\right)^2

    with :math:`r` the signal-to-noise ratio ``snr`` and :math:`a` = ``scale`` (Alg. 5's
    :math:`\alpha_i`). As in the reference code of Song et al., the norms are per example and then
    averaged over the batch (the bars): a per-example ratio would make :math:`\epsilon` blow up
    wherever the score nearly vanishes (near a mode, in low dimension). The average skips rows
    that are not finite, so one NaN row never changes the step size of the others.
    """
    score = process.score_from_x0(x, x0_hat, t)
    noise_norm = finite_mean(jnp.sqrt(sum_except_batch(noise**2)))
    score_norm = finite_mean(jnp.sqrt(sum_except_batch(score**2)))
    eps = 2.0 * scale * (snr * noise_norm / score_norm) ** 2
    return x + eps * score + jnp.sqrt(2.0 * eps) * noise


class EulerMaruyama(OneCallSampler):
    """Euler-Maruyama on the reverse SDE; built by :func:`euler_maruyama`."""

    process: Process

    def update(self, x, x0_hat, t, s, key):
        return euler_maruyama_step(self.process, x, x0_hat, t, s, normal_like(key, x))

    @property
    def stochastic(self) -> bool:
        return True


def euler_maruyama(process: Process) -> EulerMaruyama:
    r"""Euler-Maruyama on the reverse SDE: one denoiser call per step, needs ``key``.

    Example:
        >>> import jaxdiff
        >>> jaxdiff.samplers.euler_maruyama(jaxdiff.VE()).stochastic
        True
    """
    return EulerMaruyama(process)


class PredictorCorrector(Sampler):
    """A predictor followed by Langevin corrector steps; built by :func:`predictor_corrector`."""

    process: Process
    predictor: Sampler
    snr: float = 0.16
    n_corrector: int = eqx.field(static=True, default=1)

    def init(self, x_T, ts):
        return self.predictor.init(x_T, ts)

    def step(self, denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        key_p, key_c = jax.random.split(key)
        x, state, x0_hat, nfe = self.predictor.step(denoise, x, state, ts, i, key_p)
        scale = (self.process.alpha(t) / self.process.alpha(s)) ** 2  # 1 - beta_i of Alg. 5

        def correct(j, x):
            noise = normal_like(jax.random.fold_in(key_c, j), x)
            x_new = langevin_step(self.process, x, denoise(x, s), s, noise, self.snr, scale)
            return x_new.astype(x.dtype)

        x = jax.lax.fori_loop(0, self.n_corrector, correct, x)
        return x, state, x0_hat, nfe + self.n_corrector

    @property
    def nfe_per_step(self) -> int:
        return self.predictor.nfe_per_step + self.n_corrector

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return (
            f"predictor_corrector({self.predictor.name}, snr={self.snr}, "
            f"n_corrector={self.n_corrector})"
        )


def predictor_corrector(
    process: Process, predictor: Sampler, snr: float = 0.16, n_corrector: int = 1
) -> PredictorCorrector:
    r"""Predictor-corrector sampling (Song et al. 2021, Alg. 1 with the Langevin corrector).

    Each step runs ``predictor`` from :math:`t_i` to :math:`t_{i+1}`, then ``n_corrector``
    Langevin steps (:func:`langevin_step`) at :math:`t_{i+1}` with step-size scale
    :math:`a = (\alpha_{t_i}/\alpha_{t_{i+1}})^2 \le 1` (the discrete VP's :math:`1 - \beta_i` of
    Alg. 5; 1 for VE and EDM as in Alg. 4). The Langevin step size uses norms averaged over the
    batch (see :func:`langevin_step`), as in the reference code. NFE per step: the predictor's plus ``n_corrector``; the final step into
    ``t = 0`` returns the denoiser's output (1 NFE).

    Args:
        process: the forward process (the corrector's target :math:`p_t`).
        predictor: another sampler, e.g. :func:`euler_maruyama` or ``ddpm``, built on ``process``.
        snr: the signal-to-noise ratio :math:`r` that sets the Langevin step size.
        n_corrector: Langevin steps per time step (0 gives the predictor alone).

    Example:
        >>> import jaxdiff
        >>> vp = jaxdiff.VP()
        >>> pc = jaxdiff.samplers.predictor_corrector(vp, jaxdiff.samplers.ddpm(vp), snr=0.16)
        >>> pc.name
        'predictor_corrector(ddpm, snr=0.16, n_corrector=1)'
    """
    if not isinstance(predictor, Sampler):
        raise TypeError(f"predictor must be a jaxdiff Sampler (from a factory); got {predictor!r}.")
    if is_concrete(snr) and not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}.")
    if not isinstance(n_corrector, int) or n_corrector < 0:
        raise ValueError(f"n_corrector must be a non-negative int, got {n_corrector!r}.")
    return PredictorCorrector(
        process, predictor, float(snr) if is_concrete(snr) else snr, n_corrector
    )
