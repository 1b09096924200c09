r"""The adaptive DPM-Solver (Lu et al. 2022, "DPM-Solver", Sec. 3.3 and App. C, Alg. 4 and 5;
k-diffusion's ``sample_dpm_adaptive``): error-controlled steps in the half log-SNR.

Each step of size :math:`h` in :math:`\ell = \lambda/2` from :math:`(x, s)` computes an embedded
pair sharing its evaluations (:func:`jaxdiff.samplers.dpm_solver.dpm_solver_embedded_step`):
DPM-Solver-1 and -2 for ``order=2`` (2 NFE), DPM-Solver-2 (:math:`r_1 = 1/3`) and -3 for
``order=3`` (3 NFE), and the scaled error

.. math::
    E = \max_{\text{rows}}\ \left\|\frac{x_{high} - x_{low}}{\delta}\right\|_{RMS},\qquad
    \delta = \max\left(\epsilon_{atol},\ \epsilon_{rtol}\max(|x_{low}|, |x_{prev}|)\right),

with :math:`x_{prev}` the lower-order solution of the last accepted step. The step is accepted
when :math:`E \le 1` (then :math:`x \leftarrow x_{high}`), and the next step size is
:math:`h \leftarrow \min(\theta h E^{-1/k}, \ell_{end} - \ell_s)` with :math:`\theta = 0.9` and
:math:`k` = ``order`` (Lu et al. 2022, Alg. 4). The loop is a ``jax.lax.while_loop``.

Differences from the reference code, documented: the error's maximum is over the *finite* rows
(a row that turned NaN never stalls or shrinks the others' steps; an all-NaN batch takes full
steps), and the denoiser's output at the current point is kept across rejected steps (the
references evaluate it again), so a rejection costs ``order - 1`` evaluations, not ``order``.
The step size is shared by the batch, as in the references: a sample's path depends on the
batch it is solved with (within the tolerance).

**How the grid is used.** The sampler runs through :func:`jaxdiff.sample` like any other: each
grid interval ``ts[i] -> ts[i + 1]`` is solved adaptively to the tolerance (so the grid's inner
points are only where the trajectory is saved, like diffrax's ``SaveAt(ts=...)``; the step size
carries over from one interval to the next), and a last entry 0 is the engine's final denoising
step (1 NFE). The usual grid has just its ends, ``jnp.array([t_max, t_min, 0.0])``:
:func:`adaptive_grid` builds it. ``SampleResult.nfe`` is the exact number of denoiser calls
(data-dependent); ``nfe_per_step`` is that of one trial step.

Example:
    >>> import jax, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = vp.prior_sample((16, 2), key=jax.random.key(0))
    >>> sampler = jaxdiff.samplers.dpm_solver_adaptive(vp, rtol=0.05)
    >>> res = jaxdiff.sample(sampler, target.denoiser(vp), x_T,
    ...                      jaxdiff.samplers.adaptive_grid(vp))
    >>> res.x.shape, int(res.nfe) > 3
    ((16, 2), True)
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._utils import is_concrete, sum_except_batch
from jaxdiff.processes import Process
from jaxdiff.samplers.base import Sampler, grid_dtype
from jaxdiff.samplers.dpm_solver import check_order, dpm_solver_embedded_step, half_log_snr

__all__ = ["DPMSolverAdaptive", "AdaptiveState", "dpm_solver_adaptive", "adaptive_grid"]

#: A step ends an interval when it comes this close to its end in the half log-SNR (Lu et al.).
T_ERR = 1e-5
#: The safety factor :math:`\theta` of the step-size rule (Lu et al. 2022, Alg. 4).
THETA = 0.9


class AdaptiveState(NamedTuple):
    """The controller's state, carried from one grid interval to the next.

    Attributes:
        h: the proposed next step size in the half log-SNR :math:`\\ell`.
        x_prev: the lower-order solution of the last accepted step (the error's scale).
    """

    h: jax.Array
    x_prev: jax.Array


class _Loop(NamedTuple):
    x: jax.Array  # the solution at s
    x0: jax.Array  # the denoiser's output at (x, s), valid when `fresh`
    fresh: jax.Array
    s: jax.Array
    h: jax.Array
    x_prev: jax.Array
    nfe: jax.Array
    steps: jax.Array


def adaptive_grid(process: Process, dtype=None):
    """``[t_max, t_min, 0]``: one adaptive solve from the prior to ``t_min``, then the denoiser."""
    return jnp.asarray([process.t_max, process.t_min, 0.0], dtype)


def scaled_error(x_low, x_high, x_prev, rtol, atol):
    r""":math:`E`: the largest per-row RMS of :math:`(x_{high} - x_{low})/\delta` over finite rows.

    0 when no row is finite (then every step is accepted and the loop still ends).
    """
    delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
    size = x_low.size // x_low.shape[0]
    rms = jnp.sqrt(sum_except_batch(((x_high - x_low) / delta) ** 2) / size)
    return jnp.max(jnp.where(jnp.isfinite(rms), rms, 0.0))


class DPMSolverAdaptive(Sampler):
    """The adaptive DPM-Solver; built by :func:`dpm_solver_adaptive`."""

    process: Process
    order: int = eqx.field(static=True, default=3)
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    max_steps: int = eqx.field(static=True, default=1000)

    def init(self, x_T, ts):
        return AdaptiveState(jnp.asarray(self.h_init, ts.dtype), jnp.asarray(x_T))

    def step(self, denoise, x, state, ts, i, key):
        t_start, t_end = ts[i], ts[i + 1]
        x0 = denoise(x, t_start)
        ell_end = half_log_snr(self.process, t_end)
        one, zero = jnp.array(1, jnp.int32), jnp.array(0, jnp.int32)
        carry = _Loop(x, x0, jnp.array(True), t_start, state.h, state.x_prev, one, zero)

        def running(c):
            ell_s = half_log_snr(self.process, c.s)
            return (ell_s < ell_end - T_ERR) & (c.steps < self.max_steps)

        def trial(c):
            return self._trial(denoise, c, t_end, ell_end)

        out = jax.lax.while_loop(running, trial, carry)
        return out.x, AdaptiveState(out.h, out.x_prev), x0, out.nfe

    def _trial(self, denoise, c, t_end, ell_end):
        """One trial step from ``c.s``: accept or reject it and propose the next size."""
        p, dtype = self.process, c.x.dtype
        x0 = jax.lax.cond(c.fresh, lambda: c.x0, lambda: denoise(c.x, c.s).astype(c.x0.dtype))
        ell_s = half_log_snr(p, c.s)
        h = jnp.minimum(c.h, ell_end - ell_s)
        last = ell_s + h >= ell_end - T_ERR
        s = jnp.where(last, t_end, p.t_from_log_snr(2.0 * (ell_s + h))).astype(c.s.dtype)
        eps = p.eps_from_x0(c.x, x0, c.s)
        x_low, x_high = dpm_solver_embedded_step(p, c.x, x0, eps, c.s, s, self.order, denoise)
        wide = grid_dtype(c.x)
        err = scaled_error(
            x_low.astype(wide), x_high.astype(wide), c.x_prev.astype(wide), self.rtol, self.atol
        )
        accept = err <= 1.0
        h_next = THETA * h * jnp.maximum(err, 1e-8) ** (-1.0 / self.order)
        return _Loop(
            x=jnp.where(accept, x_high.astype(dtype), c.x),
            x0=x0,
            fresh=~accept,
            s=jnp.where(accept, s, c.s),
            h=h_next.astype(c.h.dtype),
            x_prev=jnp.where(accept, x_low.astype(dtype), c.x_prev),
            nfe=c.nfe + jnp.where(c.fresh, 0, 1) + self.order - 1,
            steps=c.steps + 1,
        )

    @property
    def nfe_per_step(self) -> int:
        return self.order

    @property
    def name(self) -> str:
        return f"dpm_solver_adaptive(order={self.order}, rtol={self.rtol}, atol={self.atol})"


def dpm_solver_adaptive(
    process: Process,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    max_steps: int = 1000,
) -> DPMSolverAdaptive:
    r"""The adaptive DPM-Solver-12 (``order=2``) or -23 (``order=3``) of Lu et al. (2022).

    Args:
        process: the forward process.
        order: the order of the higher solution of the embedded pair (2 or 3).
        rtol, atol: relative and absolute tolerance of the scaled error (Lu et al.'s defaults
            for images in [-1, 1]: ``atol`` is about 1/128, the size of one 8-bit level).
        h_init: the first step size in the half log-SNR.
        max_steps: at most this many trial steps per grid interval (a safeguard: an interval
            that needs more ends where the last accepted step stopped).

    ``rtol``, ``atol`` and ``h_init`` are traced: new values never recompile. See the module
    docstring for how the grid is used; the exact NFE is in ``SampleResult.nfe``.

    Example:
        >>> import jaxdiff
        >>> jaxdiff.samplers.dpm_solver_adaptive(jaxdiff.EDM(), order=2).nfe_per_step
        2
    """
    order = check_order("dpm_solver_adaptive", order, (2, 3))
    if is_concrete(rtol, atol, h_init):
        if not (rtol >= 0 and atol >= 0 and rtol + atol > 0):
            raise ValueError(f"rtol and atol must be non-negative, not both 0; got {rtol}, {atol}.")
        if not h_init > 0:
            raise ValueError(f"h_init must be positive, got {h_init}.")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    hyper = [float(v) if is_concrete(v) else v for v in (rtol, atol, h_init)]
    return DPMSolverAdaptive(process, order, *hyper, max_steps)
