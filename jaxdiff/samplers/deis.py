r"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"):
the time-based Adams--Bashforth exponential integrator tAB-DEIS, for any process.

The probability-flow ODE in EDM's variables, :math:`d\tilde x = \hat\epsilon\,d\tilde\sigma` with
:math:`\tilde x = x/\alpha_t` and :math:`\tilde\sigma = \sigma_t/\alpha_t`, integrates exactly
from :math:`t` to :math:`s` to (the exponential integrator: Zhang & Chen 2023, Eq. 11 and 13,
where :math:`\tfrac12\Psi(s, \tau)g^2(\tau)/\sigma_\tau = \alpha_s\,d\tilde\sigma/d\tau`)

.. math::
    x_s = \alpha_s\left(\frac{x_t}{\alpha_t} + \int_t^s \frac{d\tilde\sigma}{d\tau}\,
        \hat\epsilon(x_\tau, \tau)\,d\tau\right).

tAB-DEIS replaces :math:`\hat\epsilon` by the polynomial **in the process's own time**
:math:`\tau` through the last :math:`q` outputs :math:`\hat\epsilon_{i-j}` at :math:`t_{i-j}`:

.. math::
    x_s = \alpha_s\left(\frac{x_t}{\alpha_t} + \sum_{j<q} C_j\,\hat\epsilon_{i-j}\right),\qquad
    C_j = \int_t^s \frac{d\tilde\sigma}{d\tau}\,L_j(\tau)\,d\tau,

with :math:`L_j` the Lagrange basis polynomials on the nodes :math:`t_{i-j}`. The weights are
computed in the scan by parts, :math:`C_j = \tilde\sigma_s L_j(s) - \tilde\sigma_t L_j(t) -
\int_t^s \tilde\sigma(\tau)L_j'(\tau)\,d\tau`, the last integral by an 8-point Gauss--Legendre
rule (exact up to degree 15: the integrand is smooth on every step, and on EDM, where
:math:`\tilde\sigma = t`, exact). ``order=1`` (:math:`C_0 = \tilde\sigma_s - \tilde\sigma_t`)
is DDIM; the order-``q`` method uses :math:`q` outputs (DEIS's tAB with a polynomial of degree
:math:`q - 1`) and has global order ``q``. diff-sampler's DEIS sums 10,000 points per weight
instead. On EDM, time is the noise level and tAB-DEIS is :func:`~jaxdiff.samplers.lms`
(:math:`\rho`AB-DEIS). One denoiser call per step; the first ``order - 1`` steps warm up at lower
order.

Example:
    >>> import jax, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = vp.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(jaxdiff.samplers.deis(vp, order=3), target.denoiser(vp), x_T,
    ...                      jaxdiff.schedules.quadratic(vp, 10))
    >>> int(res.nfe)
    10
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._utils import bcast, weighted_sum
from jaxdiff.processes import Process
from jaxdiff.samplers.base import Sampler
from jaxdiff.samplers.dpm_solver import (
    afs_nfe,
    afs_split,
    check_order,
    denoise_or_afs,
    moment_weights,
    push,
    step_order,
)

__all__ = ["DEIS", "deis", "deis_step", "deis_weights"]

#: Gauss--Legendre nodes and weights on [0, 1] for the weights' integral.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)  # on [-1, 1]
_GL_NODES, _GL_WEIGHTS = 0.5 * (_GL_NODES + 1.0), 0.5 * _GL_WEIGHTS


class DEISState(NamedTuple):
    """Previous outputs, newest first.

    Attributes:
        eps_prev: ``(order - 1, *x.shape)`` slopes :math:`\\hat\\epsilon` at the previous times.
        t_prev: ``(order - 1,)`` those times.
    """

    eps_prev: jax.Array
    t_prev: jax.Array


def deis_weights(process: Process, t, s, t_prev, q):
    r"""The tAB-DEIS weights :math:`C_j` of a step ``t -> s`` of order ``q`` (traced).

    In :math:`u = (\tau - t)/(s - t)`, each :math:`C_j = F(L_j)` for the linear functional
    :math:`F(p) = \tilde\sigma_s p(1) - \tilde\sigma_t p(0) - \int_0^1 \tilde\sigma(\tau(u))
    p'(u)\,du`, so they solve the moment equations :math:`\sum_j C_j u_j^k = F(u^k)`
    (:func:`jaxdiff.samplers.dpm_solver.moment_weights`) on the nodes :math:`u_0 = 0`,
    :math:`u_j = (t_{i-j} - t)/(s - t)`.
    """
    m = t_prev.shape[0] + 1
    nodes = jnp.concatenate([jnp.zeros((1,), t_prev.dtype), (t_prev - t) / (s - t)])
    u = jnp.asarray(_GL_NODES, nodes.dtype)
    sig_u = process.noise_level(t + u * (s - t)) * jnp.asarray(_GL_WEIGHTS, nodes.dtype)
    sig_t, sig_s = process.noise_level(t), process.noise_level(s)
    moments = [sig_s - sig_t] + [sig_s - k * jnp.sum(sig_u * u ** (k - 1)) for k in range(1, m)]
    return moment_weights(nodes, jnp.stack(moments), q)


def deis_step(process: Process, x, x0, t, s, eps_prev, t_prev, q):
    r"""One tAB-DEIS step from ``t`` to ``s`` of order ``q`` (see the module docstring).

    ``eps_prev``/``t_prev`` hold the previous slopes and their times, newest first.
    Returns ``(x_s, eps)`` with :math:`\hat\epsilon = (x - \alpha_t\hat x_0)/\sigma_t`.
    """
    eps = process.eps_from_x0(x, x0, t)
    c = deis_weights(process, t, s, t_prev, q)
    slope = c[0] * eps + weighted_sum(c[1:], eps_prev)
    a_t, a_s = bcast(process.alpha(t), x), bcast(process.alpha(s), x)
    return a_s * (x / a_t + slope), eps


class DEIS(Sampler):
    """tAB-DEIS; built by :func:`deis`."""

    process: Process
    order: int = eqx.field(static=True, default=4)
    afs: bool = eqx.field(static=True, default=False)

    def init(self, x_T, ts):
        x_T, m = jnp.asarray(x_T), self.order - 1
        return DEISState(jnp.zeros((m, *x_T.shape), x_T.dtype), jnp.ones((m,), ts.dtype))

    def step(self, denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        x0, nfe = denoise_or_afs(self.afs, self.process, denoise, x, t, i)
        q = step_order(self.order, i, ts)
        x_s, eps = deis_step(self.process, x, x0, t, s, state.eps_prev, state.t_prev, q)
        if self.order > 1:  # order 1 keeps no history
            state = DEISState(push(state.eps_prev, eps), push(state.t_prev, t))
        return x_s, state, x0, nfe

    def nfe(self, n: int) -> int:
        return afs_nfe(super().nfe(n), self.afs, n)

    def split_first_step(self):
        return afs_split(self)

    @property
    def name(self) -> str:
        return f"deis(order={self.order}{', afs' if self.afs else ''})"


def deis(process: Process, order: int = 4, *, afs: bool = False) -> DEIS:
    r"""tAB-DEIS of order 1 to 4 (Zhang & Chen 2023): 1 denoiser call per step, any process.

    The slope is extrapolated by the polynomial of degree ``order - 1`` in the process's time
    through the last ``order`` outputs: ``order=1`` is DDIM, the default 4 is DEIS's tAB3 (a
    cubic; diff-sampler's default). ``afs=True`` replaces the first denoiser call by its
    analytic approximation
    (:func:`jaxdiff.samplers.dpm_solver.denoise_or_afs`), one evaluation fewer.

    Example:
        >>> import jaxdiff
        >>> jaxdiff.samplers.deis(jaxdiff.VP(), order=4).name
        'deis(order=4)'
    """
    return DEIS(process, check_order("deis", order, (1, 2, 3, 4)), bool(afs))
