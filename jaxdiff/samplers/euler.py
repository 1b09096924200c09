r"""Euler and Heun on the probability-flow ODE, EDM-style (Karras et al. 2022, Algorithms 1 and 2).

Every process is solved in EDM's variables: the scaled state :math:`\tilde x = x/\alpha_t` and the
noise level :math:`\tilde\sigma = \sigma_t/\alpha_t = e^{-\lambda/2}` (Karras et al. 2022, Sec. 3:
:math:`s(t) = 1`, :math:`\sigma(t) = t`, the choice they found best for every model). There the
probability-flow ODE :math:`dx/dt = f x - \tfrac12 g^2\nabla\log p_t(x)` becomes

.. math::
    \frac{d\tilde x}{d\tilde\sigma} = \frac{\tilde x - D(x, t)}{\tilde\sigma} = \hat\epsilon,
    \qquad \hat\epsilon = \frac{x - \alpha_t D(x, t)}{\sigma_t}.

An Euler step in these variables, :math:`\tilde x_s = \tilde x_t + (\tilde\sigma_s -
\tilde\sigma_t)\hat\epsilon_t`, is the DDIM step (Song, Meng & Ermon 2021, Eq. 14); Heun averages
:math:`\hat\epsilon` at both ends (one more denoiser call). Heun's optional churn (Algorithm 2) first
raises the noise level to :math:`\hat\sigma = \tilde\sigma(1 + \gamma)` by adding fresh noise,
:math:`\tilde x \leftarrow \tilde x + S_{noise}\sqrt{\hat\sigma^2 - \tilde\sigma^2}\,z`, with
:math:`\gamma = \min(S_{churn}/N, \sqrt2 - 1)` for :math:`\tilde\sigma \in [S_{tmin}, S_{tmax}]`.

Example:
    >>> import jax, jaxdiff
    >>> edm = jaxdiff.EDM()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = edm.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(jaxdiff.samplers.heun(edm), target.denoiser(edm), x_T,
    ...                      jaxdiff.schedules.karras(edm, 18))
    >>> int(res.nfe)  # 2 per step, 1 for the final step into 0
    35
"""

import math

import jax
import jax.numpy as jnp

from jaxdiff._utils import bcast, is_concrete
from jaxdiff.processes import Process
from jaxdiff.samplers.base import EmptyState, OneCallSampler, Sampler, normal_like

__all__ = ["Euler", "Heun", "euler", "heun", "euler_step", "heun_step", "churn_step", "noise_level"]

EulerState = EmptyState


def noise_level(process: Process, t):
    r"""EDM's noise level :math:`\tilde\sigma_t = \sigma_t/\alpha_t` (``process.noise_level``)."""
    return process.noise_level(t)


def euler_step(process: Process, x, x0_hat, t, s):
    r"""Euler from ``t`` to ``s``: :math:`x_s = \alpha_s\left(x/\alpha_t + (\tilde\sigma_s -
    \tilde\sigma_t)\hat\epsilon\right)` (identical to a deterministic DDIM step)."""
    h = bcast(process.noise_level(s) - process.noise_level(t), x)
    x_scaled = x / bcast(process.alpha(t), x) + h * process.eps_from_x0(x, x0_hat, t)
    return bcast(process.alpha(s), x) * x_scaled


def heun_step(process: Process, x, x0_hat, x_pred, x0_pred, t, s):
    r"""Heun's correction (trapezoidal rule in :math:`\tilde\sigma`), given the Euler prediction.

    .. math:: x_s = \alpha_s\left(\frac{x}{\alpha_t} + \frac{\tilde\sigma_s - \tilde\sigma_t}{2}
        \left(\hat\epsilon(x, t) + \hat\epsilon(x_{pred}, s)\right)\right)

    with ``x_pred = euler_step(process, x, x0_hat, t, s)`` and ``x0_pred = D(x_pred, s)``.
    """
    h = bcast(process.noise_level(s) - process.noise_level(t), x)
    slope = 0.5 * (process.eps_from_x0(x, x0_hat, t) + process.eps_from_x0(x_pred, x0_pred, s))
    return bcast(process.alpha(s), x) * (x / bcast(process.alpha(t), x) + h * slope)


def churn_step(process: Process, x, t, gamma, noise):
    r"""Raise the noise level of ``x`` from :math:`\tilde\sigma_t` to :math:`(1+\gamma)\tilde\sigma_t`.

    Karras et al. (2022), Algorithm 2, lines 5-6, in the scaled variable:
    :math:`\tilde x_{\hat t} = \tilde x_t + \sqrt{\hat\sigma^2 - \tilde\sigma_t^2}\,\text{noise}`
    (``noise`` already multiplied by :math:`S_{noise}`). The raised level is capped at
    :math:`\tilde\sigma(t_{max})` so the denoiser is never asked outside the process's range.
    Returns ``(x_hat, t_hat)``.
    """
    sig = process.noise_level(t)
    sig_max = process.noise_level(jnp.asarray(process.t_max, sig.dtype))
    sig_hat = jnp.maximum(jnp.minimum(sig * (1.0 + gamma), sig_max), sig)  # never below sig
    t_hat = jnp.minimum(process.t_from_noise_level(sig_hat), process.t_max)
    t_hat = jnp.where(sig_hat > sig, t_hat, t).astype(sig.dtype)  # exactly t when no churn
    rise = jnp.sqrt((sig_hat - sig) * (sig_hat + sig))  # >= 0 even where XLA fuses into an fma
    x_scaled = x / bcast(process.alpha(t), x) + bcast(rise, x) * noise
    return bcast(process.alpha(t_hat), x) * x_scaled, t_hat


class Euler(OneCallSampler):
    """Euler on the probability-flow ODE; built by :func:`euler`."""

    process: Process

    def update(self, x, x0_hat, t, s, key):
        return euler_step(self.process, x, x0_hat, t, s)


def euler(process: Process) -> Euler:
    r"""Euler on the probability-flow ODE in :math:`(\tilde x, \tilde\sigma)`: first order, 1 NFE/step.

    Example:
        >>> import jaxdiff
        >>> jaxdiff.samplers.euler(jaxdiff.EDM()).name
        'euler'
    """
    return Euler(process)


class Heun(Sampler):
    """EDM's Heun sampler with optional churn; built by :func:`heun`."""

    process: Process
    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def init(self, x_T, ts):
        return EmptyState()

    def gamma(self, ts, t):
        r""":math:`\gamma_i = \min(S_{churn}/N, \sqrt2 - 1)` inside ``[s_tmin, s_tmax]``, else 0."""
        sig = self.process.noise_level(t)
        gamma_max = jnp.minimum(self.churn / (ts.shape[0] - 1), math.sqrt(2.0) - 1.0)
        return jnp.where((sig >= self.s_tmin) & (sig <= self.s_tmax), gamma_max, 0.0)

    def _churn(self, x, ts, t, key):
        """Raise the noise level of ``x`` (lax.cond: no noise drawn where gamma is 0)."""
        gamma = self.gamma(ts, t)

        def churned(x):
            noise = self.s_noise * normal_like(key, x)
            x_hat, t_hat = churn_step(self.process, x, t, gamma, noise)
            return x_hat.astype(x.dtype), t_hat.astype(t.dtype)

        return jax.lax.cond(gamma > 0, churned, lambda x: (x, t), x)

    def step(self, denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        if self.stochastic:
            x, t = self._churn(x, ts, t, key)
        x0_hat = denoise(x, t)
        x_pred = euler_step(self.process, x, x0_hat, t, s)
        x_next = heun_step(self.process, x, x0_hat, x_pred, denoise(x_pred, s), t, s)
        return x_next, state, x0_hat, 2

    @property
    def nfe_per_step(self) -> int:
        return 2

    @property
    def noise_scale(self):
        return self.churn

    @property
    def name(self) -> str:
        return f"heun(churn={self.churn})" if self.stochastic else "heun"


def heun(
    process: Process,
    churn: float = 0.0,
    *,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Heun:
    r"""EDM's Heun sampler (Karras et al. 2022, Alg. 2): second order, 2 NFE per step.

    The final step into ``t = 0`` returns the denoiser's output (1 NFE), so ``n`` steps cost
    ``2n - 1`` evaluations. With ``churn > 0`` it is stochastic and needs a ``key``; the denoising
    trajectory then holds :math:`D(\hat x, \hat t)` at the churned point of each step.

    Args:
        process: the forward process.
        churn: :math:`S_{churn}`, total amount of added noise; :math:`\gamma = \min(S_{churn}/N,
            \sqrt2 - 1)` with :math:`N` the number of steps of the grid. 0 gives the
            deterministic ODE solver.
        s_tmin, s_tmax: churn only where the noise level :math:`\tilde\sigma_t = \sigma_t/\alpha_t`
            lies in ``[s_tmin, s_tmax]`` (for EDM, :math:`\tilde\sigma_t = t`).
        s_noise: :math:`S_{noise}`, the standard deviation of the added noise (slightly above 1
            compensates for denoisers that remove too much noise).

    Example:
        >>> import jaxdiff
        >>> sampler = jaxdiff.samplers.heun(jaxdiff.EDM(), churn=40.0, s_tmin=0.05, s_tmax=50.0,
        ...                                 s_noise=1.003)
        >>> sampler.stochastic  # churn adds noise: pass a key to jaxdiff.sample
        True
    """
    _check_churn(churn, s_tmin, s_tmax, s_noise)
    hyper = [float(v) if is_concrete(v) else v for v in (churn, s_tmin, s_tmax, s_noise)]
    return Heun(process, *hyper)


def _check_churn(churn, s_tmin, s_tmax, s_noise):
    if not is_concrete(churn, s_tmin, s_tmax, s_noise):
        return
    if churn < 0:
        raise ValueError(f"churn (S_churn) must be non-negative, got {churn}; 0 disables it.")
    if s_noise < 0:
        raise ValueError(f"s_noise (S_noise) must be non-negative, got {s_noise}.")
    if not s_tmin <= s_tmax:
        raise ValueError(f"s_tmin must not exceed s_tmax, got s_tmin={s_tmin}, s_tmax={s_tmax}.")
