r"""LMS: k-diffusion's linear multistep sampler, with its coefficients in closed form.

A linear multistep (Adams--Bashforth) method on the probability-flow ODE in EDM's variables
(Karras et al. 2022): the scaled state :math:`\tilde x = x/\alpha_t` and the noise level
:math:`\tilde\sigma = \sigma_t/\alpha_t`, where :math:`d\tilde x/d\tilde\sigma = \hat\epsilon`.
With the slopes :math:`\hat\epsilon_{i-j}` at the last :math:`q` noise levels
:math:`\tilde\sigma_{i-j}`,

.. math::
    \tilde x_{i+1} = \tilde x_i + \sum_{j=0}^{q-1} b_j\,\hat\epsilon_{i-j},\qquad
    b_j = \int_{\tilde\sigma_i}^{\tilde\sigma_{i+1}} \ell_j(\sigma)\,d\sigma,\qquad
    \ell_j(\sigma) = \prod_{k\ne j,\,k<q}\frac{\sigma - \tilde\sigma_{i-k}}
        {\tilde\sigma_{i-j} - \tilde\sigma_{i-k}},

the integral of each Lagrange basis polynomial over the step (k-diffusion's ``sample_lms`` and
``linear_multistep_coeff``; Crowson 2022, after the PLMS of Liu et al. 2022). k-diffusion
integrates every :math:`\ell_j` numerically on the host at each step (``scipy.integrate.quad``);
here the integral is exact, in the scan: with :math:`\tau = (\sigma - \tilde\sigma_i)/
(\tilde\sigma_{i+1} - \tilde\sigma_i)`, :math:`b_j = (\tilde\sigma_{i+1} - \tilde\sigma_i)
\sum_k c_{jk}/(k+1)` from the coefficients :math:`c_{jk}` of :math:`\ell_j` in :math:`\tau`
(:func:`jaxdiff.samplers.ipndm.adams_bashforth_weights` with ``variable_step=True``; LMS is
``ipndm(variable_step=True)``, DEIS's :math:`\rho`AB, under its own name). Global order ``order``
on any grid; the first ``order - 1`` steps warm up at lower order, as in k-diffusion. One denoiser
call per step. A grid ending at 0 ends with the denoiser's output (the engine's final step),
where k-diffusion takes one more multistep step to :math:`\sigma = 0`.

Example:
    >>> import jax, jaxdiff
    >>> edm = jaxdiff.EDM()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = edm.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(jaxdiff.samplers.lms(edm), target.denoiser(edm), x_T,
    ...                      jaxdiff.schedules.karras(edm, 10))
    >>> int(res.nfe)
    10
"""

import equinox as eqx
import jax.numpy as jnp

from jaxdiff.processes import Process
from jaxdiff.samplers.base import Sampler
from jaxdiff.samplers.dpm_solver import (
    afs_nfe,
    afs_split,
    check_order,
    denoise_or_afs,
    push,
    step_order,
)
from jaxdiff.samplers.ipndm import IPNDMState, ipndm_step

__all__ = ["LMS", "lms"]

#: Previous slopes and noise levels, newest first (the state of iPNDM).
LMSState = IPNDMState


class LMS(Sampler):
    """Linear multistep in :math:`(\\tilde x, \\tilde\\sigma)`; built by :func:`lms`."""

    process: Process
    order: int = eqx.field(static=True, default=4)
    afs: bool = eqx.field(static=True, default=False)

    def init(self, x_T, ts):
        x_T, m = jnp.asarray(x_T), self.order - 1
        return LMSState(jnp.zeros((m, *x_T.shape), x_T.dtype), jnp.ones((m,), ts.dtype))

    def step(self, denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        x0, nfe = denoise_or_afs(self.afs, self.process, denoise, x, t, i)
        q = step_order(self.order, i, ts)
        x_s, eps = ipndm_step(self.process, x, x0, t, s, state.eps_prev, state.sig_prev, q, True)
        if self.order > 1:  # order 1 keeps no history
            sig_t = self.process.noise_level(t)
            state = LMSState(push(state.eps_prev, eps), push(state.sig_prev, sig_t))
        return x_s, state, x0, nfe

    def nfe(self, n: int) -> int:
        return afs_nfe(super().nfe(n), self.afs, n)

    def split_first_step(self):
        return afs_split(self)

    @property
    def name(self) -> str:
        return f"lms(order={self.order}{', afs' if self.afs else ''})"


def lms(process: Process, order: int = 4, *, afs: bool = False) -> LMS:
    r"""k-diffusion's LMS sampler of order 1 to 4, with exact coefficients (module docstring).

    One denoiser call per step; ``order=1`` is Euler (= DDIM). ``afs=True`` replaces the first
    denoiser call by its analytic approximation
    (:func:`jaxdiff.samplers.dpm_solver.denoise_or_afs`), one evaluation fewer.

    Example:
        >>> import jaxdiff
        >>> jaxdiff.samplers.lms(jaxdiff.EDM(), order=4, afs=True).nfe(10)
        9
    """
    return LMS(process, check_order("lms", order, (1, 2, 3, 4)), bool(afs))
