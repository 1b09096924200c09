r"""Time grids: plain functions returning arrays.

Each hand-made grid returns ``n + 1`` decreasing times: ``n`` points from ``t_max`` to ``t_min``
spaced by its rule, then 0. A sampler run on it takes ``n`` steps, the last of which returns the
denoiser's output (the EDM / k-diffusion convention). ``karras(EDM(), n)`` equals k-diffusion's
``get_sigmas_karras(n, 0.002, 80)``. Grids are data: changing their values never recompiles a
sampler (same length, same dtype).

Rules are applied in the variable named by each function (time, log-SNR, or the EDM noise level
:math:`\tilde\sigma = \sigma_t/\alpha_t = e^{-\lambda/2}`), then mapped back to time through
``process.t_from_log_snr``, so every grid works for every process.

Grids fitted to a denoiser (GITS's dynamic program, gradient descent through a sampler) live in
:mod:`jaxdiff.fitted_grids`; ``schedules.gits``, ``schedules.optimize`` and
``schedules.fine_trajectory`` are the same functions.

Example:
    >>> import jaxdiff
    >>> jaxdiff.schedules.karras(jaxdiff.EDM(), 4).shape
    (5,)
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp

from jaxdiff.processes import Process

__all__ = ["uniform", "quadratic", "log_snr_uniform", "karras", "polynomial", "append_zero"]
__all__ += ["check_steps", "noise_levels"]


def check_steps(n):
    """Raise ``ValueError`` unless ``n``, a number of steps, is a positive int."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of steps) must be a positive int; got {n!r}.")


def append_zero(ts):
    """Append the final 0 ("denoise to the end")."""
    return jnp.concatenate([ts, jnp.zeros((1,), ts.dtype)])


def _ramp(n, dtype):
    """``n`` points from 0 to 1 (a single point 0 when ``n == 1``)."""
    return jnp.linspace(0.0, 1.0, n, dtype=dtype)


def uniform(process: Process, n: int, *, dtype=None):
    r"""Uniform in time: :math:`t_i = t_{max} + \frac{i}{n-1}(t_{min} - t_{max})`, then 0."""
    check_steps(n)
    u = _ramp(n, dtype)
    return append_zero(_clip(process, process.t_max + u * (process.t_min - process.t_max)))


def quadratic(process: Process, n: int, *, dtype=None):
    r"""Quadratic in time (DDIM's "quadratic" spacing): :math:`t = t_{min} + (t_{max}-t_{min})u^2`."""
    return polynomial(process, n, 2.0, dtype=dtype)


def polynomial(process: Process, n: int, power: float, *, dtype=None):
    r"""Polynomial in time: :math:`t_i = t_{min} + (t_{max} - t_{min})(1 - \frac{i}{n-1})^{p}`.

    ``power > 1`` puts more steps near the data; ``power = 1`` is :func:`uniform`.
    """
    check_steps(n)
    if power <= 0:
        raise ValueError(f"power must be positive; got {power}.")
    u = 1.0 - _ramp(n, dtype)
    return append_zero(_clip(process, process.t_min + (process.t_max - process.t_min) * u**power))


def log_snr_uniform(process: Process, n: int, *, dtype=None):
    r"""Uniform in log-SNR :math:`\lambda` (DPM-Solver's "logSNR" grid), mapped back to time."""
    check_steps(n)
    t_ends = jnp.asarray([process.t_max, process.t_min], dtype=dtype)
    lam_max, lam_min = process.log_snr(t_ends)
    lam = lam_max + _ramp(n, t_ends.dtype) * (lam_min - lam_max)
    return append_zero(_clip(process, process.t_from_log_snr(lam)))


def karras(process: Process, n: int, rho: float = 7.0, *, dtype=None):
    r"""Karras et al. (2022, Eq. 5) grid, polynomial in the noise level :math:`\tilde\sigma`.

    .. math:: \tilde\sigma_i = \left(\tilde\sigma_{max}^{1/\rho} + \tfrac{i}{n-1}
        (\tilde\sigma_{min}^{1/\rho} - \tilde\sigma_{max}^{1/\rho})\right)^\rho,
        \qquad \tilde\sigma = \sigma_t/\alpha_t,

    mapped back to time with ``process.t_from_noise_level``.
    """
    check_steps(n)
    if rho <= 0:
        raise ValueError(f"rho must be positive; got {rho}.")
    t_ends = jnp.asarray([process.t_max, process.t_min], dtype=dtype)
    s_max, s_min = process.noise_level(t_ends)
    u = _ramp(n, t_ends.dtype)
    sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return append_zero(_clip(process, process.t_from_noise_level(sig)))


def noise_levels(process: Process, ts):
    r"""EDM noise levels :math:`\tilde\sigma_t = \sigma_t/\alpha_t` of a grid, 0 at a final 0."""
    ts = jnp.asarray(ts)
    positive = ts > 0
    return jnp.where(positive, process.noise_level(jnp.where(positive, ts, ts[0])), 0.0)


def _clip(process, ts):
    """Remove round-off outside ``[t_min, t_max]`` and pin the end points exactly."""
    ts = jnp.clip(ts, process.t_min, process.t_max)
    return ts.at[0].set(process.t_max).at[-1].set(process.t_min) if ts.shape[0] > 1 else ts


# --- grids fitted to a denoiser live in jaxdiff.fitted_grids; these names stay reachable here -------
_FITTED = ("gits", "optimize", "fine_trajectory", "step_costs", "StepCosts")
_FITTED += ("propagated_error", "local_error", "propagation_weights", "grid_loss")
#: earlier private names, still used by tests written against them
_RENAMED = {"_propagation_weights": "propagation_weights", "_grid_loss": "grid_loss"}
__all__ += list(_FITTED)


def __getattr__(name):
    if name in _FITTED or name in _RENAMED:
        fitted = importlib.import_module("jaxdiff.fitted_grids")
        return getattr(fitted, _RENAMED.get(name, name))
    raise AttributeError(f"module 'jaxdiff.schedules' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FITTED))
