r"""Ancestral sampling as a wrapper: any single-step deterministic sampler made stochastic.

k-diffusion's ancestral samplers (``sample_euler_ancestral``, ``sample_dpm_2_ancestral``,
``sample_dpmpp_2s_ancestral``, with ``get_ancestral_step``) split each step
:math:`\tilde\sigma_i \to \tilde\sigma_{i+1}` of the noise level into a deterministic step down to
:math:`\tilde\sigma_\downarrow` and fresh noise of size :math:`\tilde\sigma_\uparrow`:

.. math::
    \tilde\sigma_\uparrow = \min\left(\tilde\sigma_{i+1},\ \eta\sqrt{\tilde\sigma_{i+1}^2
        (\tilde\sigma_i^2 - \tilde\sigma_{i+1}^2)/\tilde\sigma_i^2}\right),\qquad
    \tilde\sigma_\downarrow = \sqrt{\tilde\sigma_{i+1}^2 - \tilde\sigma_\uparrow^2},

    \tilde x_{i+1} = \tilde x_\downarrow + \tilde\sigma_\uparrow z,\qquad z\sim\mathcal N(0, I).

Every process is handled in EDM's variables (Karras et al. 2022): the noise level
:math:`\tilde\sigma_t = \sigma_t/\alpha_t` and the scaled state :math:`\tilde x = x/\alpha_t`.
The wrapped sampler takes its ordinary step to :math:`t_\downarrow` =
``process.t_from_noise_level``:math:`(\tilde\sigma_\downarrow)` (it runs on the grid with
``ts[i + 1]`` replaced by :math:`t_\downarrow`), and

.. math:: x_{i+1} = \alpha_{t_{i+1}}\left(x_\downarrow/\alpha_{t_\downarrow}
    + \tilde\sigma_\uparrow z\right).

With :math:`\eta = 1` the added noise makes each step the DDPM posterior's (Ho et al. 2020) in
the limit of small steps; :math:`\eta = 0` is the wrapped sampler exactly (the grid is not
touched, no noise is drawn). The final step into :math:`t = 0` returns the denoiser's output, as
k-diffusion's (there :math:`\tilde\sigma_\uparrow = \tilde\sigma_\downarrow = 0`).

- Euler ancestral: ``ancestral(euler(p))``;
- DPM-2 ancestral: ``ancestral(dpm_solver(p, order=2))`` (DPM-Solver-2 in the noise form is
  k-diffusion's DPM-2 step with its midpoint in :math:`\log\tilde\sigma`);
- DPM++ 2S ancestral: ``ancestral(dpm_solver_pp_singlestep(p, order=2))``.

Example:
    >>> import jax, jaxdiff
    >>> edm = jaxdiff.EDM()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> sampler = jaxdiff.samplers.ancestral(jaxdiff.samplers.euler(edm))
    >>> x_T = edm.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(sampler, target.denoiser(edm), x_T,
    ...                      jaxdiff.schedules.karras(edm, 10), key=jax.random.key(1))
    >>> int(res.nfe), sampler.name
    (10, 'ancestral(euler, eta=1.0)')
"""

import jax
import jax.numpy as jnp

from jaxdiff._utils import bcast, is_concrete
from jaxdiff.processes import Process
from jaxdiff.samplers.base import Sampler, is_zero, step_noise

__all__ = ["Ancestral", "ancestral", "ancestral_step"]


def ancestral_step(sig, sig_next, eta=1.0):
    r"""``(sigma_down, sigma_up)`` of a step between noise levels (k-diffusion's convention)."""
    up = eta * jnp.sqrt(jnp.maximum(sig_next**2 * (sig**2 - sig_next**2) / sig**2, 0.0))
    up = jnp.minimum(sig_next, up)
    return jnp.sqrt(jnp.maximum(sig_next**2 - up**2, 0.0)), up


class Ancestral(Sampler):
    """A single-step deterministic sampler made ancestral; built by :func:`ancestral`."""

    sampler: Sampler
    eta: float = 1.0
    s_noise: float = 1.0

    @property
    def process(self) -> Process:
        return self.sampler.process

    def init(self, x_T, ts):
        return self.sampler.init(x_T, ts)

    def step(self, denoise, x, state, ts, i, key):
        if is_zero(self.eta):  # a concrete 0: the wrapped sampler itself
            return self.sampler.step(denoise, x, state, ts, i, key)
        p, t, s = self.process, ts[i], ts[i + 1]
        sig_down, sig_up = ancestral_step(p.noise_level(t), p.noise_level(s), self.eta)
        noisy = sig_up > 0
        t_down = jnp.where(noisy, p.t_from_noise_level(sig_down), s).astype(ts.dtype)
        x_down, state, x0, nfe = self.sampler.step(
            denoise, x, state, ts.at[i + 1].set(t_down), i, key
        )
        # drawn whenever eta > 0 (a loop-invariant switch, folded away for a known eta), even in
        # a step where sigma_up happens to be 0: the draw is then multiplied by 0
        z = step_noise(jax.random.fold_in(key, 1), x, self.eta > 0)
        x_next = bcast(p.alpha(s) / p.alpha(t_down), x) * x_down
        return x_next + bcast(p.alpha(s) * self.s_noise * sig_up, x) * z, state, x0, nfe

    def final(self, denoise, x, state, ts, key):
        return self.sampler.final(denoise, x, state, ts, key)

    @property
    def nfe_per_step(self) -> int:
        return self.sampler.nfe_per_step

    @property
    def noise_scale(self):
        return self.eta

    @property
    def name(self) -> str:
        return f"ancestral({self.sampler.name}, eta={self.eta})"


def ancestral(sampler: Sampler, eta: float = 1.0, *, s_noise: float = 1.0) -> Ancestral:
    r"""Make a single-step deterministic ``sampler`` ancestral (module docstring).

    Args:
        sampler: a deterministic sampler without history, e.g. ``euler(p)``,
            ``dpm_solver(p, 2)``, ``dpm_solver_pp_singlestep(p, 2)``, ``heun(p)``, ``ddim(p)``.
        eta: the share of each step's noise that is fresh, in ``[0, 1]`` (traced: a new value
            never recompiles). 0 is ``sampler`` itself; 1 is k-diffusion's default.
        s_noise: scale of the fresh noise (k-diffusion's ``s_noise``).

    The NFE per step is the wrapped sampler's. Needs a ``key`` unless ``eta = 0``.

    Example:
        >>> import jaxdiff
        >>> S = jaxdiff.samplers
        >>> S.ancestral(S.dpm_solver(jaxdiff.VP(), order=2)).nfe_per_step
        2
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(f"ancestral wraps a jaxdiff Sampler (from a factory); got {sampler!r}.")
    if sampler.stochastic:
        raise ValueError(
            f"ancestral wraps a deterministic sampler; {sampler.name} already draws noise."
        )
    probe = jax.ShapeDtypeStruct((1, 1), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32)
    if any(leaf.size for leaf in jax.tree_util.tree_leaves(jax.eval_shape(sampler.init, *probe))):
        raise ValueError(
            f"ancestral wraps a single-step sampler (no history); {sampler.name} is multistep: "
            "its history would mix the noised and the noise-free trajectories. Use "
            "dpm_solver_pp_sde for a stochastic multistep solver."
        )
    if is_concrete(eta, s_noise):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(
                f"eta must lie in [0, 1], got {eta}: above 1 the step would go down to noise "
                "level 0 inside the grid."
            )
        if s_noise < 0:
            raise ValueError(f"s_noise must be non-negative, got {s_noise}.")
    hyper = [float(v) if is_concrete(v) else v for v in (eta, s_noise)]
    return Ancestral(sampler, *hyper)
