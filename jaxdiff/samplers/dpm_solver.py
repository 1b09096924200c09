r"""DPM-Solver (singlestep, noise prediction) and DPM-Solver++ (multistep, data prediction).

Both are exponential integrators of the probability-flow ODE written in the half log-SNR
:math:`\ell_t = \log(\alpha_t/\sigma_t) = \lambda_t/2` (Lu et al. 2022, "DPM-Solver", Eq. 3.4;
Lu et al. 2022b, "DPM-Solver++", Eq. 9). From :math:`t` to :math:`s < t`, with
:math:`h = \ell_s - \ell_t > 0`, the exact solutions read

.. math::
    x_s = \frac{\alpha_s}{\alpha_t}x_t - \alpha_s\int_{\ell_t}^{\ell_s} e^{-\ell}\,
        \hat\epsilon(x_\ell, \ell)\,d\ell
    \quad\text{(noise form)},\qquad
    x_s = \frac{\sigma_s}{\sigma_t}x_t + \sigma_s\int_{\ell_t}^{\ell_s} e^{\ell}\,
        \hat x_0(x_\ell, \ell)\,d\ell
    \quad\text{(data form)},

where :math:`\hat\epsilon = (x - \alpha_t\hat x_0)/\sigma_t` and :math:`\hat x_0 = D(x, t)`.
Expanding :math:`\hat x_0` in a Taylor series around :math:`\ell_t` gives the data-form update

.. math::
    x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s\sum_{k\ge0} h^{k+1}\varphi_{k+1}(-h)\,
        \hat x_0^{(k)}(\ell_t),\qquad
    \varphi_k(z) = \sum_{j\ge0}\frac{z^j}{(j+k)!},

(:math:`h\varphi_1(-h) = 1 - e^{-h}`). Only :math:`\alpha`, :math:`\sigma`, :math:`\lambda` and
``process.t_from_log_snr`` are used, so every solver works for every process (VP, VE, EDM,
rectified flow, ...). First order, both forms are DDIM (Lu et al. 2022, Sec. 4.1).

All coefficients stay finite for every step size, so the solvers can be differentiated with respect
to the grid: :func:`phi` switches to its Taylor series near 0 through a ``jnp.where`` whose other
branch never sees a zero denominator, and the multistep history is replaced by safe placeholders
while a solver warms up.

Example:
    >>> import jax, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = vp.prior_sample((4, 2), key=jax.random.key(0))
    >>> ts = jaxdiff.schedules.log_snr_uniform(vp, 10)
    >>> res = jaxdiff.sample(jaxdiff.samplers.dpm_solver(vp, order=3), target.denoiser(vp), x_T, ts)
    >>> int(res.nfe)  # 3 per step, 1 for the final step into 0
    28
"""

import dataclasses
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._utils import bcast, is_concrete
from jaxdiff.processes import Process
from jaxdiff.samplers.base import EmptyState, Sampler, is_zero, step_noise

__all__ = [
    "DPMSolver",
    "DPMSolverPP",
    "DPMSolverPPSDE",
    "DPMSolverPPSinglestep",
    "MultistepState",
    "init_history",
    "push_history",
    "check_order",
    "dpm_solver",
    "dpm_solver_step",
    "dpm_solver_pp",
    "dpm_solver_pp_step",
    "dpm_solver_pp_coefficients",
    "dpm_solver_pp_apply",
    "DPMSolverPPCoefficients",
    "grid_history",
    "dpm_solver_pp_sde",
    "dpm_solver_pp_sde_step",
    "dpm_solver_pp_singlestep",
    "dpm_solver_pp_singlestep_step",
    "dpm_solver_pp_singlestep_coefficients",
    "dpm_solver_pp_singlestep_apply",
    "SinglestepCoefficients",
    "dpm_solver_embedded_step",
    "afs_x0",
    "denoise_or_afs",
    "afs_nfe",
    "afs_split",
    "phi",
    "half_log_snr",
    "moment_weights",
    "step_order",
]

#: Grids with fewer steps than this lower the order of the last steps when ``lower_order_final``
#: is set (the rule of diffusers' multistep schedulers; Lu et al. 2022b, Sec. 5, use 10).
LOWER_ORDER_FINAL_BELOW = 15

_PHI_SERIES_TERMS = 12
_PHI_SERIES_BELOW = 0.25


# --- shared helpers --------------------------------------------------------------------------
def half_log_snr(process: Process, t):
    r"""DPM-Solver's :math:`\ell_t = \log(\alpha_t/\sigma_t) = \lambda_t/2` (``lambda`` in Lu et al.)."""
    return 0.5 * process.log_snr(t)


def phi(k: int, z):
    r""":math:`\varphi_k(z) = \sum_{j\ge0} z^j/(j+k)!`, the exponential-integrator functions.

    :math:`\varphi_0 = e^z`, :math:`\varphi_1(z) = (e^z - 1)/z`,
    :math:`\varphi_{k+1}(z) = (\varphi_k(z) - 1/k!)/z`. Near 0 (:math:`|z| < 1/4`) the Taylor
    series (12 terms) replaces the recursion, whose cancellation grows like :math:`|z|^{-k}`; the
    recursion branch is evaluated at a safe nonzero point there, so gradients stay finite at
    :math:`z = 0`.
    """
    z = jnp.asarray(z)
    small = jnp.abs(z) < _PHI_SERIES_BELOW
    safe = jnp.where(small, _PHI_SERIES_BELOW, z)
    direct = jnp.expm1(safe) / safe
    for j in range(1, k):
        direct = (direct - 1.0 / math.factorial(j)) / safe
    series = jnp.zeros_like(z)
    for j in reversed(range(_PHI_SERIES_TERMS)):  # Horner
        series = series * z + 1.0 / math.factorial(j + k)
    return jnp.exp(z) if k == 0 else jnp.where(small, series, direct)


def check_order(name: str, order, allowed) -> int:
    """Raise a ``ValueError`` naming the allowed orders unless ``order`` is one of them."""
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(
            f"{name} has orders {', '.join(map(str, allowed))}; got order={order!r}. "
            f"Pass one of them, e.g. {name}(process, order={allowed[-1]})."
        )
    return int(order)


def step_order(order: int, i, ts, lower_order_final: bool = False):
    r"""Order used by a multistep solver at step ``i`` of the grid ``ts`` (traced).

    Warm-up: :math:`\min(\text{order}, i + 1)` (only ``i`` earlier outputs exist). With
    ``lower_order_final`` on a grid of fewer than :data:`LOWER_ORDER_FINAL_BELOW` steps, also at
    most :math:`K - i` where :math:`K` is the number of solver steps (the steps into ``ts[-2]``
    when the grid ends at 0; the engine's final denoising is not a solver step): the last solver
    step is first order, the one before it second order (Lu et al. 2022b, Sec. 5).
    """
    q = jnp.minimum(order, i + 1)
    n = ts.shape[0] - 1
    if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
        solver_steps = n - (ts[-1] == 0).astype(jnp.int32)
        q = jnp.minimum(q, solver_steps - i)
    return jnp.maximum(q, 1)


def moment_weights(nodes, moments, n_used):
    r"""Weights :math:`w` with :math:`\sum_{j<q} w_j\,\tau_j^k = m_k` for :math:`k < q`.

    The transposed Vandermonde system of a polynomial rule on the nodes :math:`\tau_j`, using only
    the first :math:`q` = ``n_used`` (traced) nodes; the other weights are 0. Solved in closed form:
    :math:`w_j = \sum_k c_{jk} m_k` with :math:`c_{jk}` the coefficients of the Lagrange basis
    polynomial :math:`L_j(\tau) = \prod_{l\ne j,\,l<q}(\tau - \tau_l)/(\tau_j - \tau_l)`
    (scalar arithmetic, cheap to compile). Unused nodes are replaced by distinct placeholders, so
    every branch stays finite and differentiable as long as the used nodes are distinct.
    """
    m = nodes.shape[0]
    used = jnp.arange(m) < n_used
    tau = jnp.where(used, nodes, 1e3 * (1.0 + jnp.arange(m, dtype=nodes.dtype)))
    weights = []
    for j in range(m):
        coef = [jnp.ones_like(tau[0])] + [jnp.zeros_like(tau[0])] * (m - 1)  # L_j as a polynomial
        for l in range(m):
            if l == j:
                continue
            scale = 1.0 / (tau[j] - tau[l])
            c0, c1 = jnp.where(used[l], -tau[l] * scale, 1.0), jnp.where(used[l], scale, 0.0)
            coef = [c0 * coef[0]] + [c0 * coef[k] + c1 * coef[k - 1] for k in range(1, m)]
        w = sum(coef[k] * moments[k] for k in range(m))
        weights.append(jnp.where(used[j], w, 0.0))
    return jnp.stack(weights)


def _coefficients(process: Process, t, s):
    """``alpha_t, sigma_t, alpha_s, sigma_s, h`` with :math:`h = \\ell_s - \\ell_t`."""
    return (
        process.alpha(t),
        process.sigma(t),
        process.alpha(s),
        process.sigma(s),
        half_log_snr(process, s) - half_log_snr(process, t),
    )


# --- singlestep DPM-Solver (noise prediction) ------------------------------------------------
DPMSolverState = EmptyState


def _eps(process, denoise, x, t):
    r"""Denoise and convert: :math:`(\hat x_0, \hat\epsilon = (x - \alpha_t\hat x_0)/\sigma_t)`."""
    x0 = denoise(x, t)
    return x0, process.eps_from_x0(x, x0, t)


def _intermediate(process, t, h, r):
    r"""The time :math:`u` with :math:`\ell_u = \ell_t + r h`, and its ``alpha, sigma``."""
    u = process.t_from_log_snr(2.0 * (half_log_snr(process, t) + r * h))
    return u, process.alpha(u), process.sigma(u)


def _first_order(x, eps, a_t, a_u, sig_u, rh):
    r""":math:`\frac{\alpha_u}{\alpha_t}x - \sigma_u(e^{rh} - 1)\hat\epsilon` (DPM-Solver-1 to ``u``)."""
    return bcast(a_u / a_t, x) * x - bcast(sig_u * jnp.expm1(rh), x) * eps


def dpm_solver_step(process: Process, denoise, x, t, s, order: int = 2):
    r"""One singlestep DPM-Solver step from ``t`` to ``s`` (Lu et al. 2022, Alg. 1 and 2).

    With :math:`h = \ell_s - \ell_t` and :math:`\hat\epsilon_t = \hat\epsilon(x, t)`:

    - order 1 (DDIM): :math:`x_s = \frac{\alpha_s}{\alpha_t}x - \sigma_s(e^h - 1)\hat\epsilon_t`;
    - order 2 (:math:`r_1 = 1/2`): :math:`u_1` = order 1 to :math:`\ell_t + r_1h`, then
      :math:`x_s = \frac{\alpha_s}{\alpha_t}x - \sigma_s(e^h - 1)\hat\epsilon_t
      - \frac{\sigma_s}{2r_1}(e^h - 1)(\hat\epsilon(u_1) - \hat\epsilon_t)`;
    - order 3 (:math:`r_1 = 1/3`, :math:`r_2 = 2/3`): :math:`D_1 = \hat\epsilon(u_1) -
      \hat\epsilon_t`, :math:`u_2 = \frac{\alpha_{s_2}}{\alpha_t}x - \sigma_{s_2}(e^{r_2h}-1)
      \hat\epsilon_t - \sigma_{s_2}\frac{r_2}{r_1}\left(\frac{e^{r_2h}-1}{r_2h} - 1\right)D_1`,
      :math:`D_2 = \hat\epsilon(u_2) - \hat\epsilon_t`, and
      :math:`x_s = \frac{\alpha_s}{\alpha_t}x - \sigma_s(e^h - 1)\hat\epsilon_t
      - \frac{\sigma_s}{r_2}\left(\frac{e^h - 1}{h} - 1\right)D_2`.

    ``order`` denoiser calls. Returns ``(x_s, x0_hat)`` with ``x0_hat = denoise(x, t)``.
    """
    check_order("dpm_solver_step", order, (1, 2, 3))
    a_t, _, a_s, sig_s, h = _coefficients(process, t, s)
    x0, eps = _eps(process, denoise, x, t)
    x_s = _first_order(x, eps, a_t, a_s, sig_s, h)
    if order == 2:
        r1 = 0.5
        u1, a_1, sig_1 = _intermediate(process, t, h, r1)
        d1 = _eps(process, denoise, _first_order(x, eps, a_t, a_1, sig_1, r1 * h), u1)[1] - eps
        x_s = x_s - bcast(sig_s * jnp.expm1(h) / (2.0 * r1), x) * d1
    elif order == 3:
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        u1, a_1, sig_1 = _intermediate(process, t, h, r1)
        d1 = _eps(process, denoise, _first_order(x, eps, a_t, a_1, sig_1, r1 * h), u1)[1] - eps
        u2, a_2, sig_2 = _intermediate(process, t, h, r2)
        c2 = sig_2 * (r2 / r1) * (phi(1, r2 * h) - 1.0)
        x_2 = _first_order(x, eps, a_t, a_2, sig_2, r2 * h) - bcast(c2, x) * d1
        d2 = _eps(process, denoise, x_2, u2)[1] - eps
        x_s = x_s - bcast(sig_s / r2 * (phi(1, h) - 1.0), x) * d2
    return x_s, x0


class DPMSolver(Sampler):
    """Singlestep DPM-Solver; built by :func:`dpm_solver`."""

    process: Process
    order: int = eqx.field(static=True, default=2)

    def init(self, x_T, ts):
        return EmptyState()

    def step(self, denoise, x, state, ts, i, key):
        x_s, x0 = dpm_solver_step(self.process, denoise, x, ts[i], ts[i + 1], self.order)
        return x_s, state, x0, self.order

    @property
    def nfe_per_step(self) -> int:
        return self.order

    @property
    def name(self) -> str:
        return f"dpm_solver(order={self.order})"


def dpm_solver(process: Process, order: int = 2) -> DPMSolver:
    r"""Singlestep DPM-Solver-``order`` in the noise form (Lu et al. 2022, Alg. 1 and 2).

    ``order`` denoiser calls per step (the engine's final step into 0 costs 1), global order
    ``order`` in the step size :math:`h`. ``order=1`` is DDIM. See :func:`dpm_solver_step`.

    Example:
        >>> sampler = jaxdiff.samplers.dpm_solver(jaxdiff.VP(), order=3)  # doctest: +SKIP
    """
    return DPMSolver(process, check_order("dpm_solver", order, (1, 2, 3)))


# --- multistep DPM-Solver++ (data prediction) ------------------------------------------------
class MultistepState(NamedTuple):
    """History of a multistep data-prediction solver, newest first.

    Attributes:
        x0_prev: ``(m, *x.shape)`` denoiser outputs at the ``m`` previous grid times.
        ell_prev: ``(m,)`` their half log-SNR :math:`\\ell`.
    """

    x0_prev: jax.Array
    ell_prev: jax.Array


def init_history(x_T, ts, m: int) -> MultistepState:
    """Empty history of ``m`` entries (filled as the solver goes; unread while warming up)."""
    x_T = jnp.asarray(x_T)
    return MultistepState(jnp.zeros((m, *x_T.shape), x_T.dtype), jnp.zeros((m,), ts.dtype))


def push(history, new):
    """Prepend ``new`` to the stacked ``history`` (newest first) and drop the oldest entry."""
    new = jnp.reshape(new, (1, *history.shape[1:])).astype(history.dtype)
    return jnp.concatenate([new, history[:-1]])


def push_history(state: MultistepState, x0, ell) -> MultistepState:
    """Prepend the newest ``(x0, ell)`` and drop the oldest entry."""
    return MultistepState(push(state.x0_prev, x0), push(state.ell_prev, ell))


def _gaps(ell_t, ell_prev, h, q):
    r"""Past log-SNR gaps :math:`h_0 = \ell_t - \ell_{-1}`, :math:`h_1 = \ell_{-1} - \ell_{-2}`.

    Gaps not yet available (order ``q`` too low) are replaced by ``h``, a safe nonzero value
    whose terms are switched off by the caller.
    """
    ells = jnp.concatenate([jnp.reshape(ell_t, (1,)), ell_prev])
    gaps = ells[:-1] - ells[1:]
    valid = jnp.arange(gaps.shape[0]) < q - 1
    return jnp.where(valid, gaps, h)


def dpm_solver_pp_step(process: Process, x, x0, t, s, x0_prev, ell_prev, q):
    r"""One multistep DPM-Solver++ step from ``t`` to ``s`` of order ``q`` (traced, 1 to 3).

    With :math:`h = \ell_s - \ell_t`, the outputs :math:`D_0 = \hat x_0(x, t)`,
    :math:`D_1, D_2` at the previous times and the gaps :math:`h_0 = \ell_t - \ell_{-1}`,
    :math:`h_1 = \ell_{-1} - \ell_{-2}`:

    - order 1 (DDIM): :math:`x_s = \frac{\sigma_s}{\sigma_t}x + \alpha_s(1 - e^{-h})D_0`;
    - order 2, DPM-Solver++(2M) exactly as Lu et al. (2022b, Alg. 2): :math:`D_0` replaced by
      :math:`(1 + \frac{1}{2r})D_0 - \frac{1}{2r}D_1`, :math:`r = h_0/h`;
    - order 3 (3M): the Taylor update of the module docstring with the quadratic through
      :math:`(\ell_{-2}, D_2), (\ell_{-1}, D_1), (\ell_t, D_0)`:
      :math:`x_s = \frac{\sigma_s}{\sigma_t}x + \alpha_s\left[h\varphi_1(-h)D_0 +
      h^2\varphi_2(-h)(f_{01} + h_0f_{012}) + 2h^3\varphi_3(-h)f_{012}\right]` with the divided
      differences :math:`f_{01} = (D_0 - D_1)/h_0`, :math:`f_{012} = (f_{01} - f_{12})/(h_0 + h_1)`.

    ``x0_prev``/``ell_prev`` hold the previous outputs newest first (at least ``order - 1``).
    """
    coef = dpm_solver_pp_coefficients(process, t, s, ell_prev, q)
    return dpm_solver_pp_apply(coef, x, x0, x0_prev)


class DPMSolverPPCoefficients(NamedTuple):
    r"""The numbers of one (SDE-)DPM-Solver++ step; they depend on the grid only.

    :math:`x_s = a\,x + g D_0 + c_2(D_0 - D_1)` and, at order 3, :math:`c_1(f_{01} + h_0f_{012}) +
    c_3f_{012}` with the divided differences over the gaps :math:`h_0, h_1`, plus ``noise_std``
    times the step's noise (:func:`dpm_solver_pp_step`, :func:`dpm_solver_pp_sde_step`).
    """

    x_scale: jax.Array
    gain: jax.Array
    c2: jax.Array
    gaps: jax.Array
    c1: jax.Array
    c3: jax.Array
    third: jax.Array
    noise_std: jax.Array


def dpm_solver_pp_coefficients(process: Process, t, s, ell_prev, q, eta=0.0):
    r"""The :class:`DPMSolverPPCoefficients` of a step ``t -> s`` of order ``q``, noise ``eta``.

    ``eta = 0`` (concrete) is the ODE solver's step; ``ell_prev`` the history's :math:`\ell`.
    """
    _, sig_t, a_s, sig_s, h = _coefficients(process, t, s)
    gaps = _gaps(half_log_snr(process, t), ell_prev, h, q)
    h_eta = (1.0 + eta) * h
    one_minus = -jnp.expm1(-h_eta)  # = h_eta phi_1(-h_eta)
    x_scale = sig_s / sig_t * jnp.exp(-eta * h)
    # order 2: the paper's extrapolation D_0 + (D_0 - D_1) / (2r), r = h_0 / h
    c2 = jnp.where(q == 2, a_s * one_minus * h / (2.0 * gaps[0]), 0.0)
    c1 = a_s * h * h_eta * phi(2, -h_eta)
    c3 = a_s * 2.0 * h**2 * h_eta * phi(3, -h_eta)
    noise_std = sig_s * _noise_std(eta, h)
    return DPMSolverPPCoefficients(x_scale, a_s * one_minus, c2, gaps, c1, c3, q == 3, noise_std)


def dpm_solver_pp_apply(coef: DPMSolverPPCoefficients, x, x0, x0_prev, noise=None):
    """The step of :func:`dpm_solver_pp_coefficients` applied to ``x`` and the outputs."""
    x_s = bcast(coef.x_scale, x) * x + bcast(coef.gain, x) * x0
    x_s = x_s + bcast(coef.c2, x) * (x0 - x0_prev[0])
    if x0_prev.shape[0] >= 2:  # order 3 is possible
        g0, g1 = coef.gaps[0], coef.gaps[1]
        f01 = (x0 - x0_prev[0]) / bcast(g0, x)
        f12 = (x0_prev[0] - x0_prev[1]) / bcast(g1, x)
        f012 = (f01 - f12) / bcast(g0 + g1, x)
        third = bcast(coef.c1, x) * (f01 + bcast(g0, x) * f012) + bcast(coef.c3, x) * f012
        x_s = x_s + jnp.where(coef.third, third, 0.0)
    if noise is None:
        return x_s
    return x_s + bcast(coef.noise_std, x) * noise


def grid_history(ts, i, m: int, fn, fill):
    """``fn(ts[i - 1 - k])`` for ``k < m``, newest first, ``fill`` where the grid has no such time.

    The history a multistep sampler has recorded by step ``i``, read off the grid: its
    ``coefficients`` need no state.
    """
    back = i - 1 - jnp.arange(m)
    return jnp.where(back >= 0, fn(ts[jnp.maximum(back, 0)]), fill)


def _multistep_coefficients(sampler, ts, i, eta=0.0):
    """``coefficients`` of the multistep (SDE-)DPM-Solver++ ``sampler`` at step ``i``."""
    p, order = sampler.process, sampler.order
    ell_prev = grid_history(ts, i, order - 1, lambda t: half_log_snr(p, t), 0.0)
    q = step_order(order, i, ts, sampler.lower_order_final)
    return dpm_solver_pp_coefficients(p, ts[i], ts[i + 1], ell_prev, q, eta)


class DPMSolverPP(Sampler):
    """Multistep DPM-Solver++; built by :func:`dpm_solver_pp`."""

    process: Process
    order: int = eqx.field(static=True, default=2)
    lower_order_final: bool = eqx.field(static=True, default=True)
    afs: bool = eqx.field(static=True, default=False)

    def init(self, x_T, ts):
        return init_history(x_T, ts, self.order - 1)

    def coefficients(self, ts, i):
        return _multistep_coefficients(self, ts, i)

    def step(self, denoise, x, state, ts, i, key, coef=None):
        if coef is None:
            coef = self.coefficients(ts, i)
        t = ts[i]
        x0, nfe = denoise_or_afs(self.afs, self.process, denoise, x, t, i)
        x_s = dpm_solver_pp_apply(coef, x, x0, state.x0_prev)
        return x_s, push_history(state, x0, half_log_snr(self.process, t)), x0, nfe

    def nfe(self, n: int) -> int:
        return afs_nfe(super().nfe(n), self.afs, n)

    def split_first_step(self):
        return afs_split(self)

    @property
    def name(self) -> str:
        return f"dpm_solver_pp(order={self.order}{', afs' if self.afs else ''})"


def dpm_solver_pp(
    process: Process, order: int = 2, *, lower_order_final: bool = True, afs: bool = False
) -> DPMSolverPP:
    r"""Multistep DPM-Solver++(``order``M) in the data form (Lu et al. 2022b, Alg. 2; 3M variant).

    One denoiser call per step: each step reuses the outputs of the ``order - 1`` previous steps
    (see :func:`dpm_solver_pp_step`). The first steps warm up at lower order. With
    ``lower_order_final`` (default) and a grid of fewer than 15 steps, the last solver step is
    first order and the one before it at most second order, which keeps few-step sampling stable
    near :math:`t_{min}` (Lu et al. 2022b, Sec. 5). ``afs=True`` replaces the first denoiser
    call by its analytic approximation (:func:`denoise_or_afs`), one evaluation fewer.

    Example:
        >>> sampler = jaxdiff.samplers.dpm_solver_pp(jaxdiff.EDM(), order=2)   # doctest: +SKIP
        >>> ts = jaxdiff.schedules.karras(jaxdiff.EDM(), 10)                  # doctest: +SKIP
        >>> jaxdiff.sample(sampler, denoise, x_T, ts)                         # doctest: +SKIP
    """
    order = check_order("dpm_solver_pp", order, (2, 3))
    return DPMSolverPP(process, order, lower_order_final, bool(afs))


# --- SDE-DPM-Solver++(2M, 3M) -----------------------------------------------------------------
def _noise_std(eta, h):
    r""":math:`\sqrt{1 - e^{-2\eta h}}`, 0 (with finite gradients) where :math:`\eta h = 0`."""
    var = -jnp.expm1(-2.0 * eta * h)
    return jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)


def dpm_solver_pp_sde_step(process: Process, x, x0, t, s, x0_prev, ell_prev, q, noise, eta=1.0):
    r"""One SDE-DPM-Solver++ step from ``t`` to ``s`` of order ``q`` (traced, 1 to 3), noise ``eta``.

    The reverse SDEs of noise scale :math:`\eta \ge 0` (k-diffusion's ``eta``; 0 is the
    probability-flow ODE, 1 the reverse SDE of Lu et al. 2022b, Sec. 4 and App. B) have in the
    data form the exact solution, with :math:`h = \ell_s - \ell_t` and :math:`h_\eta = (1+\eta)h`,

    .. math:: x_s = \frac{\sigma_s}{\sigma_t}e^{-\eta h}x_t + (1+\eta)\alpha_s
        \int_{\ell_t}^{\ell_s}e^{-(1+\eta)(\ell_s-\ell)}\hat x_0\,d\ell
        + \sigma_s\sqrt{1 - e^{-2\eta h}}\,z.

    Expanding :math:`\hat x_0` in a Taylor series around :math:`\ell_t`, the integral is
    :math:`\sum_k h^k h_\eta\varphi_{k+1}(-h_\eta)\hat x_0^{(k)}`; with the outputs
    :math:`D_0, D_1, D_2` and gaps :math:`h_0, h_1` of :func:`dpm_solver_pp_step`:

    - order 1: :math:`\alpha_s(1 - e^{-h_\eta})D_0`;
    - order 2 (2M, k-diffusion's ``sample_dpmpp_2m_sde`` with ``solver_type='midpoint'``):
      :math:`D_0` replaced by :math:`D_0 + \frac{1}{2r}(D_0 - D_1)`, :math:`r = h_0/h`;
    - order 3 (3M, k-diffusion's ``sample_dpmpp_3m_sde`` in :math:`\ell`):
      :math:`\alpha_s\left[(1 - e^{-h_\eta})D_0 + h\,h_\eta\varphi_2(-h_\eta)(f_{01} + h_0f_{012})
      + 2h^2h_\eta\varphi_3(-h_\eta)f_{012}\right]`. k-diffusion (like DPM-Solver's official 3M)
      carries half of the last (third-order Taylor) term; here it is the full term, so that
      ``eta = 0`` is exactly :func:`dpm_solver_pp_step`'s third-order step.

    ``eta = 1`` and order 2 is Lu et al.'s SDE-DPM-Solver++(2M). ``noise`` is a standard normal
    draw like ``x`` (zeros where ``eta = 0``).
    """
    coef = dpm_solver_pp_coefficients(process, t, s, ell_prev, q, eta)
    return dpm_solver_pp_apply(coef, x, x0, x0_prev, noise)


class DPMSolverPPSDE(Sampler):
    """SDE-DPM-Solver++(2M or 3M) of noise scale ``eta``; built by :func:`dpm_solver_pp_sde`."""

    process: Process
    lower_order_final: bool = eqx.field(static=True, default=True)
    order: int = eqx.field(static=True, default=2)
    eta: float = 1.0

    def init(self, x_T, ts):
        return init_history(x_T, ts, self.order - 1)

    def coefficients(self, ts, i):
        return _multistep_coefficients(self, ts, i, self.eta)

    def step(self, denoise, x, state, ts, i, key, coef=None):
        if coef is None:
            coef = self.coefficients(ts, i)
        t = ts[i]
        x0 = denoise(x, t)
        if is_zero(self.eta):  # a concrete 0: no noise drawn at all
            x_s = dpm_solver_pp_apply(coef, x, x0, state.x0_prev)
        else:
            noise = step_noise(key, x, self.eta > 0)
            x_s = dpm_solver_pp_apply(coef, x, x0, state.x0_prev, noise)
        return x_s, push_history(state, x0, half_log_snr(self.process, t)), x0, 1

    @property
    def noise_scale(self):
        return self.eta

    @property
    def name(self) -> str:
        if self.order == 2 and is_concrete(self.eta) and self.eta == 1.0:
            return "dpm_solver_pp_sde"
        return f"dpm_solver_pp_sde(order={self.order}, eta={self.eta})"


def dpm_solver_pp_sde(
    process: Process, order: int = 2, *, eta: float = 1.0, lower_order_final: bool = True
) -> DPMSolverPPSDE:
    r"""SDE-DPM-Solver++(2M) and (3M) (Lu et al. 2022b; k-diffusion's ``dpmpp_2m_sde``/``3m_sde``).

    One denoiser call per step. ``eta`` scales the noise (traced: a new value never recompiles):
    ``eta = 1`` (default) samples the data distribution through the reverse SDE and needs a
    ``key``; ``eta = 0`` is exactly :func:`dpm_solver_pp` of the same order (the
    probability-flow ODE, no noise drawn). See :func:`dpm_solver_pp_sde_step`;
    ``lower_order_final`` as in :func:`dpm_solver_pp`. ``dpm_solver_pp_sde(process)`` is
    SDE-DPM-Solver++(2M) with ``eta = 1``.

    Example:
        >>> import jaxdiff
        >>> jaxdiff.samplers.dpm_solver_pp_sde(jaxdiff.VP(), 3, eta=0.5).name
        'dpm_solver_pp_sde(order=3, eta=0.5)'
    """
    order = check_order("dpm_solver_pp_sde", order, (2, 3))
    if is_concrete(eta) and not eta >= 0:
        raise ValueError(f"eta must be non-negative, got {eta}; 0 gives dpm_solver_pp.")
    return DPMSolverPPSDE(
        process, lower_order_final, order, float(eta) if is_concrete(eta) else eta
    )


# --- singlestep DPM-Solver++ (data prediction) -----------------------------------------------
DPMSolverPPSinglestepState = EmptyState


def dpm_solver_pp_singlestep_step(process: Process, denoise, x, t, s, order: int = 2):
    r"""One singlestep DPM-Solver++ step from ``t`` to ``s`` (Lu et al. 2022b, Alg. 1 and App. A).

    The data-form counterpart of :func:`dpm_solver_step`. With :math:`h = \ell_s - \ell_t`,
    :math:`D_0 = \hat x_0(x, t)` and :math:`u_k` the time with :math:`\ell_{u_k} = \ell_t + r_kh`:

    - order 2, DPM-Solver++(2S) (:math:`r_1 = 1/2`): :math:`x_{u_1} = \frac{\sigma_{u_1}}
      {\sigma_t}x + \alpha_{u_1}(1 - e^{-r_1h})D_0`, :math:`D_1 = \hat x_0(x_{u_1}, u_1)`, and
      :math:`x_s = \frac{\sigma_s}{\sigma_t}x + \alpha_s(1 - e^{-h})\left(D_0 +
      \frac{1}{2r_1}(D_1 - D_0)\right)`;
    - order 3, DPM-Solver++(3S) (:math:`r_1 = 1/3`, :math:`r_2 = 2/3`): :math:`x_{u_1}` as above,
      :math:`x_{u_2} = \frac{\sigma_{u_2}}{\sigma_t}x + \alpha_{u_2}(1 - e^{-r_2h})D_0 +
      \frac{r_2}{r_1}\alpha_{u_2}r_2h\varphi_2(-r_2h)(D_1 - D_0)`, :math:`D_2 =
      \hat x_0(x_{u_2}, u_2)`, and :math:`x_s = \frac{\sigma_s}{\sigma_t}x + \alpha_s(1 -
      e^{-h})D_0 + \frac{\alpha_s}{r_2}h\varphi_2(-h)(D_2 - D_0)`.

    ``order`` denoiser calls. Returns ``(x_s, x0_hat)`` with ``x0_hat = denoise(x, t)``.
    """
    check_order("dpm_solver_pp_singlestep_step", order, (1, 2, 3))
    coef = dpm_solver_pp_singlestep_coefficients(process, t, s, order)
    return dpm_solver_pp_singlestep_apply(coef, denoise, x, order)


class SinglestepCoefficients(NamedTuple):
    r"""The times and weights of one singlestep DPM-Solver++ step (they depend on the grid only).

    ``times``: ``(t, u_1[, u_2])``. ``weights[k]``: the point ``k`` (0: ``s``, then ``u_1``,
    ``u_2``) as :math:`w_{k0}x + w_{k1}D_0 + w_{k2}D'`, with :math:`D'` the newest other output
    (:math:`D_1` into ``u_2``; into ``s`` :math:`D_1` at order 2, :math:`D_2` at order 3): the
    formulas of :func:`dpm_solver_pp_singlestep_step` with their :math:`D_0` terms collected.
    """

    times: jax.Array
    weights: jax.Array


def dpm_solver_pp_singlestep_coefficients(process: Process, t, s, order: int):
    """The :class:`SinglestepCoefficients` of :func:`dpm_solver_pp_singlestep_step`."""
    _, sig_t, a_s, sig_s, h = _coefficients(process, t, s)
    zero = jnp.zeros_like(h)
    gain = -a_s * jnp.expm1(-h)
    if order == 1:
        return SinglestepCoefficients(
            jnp.stack([t]), jnp.stack([jnp.stack([sig_s / sig_t, gain, zero])])
        )
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    u1, a_1, sig_1 = _intermediate(process, t, h, r1)
    to_u1 = jnp.stack([sig_1 / sig_t, -a_1 * jnp.expm1(-r1 * h), zero])
    if order == 2:
        # D_0 + (D_1 - D_0) / (2 r_1) with r_1 = 1/2 is D_1 (Lu et al. 2022b, Alg. 1): D_0 drops
        # out of the update, and need not be kept across the second call
        to_s = jnp.stack([sig_s / sig_t, zero, gain / (2.0 * r1)])
        return SinglestepCoefficients(jnp.stack([t, u1]), jnp.stack([to_s, to_u1]))
    r2 = 2.0 / 3.0
    u2, a_2, sig_2 = _intermediate(process, t, h, r2)
    m0 = a_2 * (r2 / r1) * r2 * h * phi(2, -r2 * h)  # of D_1 - D_0 into u_2
    m1 = a_s / r2 * h * phi(2, -h)  # of D_2 - D_0 into s
    to_u2 = jnp.stack([sig_2 / sig_t, -a_2 * jnp.expm1(-r2 * h) - m0, m0])
    to_s = jnp.stack([sig_s / sig_t, gain - m1, m1])
    return SinglestepCoefficients(jnp.stack([t, u1, u2]), jnp.stack([to_s, to_u1, to_u2]))


def dpm_solver_pp_singlestep_apply(coef: SinglestepCoefficients, denoise, x, order: int):
    """The step of :func:`dpm_solver_pp_singlestep_coefficients`: ``(x_s, x0_hat)``."""
    times, w = coef

    def point(k, x0, other=None):  # w_k0 x + w_k1 D_0 [+ w_k2 D']
        out = bcast(w[k, 0], x) * x + bcast(w[k, 1], x) * x0
        return out if other is None else out + bcast(w[k, 2], x) * other

    x0 = denoise(x, times[0])
    if order == 1:
        return point(0, x0), x0
    d1 = denoise(point(1, x0), times[1])
    if order == 2:
        return bcast(w[0, 0], x) * x + bcast(w[0, 2], x) * d1, x0
    d2 = denoise(point(2, x0, d1), times[2])
    return point(0, x0, d2), x0


class DPMSolverPPSinglestep(Sampler):
    """Singlestep DPM-Solver++; built by :func:`dpm_solver_pp_singlestep`."""

    process: Process
    order: int = eqx.field(static=True, default=2)

    def init(self, x_T, ts):
        return EmptyState()

    def coefficients(self, ts, i):
        return dpm_solver_pp_singlestep_coefficients(self.process, ts[i], ts[i + 1], self.order)

    def step(self, denoise, x, state, ts, i, key, coef=None):
        if coef is None:
            coef = self.coefficients(ts, i)
        x_s, x0 = dpm_solver_pp_singlestep_apply(coef, denoise, x, self.order)
        return x_s, state, x0, self.order

    @property
    def nfe_per_step(self) -> int:
        return self.order

    @property
    def name(self) -> str:
        return f"dpm_solver_pp_singlestep(order={self.order})"


def dpm_solver_pp_singlestep(process: Process, order: int = 2) -> DPMSolverPPSinglestep:
    r"""Singlestep DPM-Solver++(2S) or (3S) in the data form (Lu et al. 2022b, Alg. 1; App. A).

    ``order`` denoiser calls per step (the engine's final step into 0 costs 1), global order
    ``order``. ``ancestral(dpm_solver_pp_singlestep(p, 2))`` is k-diffusion's DPM++ 2S ancestral.
    See :func:`dpm_solver_pp_singlestep_step`.

    Example:
        >>> import jaxdiff
        >>> jaxdiff.samplers.dpm_solver_pp_singlestep(jaxdiff.EDM(), order=3).nfe(5)
        13
    """
    return DPMSolverPPSinglestep(process, check_order("dpm_solver_pp_singlestep", order, (2, 3)))


# --- embedded pairs of the adaptive DPM-Solver -----------------------------------------------
def dpm_solver_embedded_step(process: Process, x, x0, eps, t, s, order: int, denoise):
    r"""The embedded pair of the adaptive DPM-Solver (Lu et al. 2022, Sec. 3.3 and Alg. 4-5).

    From ``(x, t)`` to ``s`` given ``x0``, ``eps`` = the denoiser's output at ``(x, t)`` and
    its :math:`\hat\epsilon`: ``order=2`` pairs DPM-Solver-1 with DPM-Solver-2
    (:math:`r_1 = 1/2`), ``order=3`` pairs DPM-Solver-2 with :math:`r_1 = 1/3` and DPM-Solver-3,
    which shares its evaluation at :math:`u_1` (the rules of :func:`dpm_solver_step`). Returns
    ``(x_low, x_high)``, after ``order - 1`` denoiser calls (the one at ``t`` is given).
    """
    a_t, _, a_s, sig_s, h = _coefficients(process, t, s)
    x_1 = _first_order(x, eps, a_t, a_s, sig_s, h)  # DPM-Solver-1 (DDIM)
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    u1, a_1, sig_1 = _intermediate(process, t, h, r1)
    d1 = _eps(process, denoise, _first_order(x, eps, a_t, a_1, sig_1, r1 * h), u1)[1] - eps
    x_2 = x_1 - bcast(sig_s * jnp.expm1(h) / (2.0 * r1), x) * d1  # DPM-Solver-2 with r_1
    if order == 2:
        return x_1, x_2
    r2 = 2.0 / 3.0
    u2, a_2, sig_2 = _intermediate(process, t, h, r2)
    c2 = sig_2 * (r2 / r1) * (phi(1, r2 * h) - 1.0)
    x_u2 = _first_order(x, eps, a_t, a_2, sig_2, r2 * h) - bcast(c2, x) * d1
    d2 = _eps(process, denoise, x_u2, u2)[1] - eps
    x_3 = x_1 - bcast(sig_s / r2 * (phi(1, h) - 1.0), x) * d2  # DPM-Solver-3
    return x_2, x_3


# --- analytical first step (AFS) of the multistep samplers -----------------------------------
def afs_x0(process: Process, x, t):
    r"""diff-sampler's analytical first step: :math:`\hat x_0` at ``(x, t)`` without a network.

    Zhou et al. 2024 ("Fast ODE-based Sampling for Diffusion Models in Around 5 Steps", Sec. 4.2,
    AFS): at the prior the noise is nearly all of :math:`x`, so the first slope is taken as
    :math:`\hat\epsilon = \tilde x/\sqrt{1 + \tilde\sigma^2} = x/\sqrt{\alpha_t^2 + \sigma_t^2}`
    (the standardized :math:`x` of data with unit variance), and
    :math:`\hat x_0 = (x - \sigma_t\hat\epsilon)/\alpha_t`.
    """
    a, sig = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    return process.x0_from_eps(x, x / jnp.sqrt(a**2 + sig**2), t)


def denoise_or_afs(afs: bool, process: Process, denoise, x, t, i):
    r"""``(x0_hat, nfe)`` at ``(x, t)``: the denoiser's output, or with ``afs`` at step ``i = 0``
    :func:`afs_x0` (no denoiser call, ``nfe`` 0).

    AFS saves one evaluation of a multistep sampler's budget, spent on one more grid step. It
    helps where the grid starts at a large noise level (:math:`\tilde\sigma(t_0) \gg` the data's
    scale, e.g. EDM's 80, VP's 150) and the budget is small, the regime of Zhou et al. (2024);
    from a low noise level (SDEdit-like starts) its approximation is poor. Measured on a 16-d,
    8-component mixture (EDM, Karras grids, RMS against the exact ODE endpoint, equal NFE): AFS
    lowered the error of ``dpm_solver_pp(2)``, ``ipndm``, ``unipc``, ``deis`` and ``lms`` at NFE
    4, 6, 8 and 10 (iPNDM at NFE 10: 0.65 -> 0.52; DPM-Solver++(2M): 0.97 -> 0.80), but not at
    NFE 5, where the shifted Karras grid happened to suit the plain samplers better.
    """
    if not afs:
        return denoise(x, t), 1
    dtype = jax.eval_shape(denoise, x, t).dtype
    first = i == 0
    x0 = jax.lax.cond(
        first, lambda: afs_x0(process, x, t).astype(dtype), lambda: denoise(x, t).astype(dtype)
    )
    return x0, jnp.where(first, 0, 1)


def afs_split(sampler):
    """:meth:`Sampler.split_first_step` of a sampler with an ``afs`` field: with ``afs=True``,
    :func:`afs_x0` for the first step and the same sampler with ``afs=False`` for the others
    (the engine then tests for the first step once, not in every step of its loop)."""
    if not sampler.afs:
        return None
    process = sampler.process

    def first_denoise(x, t):
        return afs_x0(process, x, t).astype(x.dtype)

    return first_denoise, dataclasses.replace(sampler, afs=False)


def afs_nfe(nfe: int, afs: bool, n: int) -> int:
    """The NFE of ``n`` grid steps, less the one AFS saves (a grid of ``n >= 2`` steps)."""
    return nfe - int(bool(afs) and n >= 2)
