r"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): the UniP-p predictor and the UniC corrector, in the data-prediction form.

In the half log-SNR :math:`\ell = \lambda/2` with :math:`h = \ell_s - \ell_t > 0`, both are

.. math::
    x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s(1 - e^{-h})\,\hat x_0(t)
        + \alpha_s B(h)\sum_m a_m\,\frac{D_m - \hat x_0(t)}{r_m},
    \qquad r_m = \frac{\ell_m - \ell_t}{h},

where :math:`D_m` is the denoiser output at log-SNR :math:`\ell_m` and the weights solve
:math:`\sum_m a_m r_m^{k-1} = k!\,h\varphi_{k+1}(-h)/B(h)`, :math:`k = 1, \dots` (one equation
per node; Zhao et al. 2023, Thm. 3.1, in the data form of their App. D). This matches the Taylor
expansion :math:`x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s\sum_k h^{k+1}\varphi_{k+1}(-h)
\hat x_0^{(k)}` term by term.

- **UniP-p** (predictor, order ``p``): nodes at the ``p - 1`` previous grid times.
- **UniC** (corrector, raises the order by one): after the predictor reached :math:`x_s` and the
  denoiser was evaluated there (the evaluation the next step needs anyway), the same step is
  redone with that new output as one more node (:math:`r = 1`). The next predictor starts from the
  corrected point but reuses the evaluation at the uncorrected one, so UniC costs no extra
  evaluation. The last step is not corrected (that would need one more evaluation).

:math:`B(h)` is **bh2**: :math:`B(h) = 1 - e^{-h} = h\varphi_1(-h)`, the data-form counterpart of
Zhao et al.'s :math:`B_2(h) = e^h - 1` (and the default of diffusers' UniPC scheduler); the paper
suggests it for guided sampling and :math:`B_1(h) = h` ("bh1") for unconditional sampling at very
few steps. Both give the same order; only the constants differ.

Example:
    >>> import jax, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = vp.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(jaxdiff.samplers.unipc(vp), target.denoiser(vp), x_T,
    ...                      jaxdiff.schedules.log_snr_uniform(vp, 10))
    >>> int(res.nfe)
    10
"""

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._utils import bcast, weighted_sum
from jaxdiff.processes import Process
from jaxdiff.samplers.base import Sampler
from jaxdiff.samplers.dpm_solver import (
    afs_nfe,
    afs_split,
    check_order,
    denoise_or_afs,
    grid_history,
    half_log_snr,
    moment_weights,
    phi,
    push,
    step_order,
)

__all__ = ["UniPC", "unipc", "unipc_update", "unipc_coefficients"]


class UniPCState(NamedTuple):
    """History of UniPC, newest first.

    Attributes:
        x_prev: the (corrected) point at the previous grid time, base of the corrector.
        x0_prev: ``(order, *x.shape)`` denoiser outputs at the previous grid times (their times
            are the grid's: :meth:`UniPC.coefficients` reads them off ``ts``).
    """

    x_prev: jax.Array
    x0_prev: jax.Array


class UniPCCoefficients(NamedTuple):
    r"""The numbers of one UniPC update, its terms collected (they depend on the grid only).

    :math:`x_s = \frac{\sigma_s}{\sigma_t}x + \alpha_sB(h)\big[\hat x_0 + \sum_m \frac{a_m}{r_m}
    (D_m - \hat x_0)\big]` written as ``sig_ratio * x + base * x0 + sum_m weights[m] * D_m``.

    Attributes:
        sig_ratio: :math:`\sigma_s/\sigma_t`.
        base: the weight of :math:`\hat x_0(t)`, :math:`\alpha_sB(h)(1 - \sum_m a_m/r_m)`.
        weights: ``(m,)`` :math:`\alpha_sB(h)\,a_m/r_m`, the weights of the nodes' outputs (0
            for unused nodes).
    """

    sig_ratio: jax.Array
    base: jax.Array
    weights: jax.Array


def unipc_coefficients(process: Process, t, s, nodes_ell, n_used) -> UniPCCoefficients:
    r"""The coefficients of :func:`unipc_update` from ``t`` to ``s`` with the nodes' :math:`\ell`."""
    ell_t = half_log_snr(process, t)
    h = half_log_snr(process, s) - ell_t
    m = nodes_ell.shape[0]
    one_minus = -jnp.expm1(-h)  # = B(h)
    sig_ratio = process.sigma(s) / process.sigma(t)
    gain = process.alpha(s) * one_minus
    if m == 0:  # no node: the first-order (DDIM) step
        return UniPCCoefficients(sig_ratio, gain, jnp.zeros((0,), h.dtype))
    used = jnp.arange(m) < n_used
    r = jnp.where(used, (nodes_ell - ell_t) / h, 1.0)
    fact = jnp.asarray([math.factorial(k) for k in range(1, m + 1)], h.dtype)
    b = fact * jnp.stack([phi(k + 1, -h) for k in range(1, m + 1)]) / phi(1, -h)  # k!h phi/B
    w = moment_weights(r, b, n_used) / r
    return UniPCCoefficients(sig_ratio, gain * (1.0 - jnp.sum(w)), gain * w)


def _apply(c: UniPCCoefficients, x, x0, nodes_x0):
    """The update of :func:`unipc_update` with its coefficients known.

    ``nodes_x0`` is a stacked array or a sequence of arrays (no stacking: one fused pass).
    """
    return bcast(c.sig_ratio, x) * x + bcast(c.base, x) * x0 + weighted_sum(c.weights, nodes_x0)


def unipc_update(process: Process, x, x0, t, s, nodes_x0, nodes_ell, n_used):
    r"""The UniPC update from ``(x, t)`` to ``s`` (module docstring) with B(h) = 1 - e^{-h}.

    ``x0`` is the denoiser output at ``(x, t)``; ``nodes_x0``/``nodes_ell`` hold the other outputs
    and their :math:`\ell`, of which the first ``n_used`` (traced) are used. Returns ``x_s``.
    """
    return _apply(unipc_coefficients(process, t, s, nodes_ell, n_used), x, x0, nodes_x0)


class UniPCStepCoefficients(NamedTuple):
    """The numbers of one UniPC step: its predictor and the corrector of the step before."""

    predictor: UniPCCoefficients
    corrector: UniPCCoefficients


class UniPC(Sampler):
    """UniPC (UniP predictor, UniC corrector); built by :func:`unipc`."""

    process: Process
    order: int = eqx.field(static=True, default=2)
    lower_order_final: bool = eqx.field(static=True, default=True)
    afs: bool = eqx.field(static=True, default=False)

    def init(self, x_T, ts):
        x_T, m = jnp.asarray(x_T), self.order
        zeros = jnp.zeros((m, *x_T.shape), x_T.dtype)
        return UniPCState(jnp.zeros_like(x_T), zeros)

    def coefficients(self, ts, i):
        r"""The predictor ``ts[i] -> ts[i + 1]`` and the corrector of ``ts[i - 1] -> ts[i]``.

        The nodes are the grid's own earlier times (the history's :math:`\ell`); at ``i = 0``
        the corrector is a dummy step with no node, unused.
        """
        p, m = self.process, self.order
        ell_prev = grid_history(ts, i, m, lambda t: half_log_snr(p, t), 0.0)
        q = step_order(m, i, ts, self.lower_order_final)
        j = jnp.maximum(i - 1, 0)
        nodes_ell = ell_prev.at[0].set(half_log_snr(p, ts[i]))
        n_used = jnp.where(i >= 1, step_order(m, j, ts, self.lower_order_final), 0)
        # predictor and corrector as one batch of two: half the small kernels of two solves
        both = jax.vmap(lambda t, s, nodes, used: unipc_coefficients(p, t, s, nodes, used))(
            jnp.stack([ts[i], ts[j]]),
            jnp.stack([ts[i + 1], ts[j + 1]]),
            jnp.stack([ell_prev, nodes_ell]),
            jnp.stack([q - 1, n_used]),
        )
        predictor, corrector = (jax.tree_util.tree_map(lambda c, k=k: c[k], both) for k in (0, 1))
        return UniPCStepCoefficients(predictor, corrector)

    def step(self, denoise, x, state, ts, i, key, coef=None):
        if coef is None:
            coef = self.coefficients(ts, i)
        x0, nfe = denoise_or_afs(self.afs, self.process, denoise, x, ts[i], i)
        # UniC for the step ts[i - 1] -> ts[i], with the new output x0 at ts[i] as one more node
        nodes_x0 = [x0.astype(state.x0_prev.dtype), *state.x0_prev[1:]]
        x_c = _apply(coef.corrector, state.x_prev, state.x0_prev[0], nodes_x0)
        x = jnp.where(i >= 1, x_c, x).astype(state.x_prev.dtype)
        x_s = _apply(coef.predictor, x, x0, state.x0_prev)
        return x_s, UniPCState(x, push(state.x0_prev, x0)), x0, nfe

    def nfe(self, n: int) -> int:
        return afs_nfe(super().nfe(n), self.afs, n)

    def split_first_step(self):
        return afs_split(self)

    @property
    def name(self) -> str:
        return f"unipc(order={self.order}{', afs' if self.afs else ''})"


def unipc(
    process: Process, order: int = 2, *, lower_order_final: bool = True, afs: bool = False
) -> UniPC:
    r"""UniPC with predictor UniP-``order`` and corrector UniC (bh2), 1 denoiser call per step.

    Orders 1 to 3: UniP-p has order p, and UniC raises the order of every corrected step by one
    (Zhao et al. 2023, Thm. 3.2), so the global order is ``order + 1`` in theory (measured in
    ``tests/test_convergence.py``). The first steps warm up at lower order; ``lower_order_final``
    as in :func:`jaxdiff.samplers.dpm_solver_pp`. ``afs=True`` replaces the first denoiser call
    by its analytic approximation (:func:`jaxdiff.samplers.dpm_solver.denoise_or_afs`), one
    evaluation fewer.

    Example:
        >>> sampler = jaxdiff.samplers.unipc(jaxdiff.VP(), order=2)  # doctest: +SKIP
    """
    return UniPC(process, check_order("unipc", order, (1, 2, 3)), lower_order_final, bool(afs))
