r"""Annealed Langevin dynamics (Song & Ermon 2019, "Generative Modeling by Estimating Gradients
of the Data Distribution", Alg. 1): NCSN's sampler, for any process.

At each noise level :math:`\tilde\sigma_i` of the grid, ``steps_per_level`` Langevin steps
target the noised marginal, in EDM's variables (Karras et al. 2022) :math:`\tilde x = x/\alpha_t`,
:math:`\tilde\sigma = \sigma_t/\alpha_t` (for VE and EDM, :math:`\tilde x = x`):

.. math::
    \tilde x \leftarrow \tilde x + \frac{a_i}{2}\nabla_{\tilde x}\log p(\tilde x;
        \tilde\sigma_i) + \sqrt{a_i}\,z,\qquad
    a_i = \epsilon\,\frac{\tilde\sigma_i^2}{\tilde\sigma_L^2},\qquad
    \nabla_{\tilde x}\log p = \frac{D(x, t_i) - \tilde x}{\tilde\sigma_i^2},

with :math:`\tilde\sigma_L` the grid's last level and :math:`z\sim\mathcal N(0, I)` fresh at
every step. The drift multiplies :math:`\tilde x - D` by :math:`1 - \epsilon/(2\tilde\sigma_L^2)`
at every level, so the chain contracts without overshooting only for
:math:`\epsilon < 2\tilde\sigma_L^2` (at :math:`4\tilde\sigma_L^2` it diverges on a sharp
target); a larger ``eps`` is an error. The default, :data:`DEFAULT_EPS_FRACTION`
:math:`\cdot\,\tilde\sigma_L^2 = 0.2\,\tilde\sigma_L^2`, is NCSN's choice (:math:`\epsilon =
2\cdot10^{-5}` with :math:`\tilde\sigma_L = 0.01`); it is computed from the grid at run time.

**How the grid is used.** ``x_T`` is a sample at the first level ``ts[0]`` (the prior); step
``i`` moves :math:`\tilde x` to the next level ``ts[i + 1]`` (:math:`\tilde x` is unchanged,
:math:`x` rescaled by :math:`\alpha`) and runs the Langevin steps there, so every level after the
first gets ``steps_per_level`` steps (NFE ``steps_per_level`` per step, and ``x0_hat`` of the
denoising trajectory is the denoiser's first output at ``ts[i + 1]``). A last entry 0 gives the
final denoising step :math:`\hat x_0 = D(x, t_L)` of Song & Ermon (2020, "Improved Techniques for
Training Score-Based Generative Models", Sec. 3.1 and App. B), 1 NFE, which removes the
remaining noise of size :math:`\tilde\sigma_L`.

Example:
    >>> import jax, jaxdiff
    >>> ve = jaxdiff.VE()
    >>> sampler = jaxdiff.samplers.annealed_langevin(ve, steps_per_level=10)
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> x_T = ve.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(sampler, target.denoiser(ve), x_T,
    ...                      jaxdiff.schedules.log_snr_uniform(ve, 5), key=jax.random.key(1))
    >>> int(res.nfe)  # 10 Langevin steps at each of the 4 levels after the first, 1 to denoise
    41
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._utils import bcast, is_concrete
from jaxdiff.processes import Process
from jaxdiff.samplers.base import EmptyState, Sampler, grid_dtype, normal_like

__all__ = ["AnnealedLangevin", "annealed_langevin", "DEFAULT_EPS_FRACTION"]

#: The default step size :math:`\epsilon` in units of :math:`\tilde\sigma_L^2` (NCSN's ratio).
DEFAULT_EPS_FRACTION = 0.2

AnnealedLangevinState = EmptyState


class AnnealedLangevin(Sampler):
    """Annealed Langevin dynamics; built by :func:`annealed_langevin`."""

    process: Process
    steps_per_level: int = eqx.field(static=True, default=100)
    eps: float | None = None

    def init(self, x_T, ts):
        return EmptyState()

    def check(self, ts):
        r"""``eps`` below :math:`2\tilde\sigma_L^2` of this grid: a ``ValueError`` otherwise."""
        if self.eps is None or not is_concrete(self.eps, self.process):
            return
        last = ts[-2] if ts[-1] == 0 else ts[-1]
        with jax.ensure_compile_time_eval():  # concrete even inside an outer jit's trace
            bound = 2.0 * float(self.process.noise_level(last)) ** 2
        if self.eps >= bound:
            raise ValueError(
                f"annealed_langevin: eps={self.eps:g} must be below 2 sigma_L^2 = {bound:g} "
                f"(sigma_L = sigma/alpha at the grid's last level t = {last:g}), where the "
                "Langevin step stops contracting; lower eps or end the grid at a larger noise "
                "level."
            )

    def _eps(self, sig_last2):
        r""":math:`\epsilon`, checked against :math:`2\tilde\sigma_L^2` at run time."""
        if self.eps is None:
            return DEFAULT_EPS_FRACTION * sig_last2
        return eqx.error_if(
            self.eps,
            self.eps >= 2.0 * sig_last2,
            "annealed_langevin: eps must be below 2 sigma_L^2 (sigma_L the grid's last noise "
            "level sigma/alpha), where the Langevin step stops contracting; lower eps or end "
            "the grid at a larger noise level.",
        )

    def step(self, denoise, x, state, ts, i, key):
        p, t, s = self.process, ts[i], ts[i + 1]
        last = jnp.where(ts[-1] == 0, ts[-2], ts[-1])
        sig_last2, sig2 = p.noise_level(last) ** 2, p.noise_level(s) ** 2
        eps = self._eps(sig_last2)
        pull = bcast(eps / (2.0 * sig_last2), x)  # (a_i / 2) / sigma_i^2
        noise_scale = bcast(p.alpha(s) * jnp.sqrt(eps * sig2 / sig_last2), x)
        # the chain runs in at least float32 (many small moves would round away in bf16/f16);
        # the denoiser sees x in its own dtype
        dtype, wide = x.dtype, grid_dtype(x)
        x = (bcast(p.alpha(s) / p.alpha(t), x) * x).astype(wide)  # same x~, next level

        def langevin(j, x, x0):
            z = normal_like(jax.random.fold_in(key, j), x)
            return (x + pull * (bcast(p.alpha(s), x) * x0 - x) + noise_scale * z).astype(wide)

        def denoised(x):
            return denoise(x.astype(dtype), s).astype(wide)

        x0_first = denoise(x.astype(dtype), s)
        x = langevin(0, x, x0_first.astype(wide))
        x = jax.lax.fori_loop(1, self.steps_per_level, lambda j, x: langevin(j, x, denoised(x)), x)
        return x, state, x0_first, self.steps_per_level

    @property
    def nfe_per_step(self) -> int:
        return self.steps_per_level

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return f"annealed_langevin(steps_per_level={self.steps_per_level}, eps={self.eps})"


def annealed_langevin(
    process: Process, steps_per_level: int = 100, eps: float | None = None
) -> AnnealedLangevin:
    r"""NCSN's annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) on the grid's noise levels.

    Args:
        process: the forward process (any: the dynamics run in :math:`x/\alpha`).
        steps_per_level: Langevin steps :math:`T` at each level (NCSN: 100).
        eps: the step size :math:`\epsilon` at the last level :math:`\tilde\sigma_L` (in
            :math:`\tilde\sigma^2` units; traced). ``None``: :math:`0.2\,\tilde\sigma_L^2`,
            NCSN's ratio, taken from the grid. It must be below :math:`2\tilde\sigma_L^2`;
            as :math:`\tilde\sigma_L` is known only with the grid, a larger value raises
            when the grid is concrete (a ``ValueError`` from ``jaxdiff.sample``), or when the
            sampler runs under ``jit`` (an ``EquinoxRuntimeError`` with the same message).

    NFE: ``steps_per_level`` per step, 1 for a final step into 0. Needs a ``key``.

    Example:
        >>> import jaxdiff
        >>> jaxdiff.samplers.annealed_langevin(jaxdiff.VE(), 50).nfe(11)
        501
    """
    if not isinstance(steps_per_level, int) or isinstance(steps_per_level, bool):
        raise ValueError(f"steps_per_level must be a positive int, got {steps_per_level!r}.")
    if steps_per_level < 1:
        raise ValueError(f"steps_per_level must be a positive int, got {steps_per_level!r}.")
    if eps is not None and is_concrete(eps):
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        eps = float(eps)
    return AnnealedLangevin(process, steps_per_level, eps)
