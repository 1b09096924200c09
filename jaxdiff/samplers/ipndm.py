r"""iPNDM: improved pseudo numerical methods (Zhang & Chen 2023, "Fast Sampling of Diffusion
Models with Exponential Integrator" (DEIS), Sec. 5 and App.; after Liu et al. 2022, PNDM).

A linear multistep method (Adams--Bashforth) on the probability-flow ODE in EDM's variables
(Karras et al. 2022): the scaled state :math:`\tilde x = x/\alpha_t` and the noise level
:math:`\tilde\sigma = \sigma_t/\alpha_t = e^{-\lambda_t/2}`, where the ODE has no linear part,

.. math::
    \frac{d\tilde x}{d\tilde\sigma} = \frac{\tilde x - D(x, t)}{\tilde\sigma} = \hat\epsilon,
    \qquad
    \tilde x_{i+1} = \tilde x_i + (\tilde\sigma_{i+1} - \tilde\sigma_i)
        \sum_{j=0}^{q-1} b_j\,\hat\epsilon_{i-j}.

iPNDM uses the Adams--Bashforth weights of a uniform grid, with lower order while the history
fills up (Zhang & Chen 2023 replace PNDM's Runge--Kutta warm-up by this):

.. math::
    q = 1: (1),\quad q = 2: \tfrac12(3, -1),\quad q = 3: \tfrac1{12}(23, -16, 5),\quad
    q = 4: \tfrac1{24}(55, -59, 37, -9).

One denoiser call per step. On grids that are not uniform in :math:`\tilde\sigma` (log-SNR and
Karras grids are not) these fixed weights are a perturbation of order :math:`O(h)` of the exact
ones, which limits the asymptotic order to 2 (measured in ``tests/test_convergence.py``), while
often being the better choice at very few steps (Zhou et al. 2024, "Fast ODE-based Sampling for
Diffusion Models in Around 5 Steps", compare iPNDM and its variable-step form).
``variable_step=True`` uses the weights of the interpolating polynomial through the actual past
noise levels, :math:`b_j = \int_0^1 L_j(\tau)\,d\tau` with
:math:`\tau_j = (\tilde\sigma_{i-j} - \tilde\sigma_i)/(\tilde\sigma_{i+1} - \tilde\sigma_i)`,
identical to the fixed ones on a uniform grid and of full order ``order`` on any grid (DEIS's
:math:`\rho`AB-DEIS).

Example:
    >>> import jax, jaxdiff
    >>> edm = jaxdiff.EDM()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = edm.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(jaxdiff.samplers.ipndm(edm), target.denoiser(edm), x_T,
    ...                      jaxdiff.schedules.karras(edm, 10))
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

__all__ = ["IPNDM", "ipndm", "ipndm_step", "adams_bashforth_weights"]


class IPNDMState(NamedTuple):
    """Previous slopes, newest first.

    Attributes:
        eps_prev: ``(order - 1, *x.shape)`` slopes :math:`\\hat\\epsilon` at the previous times.
        sig_prev: ``(order - 1,)`` their noise levels :math:`\\tilde\\sigma`.
    """

    eps_prev: jax.Array
    sig_prev: jax.Array


def adams_bashforth_weights(sig_t, sig_s, sig_prev, q, variable_step: bool = False):
    r"""Weights :math:`b_0, \dots` of an Adams--Bashforth step of order ``q`` (traced).

    ``variable_step=False``: the nodes :math:`\tau_j = -j` of a uniform grid (iPNDM's fixed
    weights). ``True``: :math:`\tau_j = (\tilde\sigma_{i-j} - \tilde\sigma_i)/(\tilde\sigma_{i+1} -
    \tilde\sigma_i)`. Either way :math:`\sum_j b_j\tau_j^k = 1/(k+1)` for :math:`k < q`.
    """
    m = sig_prev.shape[0] + 1
    if not variable_step:  # constant weights: a table lookup, no per-step arithmetic
        return jnp.asarray(_AB_TABLE[m], jnp.result_type(sig_t))[q - 1]
    past = (sig_prev - sig_t) / (sig_s - sig_t)
    nodes = jnp.concatenate([jnp.zeros((1,), past.dtype), past])
    moments = 1.0 / jnp.arange(1, m + 1, dtype=nodes.dtype)
    return moment_weights(nodes, moments, q)


#: Adams--Bashforth weights of a uniform grid: ``_AB_TABLE[m][q - 1]`` holds order ``q``'s weights
#: padded with zeros to ``m`` entries (the rows 1, 3/2 -1/2, ... of the module docstring).
_AB_WEIGHTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)
_AB_TABLE = {m: np.array([w + (0.0,) * (m - len(w)) for w in _AB_WEIGHTS[:m]]) for m in range(1, 5)}


def ipndm_step(process: Process, x, x0, t, s, eps_prev, sig_prev, q, variable_step=False):
    r"""One iPNDM step from ``t`` to ``s`` of order ``q`` (see the module docstring).

    ``eps_prev``/``sig_prev`` hold the previous slopes and noise levels, newest first.
    Returns ``(x_s, eps)`` with :math:`\hat\epsilon = (x - \alpha_t\hat x_0)/\sigma_t`.
    """
    a_t, a_s = process.alpha(t), process.alpha(s)
    sig_t, sig_s = process.noise_level(t), process.noise_level(s)
    eps = process.eps_from_x0(x, x0, t)
    b = adams_bashforth_weights(sig_t, sig_s, sig_prev, q, variable_step)
    slope = b[0] * eps + weighted_sum(b[1:], eps_prev)
    return bcast(a_s, x) * (x / bcast(a_t, x) + bcast(sig_s - sig_t, x) * slope), eps


class IPNDM(Sampler):
    """iPNDM; built by :func:`ipndm`."""

    process: Process
    order: int = eqx.field(static=True, default=4)
    variable_step: bool = eqx.field(static=True, default=False)
    afs: bool = eqx.field(static=True, default=False)

    def init(self, x_T, ts):
        x_T, m = jnp.asarray(x_T), self.order - 1
        return IPNDMState(jnp.zeros((m, *x_T.shape), x_T.dtype), jnp.ones((m,), ts.dtype))

    def step(self, denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        x0, nfe = denoise_or_afs(self.afs, self.process, denoise, x, t, i)
        q = step_order(self.order, i, ts)
        x_s, eps = ipndm_step(
            self.process, x, x0, t, s, state.eps_prev, state.sig_prev, q, self.variable_step
        )
        sig_t = self.process.noise_level(t)
        return x_s, IPNDMState(push(state.eps_prev, eps), push(state.sig_prev, sig_t)), x0, nfe

    def nfe(self, n: int) -> int:
        return afs_nfe(super().nfe(n), self.afs, n)

    def split_first_step(self):
        return afs_split(self)

    @property
    def name(self) -> str:
        extra = (", variable_step" if self.variable_step else "") + (", afs" if self.afs else "")
        return f"ipndm(order={self.order}{extra})"


def ipndm(
    process: Process, order: int = 4, *, variable_step: bool = False, afs: bool = False
) -> IPNDM:
    r"""iPNDM of order 1 to 4 (Zhang & Chen 2023): Adams--Bashforth in :math:`(\tilde x, \tilde\sigma)`.

    One denoiser call per step; the first ``order - 1`` steps warm up at lower order. ``order=1``
    is Euler (= DDIM). ``variable_step=True`` uses the weights of the actual grid (see the module
    docstring) instead of iPNDM's fixed ones. ``afs=True`` replaces the first denoiser call by
    its analytic approximation (:func:`jaxdiff.samplers.dpm_solver.denoise_or_afs`), one
    evaluation fewer.

    Example:
        >>> sampler = jaxdiff.samplers.ipndm(jaxdiff.EDM(), order=4)  # doctest: +SKIP
    """
    return IPNDM(process, check_order("ipndm", order, (1, 2, 3, 4)), variable_step, bool(afs))
