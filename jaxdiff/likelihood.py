r"""Exact log-likelihoods through the probability-flow ODE, and bits per dimension.

Along the probability-flow ODE :math:`\dot x = v(x, t)` the log density of the marginals obeys the
instantaneous change of variables (Chen et al. 2018, "Neural ODEs", Thm. 1)

.. math:: \frac{d}{dt}\log p_t(x(t)) = -\nabla\cdot v(x(t), t),

so integrating the augmented state :math:`(x, \Delta)` with :math:`\dot\Delta = \nabla\cdot v`
forward from :math:`t_{min}` to :math:`t_{max}` gives

.. math:: \log p_{t_{min}}(x_0) = \log p_{t_{max}}(x(t_{max})) + \int_{t_{min}}^{t_{max}}
    \nabla\cdot v(x(t), t)\,dt

(Song et al. 2021, Sec. 4.3 and App. D.2), with the prior :math:`\mathcal N(0, \sigma(t_{max})^2 I)`
in place of :math:`p_{t_{max}}`. The divergence is exact (trace of the Jacobian, by forward-mode
autodiff, one Jacobian-vector product per dimension) for small dimensions and otherwise
Hutchinson's estimator :math:`\nabla\cdot v \approx \epsilon^\top (\partial v/\partial x)\,\epsilon`
with Rademacher or Gaussian probes drawn once per solve (Grathwohl et al. 2019, "FFJORD").
Each example's divergence is its own: the Jacobian is taken per example under ``jax.vmap``.
A probe distribution is a function ``(key, shape, dtype) -> array`` with identity covariance,
``jax.random.rademacher`` (the default) or ``jax.random.normal``.

**Starting point.** ``log_likelihood`` returns :math:`\log p_{t_{min}}(x_0)`, the density of the
marginal at :math:`t_{min}` evaluated at the data, treating the data as :math:`x_{t_{min}}` (the
convention of Song et al. 2021). It differs from the data density :math:`\log p_0` by the
smoothing of :math:`p_0` with :math:`\mathcal N(0, \sigma_{t_{min}}^2)` and the scale
:math:`\alpha_{t_{min}}`, both negligible for small ``t_min``.

**dtypes and non-finite data** follow :mod:`jaxdiff.sde` (:func:`jaxdiff.sde.solver_input`):
bfloat16 or float16 data are integrated in float32 and the log-likelihoods are returned in at
least float32 (a bfloat16 log-density would lose the second decimal of bits per dimension);
integer or boolean ``x0`` is a ``TypeError`` (:func:`bits_per_dim` dequantizes integer levels
first); a row with NaN or inf is a ``ValueError`` naming it, or NaN under ``jax.jit`` while the
other rows are computed as usual.

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> from jaxdiff.likelihood import log_likelihood
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jnp.zeros(2), 0.5 * jnp.eye(2))
    >>> x = target.sample(4, key=jax.random.key(0))
    >>> log_likelihood(vp, target.denoiser(vp), x).shape            # exact divergence (d = 2)
    (4,)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp

from jaxdiff._utils import as_time, is_concrete
from jaxdiff.processes import Process
from jaxdiff.sde import (
    check_ode_solver,
    default_stepsize_controller,
    probability_flow_velocity,
    solver_input,
)

__all__ = ["log_likelihood", "bits_per_dim", "divergence", "sample_probes", "dequantize"]

#: ``exact_divergence=None`` takes the exact trace up to this many dimensions per example.
EXACT_DIVERGENCE_MAX_DIM = 16
#: Deprecated probe names and the distributions they stand for.
PROBES = ("rademacher", "gaussian")
_PROBE_ALIASES = {"rademacher": jax.random.rademacher, "gaussian": jax.random.normal}


# --------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------


def _probe_distribution(probe) -> Callable:
    """A probe distribution, or the one a deprecated name stands for."""
    if isinstance(probe, str):
        if probe not in _PROBE_ALIASES:
            raise ValueError(
                f"probe must be one of {PROBES} (deprecated names) or a function "
                f"(key, shape, dtype) -> array such as jax.random.rademacher; got {probe!r}."
            )
        fn = _PROBE_ALIASES[probe]
        warnings.warn(
            f"probe={probe!r} is deprecated: pass probe=jax.random.{fn.__name__}.",
            DeprecationWarning,
            stacklevel=3,
        )
        return fn
    if not callable(probe):
        raise TypeError(f"probe must be a function (key, shape, dtype) -> array; got {probe!r}.")
    return probe


def sample_probes(key, x, n_probes: int = 1, probe: Callable = jax.random.rademacher):
    r"""Hutchinson probes :math:`\epsilon` with :math:`E[\epsilon\epsilon^\top] = I`.

    Returns ``probe(key, (batch, n_probes, ...), x.dtype)``: signs :math:`\pm 1`
    (``jax.random.rademacher``, the default) or standard normals (``jax.random.normal``).

    Example:
        >>> probes = sample_probes(jax.random.key(0), x, 4, jax.random.normal)  # doctest: +SKIP
        >>> probes.shape  # (batch, 4, d)                                    # doctest: +SKIP
    """
    probe = _probe_distribution(probe)
    if int(n_probes) < 1:
        raise ValueError(f"n_probes must be a positive integer; got {n_probes}.")
    return probe(key, (x.shape[0], int(n_probes)) + x.shape[1:], x.dtype)


def divergence(fn: Callable, x, probes=None):
    r"""``(fn(x), div)``: a batched map and the divergence of each example, shape ``(batch,)``.

    ``fn`` maps ``(batch, ...)`` to ``(batch, ...)`` and must treat examples independently; it
    is evaluated one example at a time under ``jax.vmap``, so each divergence is its own.
    Exact (``probes=None``): :math:`\mathrm{tr}(\partial f/\partial x)` from the Jacobian.
    Hutchinson (probes of shape ``(batch, n, ...)`` from :func:`sample_probes`):
    :math:`\frac1n\sum_k \epsilon_k^\top(\partial f/\partial x)\,\epsilon_k`, unbiased.
    """
    one = lambda xi: fn(xi[None])[0]
    if probes is None:
        return jax.vmap(lambda xi: _exact_one(one, xi))(x)
    return jax.vmap(lambda xi, ei: _hutchinson_one(one, xi, ei))(x, probes)


def _exact_one(fn, xi):
    d = xi.size
    twice = lambda y: (lambda out: (out, out))(fn(y))
    jac, out = jax.jacfwd(twice, has_aux=True)(xi)
    return out, jnp.trace(jac.reshape(d, d))


def _hutchinson_one(fn, xi, probes):
    out, jv = jax.vmap(lambda e: jax.jvp(fn, (xi,), (e,)))(probes)  # vmapped: primal shared
    return out[0], jnp.mean(jnp.sum((probes * jv).reshape(probes.shape[0], -1), axis=-1))


class _AugmentedFlow(eqx.Module):
    r"""The vector field of :math:`(x, \Delta)`: :math:`(v(x, t), \nabla\cdot v(x, t))`."""

    process: Process
    denoise: Callable
    probes: jax.Array | None

    def __call__(self, t, state, args):
        x, _ = state
        v = lambda y: probability_flow_velocity(self.process, self.denoise, y, t)
        dx, div = divergence(v, x, self.probes)
        return dx, div.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Log-likelihood
# --------------------------------------------------------------------------------------------


def _use_exact(exact_divergence, dim):
    return dim <= EXACT_DIVERGENCE_MAX_DIM if exact_divergence is None else bool(exact_divergence)


def _check_solve(sol, max_steps):
    """Raise eagerly when the solve failed; under tracing return a mask to put NaN there."""
    ok = sol.result == dfx.RESULTS.successful
    if is_concrete(ok) and not bool(ok):
        hint = "try a tighter or looser tolerance, or another solver"
        if bool(sol.result == dfx.RESULTS.max_steps_reached):
            hint = (
                f"it reached max_steps={max_steps}: raise max_steps or loosen rtol/atol. It "
                f"stopped at t={float(sol.ts[-1]):g}; if the denoiser returns NaN or inf just "
                "after that time, the step-size control stalls there and only fixing the "
                "denoiser helps"
            )
        raise RuntimeError(f"log_likelihood: the probability-flow ODE solve failed; {hint}.")
    return ok


def log_likelihood(
    process: Process,
    denoise: Callable,
    x0,
    *,
    key=None,
    exact_divergence: bool | None = None,
    probe: Callable = jax.random.rademacher,
    n_probes: int = 1,
    t_min=None,
    t_max=None,
    prior_logp: Callable | None = None,
    solver=dfx.Tsit5(),
    rtol=1e-5,
    atol=1e-5,
    stepsize_controller=None,
    dt0=None,
    max_steps: int = 4096,
) -> jax.Array:
    r"""Log density :math:`\log p_{t_{min}}(x_0)` in nats, one value per example ``(batch,)``.

    .. math:: \log p_{t_{min}}(x_0) = \log p_T(x(T)) + \int_{t_{min}}^{T}\nabla\cdot v(x(t), t)\,dt,
        \qquad v = f x - \tfrac12 g^2\nabla\log p_t

    integrated with diffrax from ``t_min`` up to ``t_max`` (Chen et al. 2018; Grathwohl et al.
    2019; Song et al. 2021, App. D.2). See the module docstring for the starting point.

    Args:
        process, denoise: the forward process and ``denoise(x, t) -> x0_hat``.
        x0: data ``(batch, ...)`` in the model's units, a floating dtype (bfloat16 and float16
            are integrated in float32); see the module docstring for dtypes and NaN rows.
        key: PRNG key for Hutchinson probes (not needed with the exact divergence).
        exact_divergence: ``True`` exact trace, ``False`` Hutchinson, ``None`` exact when an
            example has at most ``EXACT_DIVERGENCE_MAX_DIM`` (16) entries.
        probe, n_probes: Hutchinson probe distribution, a function ``(key, shape, dtype)``
            (``jax.random.rademacher`` or ``jax.random.normal``; the names ``"rademacher"`` and
            ``"gaussian"`` are deprecated aliases), and count; the probes are fixed along the
            solve, so the estimate is unbiased.
        t_min, t_max: integration range (defaults: the process's).
        prior_logp: ``log p_T`` of the end point (default ``process.prior_logp``).
        solver: a diffrax ODE solver (default ``Tsit5``).
        rtol, atol: tolerances of the default ``PIDController``.
        stepsize_controller, dt0: override step-size control (fixed-step solvers need ``dt0``).
        max_steps: bound on solver steps, so a solve never hangs: past it, a ``RuntimeError``
            (eagerly) or NaN (under ``jax.jit``).

    Returns:
        ``(batch,)`` log-likelihoods in nats, in at least float32.

    Example:
        >>> ll = log_likelihood(vp, denoise, x, key=jax.random.key(0), exact_divergence=False,
        ...                     n_probes=4)                                 # doctest: +SKIP
    """
    x0, guard = solver_input(x0, "x0")
    if x0.ndim < 2:
        raise ValueError(f"x0 must be batched, shape (batch, ...); got shape {x0.shape}.")
    t_min = process.t_min if t_min is None else t_min
    t_max = process.t_max if t_max is None else t_max
    process.check_t(t_min, name="t_min")
    process.check_t(t_max, name="t_max")
    if is_concrete(t_min, t_max) and float(t_min) >= float(t_max):
        raise ValueError(f"t_min must be below t_max; got {float(t_min):g} >= {float(t_max):g}.")
    check_ode_solver(solver)
    probes = None
    if not _use_exact(exact_divergence, math.prod(x0.shape[1:])):
        if key is None:
            raise ValueError("Hutchinson's estimator needs key=jax.random.key(seed).")
        probes = sample_probes(key, x0, n_probes, _probe_distribution(probe))
    # Tolerances as arrays in the state's dtype: new values do not recompile the solve, and
    # float32 data keeps a float32 controller state under jax_enable_x64.
    rtol, atol = jnp.asarray(rtol, x0.dtype), jnp.asarray(atol, x0.dtype)
    controller = default_stepsize_controller(solver, stepsize_controller, dt0, rtol, atol)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_AugmentedFlow(process, denoise, probes)),
        solver,
        as_time(t_min, x0),  # times in the data's dtype: float32 stays float32
        as_time(t_max, x0),
        None if dt0 is None else jnp.abs(as_time(dt0, x0)),
        (x0, jnp.zeros(x0.shape[:1], x0.dtype)),
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,
    )
    x_T, delta = sol.ys[0][-1], sol.ys[1][-1]
    ok = _check_solve(sol, max_steps)
    prior = process.prior_logp if prior_logp is None else prior_logp
    return guard.mask(jnp.where(ok, prior(x_T) + delta, jnp.nan))


# --------------------------------------------------------------------------------------------
# Bits per dimension
# --------------------------------------------------------------------------------------------


def dequantize(x, *, key=None, data_range=(-1.0, 1.0), num_bins: int = 256):
    r"""Integer levels :math:`k \in \{0, \dots, B-1\}` to the model's range by uniform noise.

    .. math:: z = lo + (hi - lo)\,\frac{k + u}{B},\qquad u \sim U[0, 1)^D

    (``key=None`` puts every point at its bin centre, :math:`u = 1/2`). Float input is returned
    unchanged: it is taken as already continuous and in the model's range.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        return x
    if is_concrete(x) and x.size and (int(x.min()) < 0 or int(x.max()) >= num_bins):
        raise ValueError(
            f"Integer data must hold levels in [0, {num_bins - 1}] (8-bit pixels for 256 bins); "
            f"got values in [{int(x.min())}, {int(x.max())}]."
        )
    dtype = jnp.result_type(float)
    u = jnp.full(x.shape, 0.5, dtype) if key is None else jax.random.uniform(key, x.shape, dtype)
    lo, hi = data_range
    return lo + (hi - lo) * (x.astype(dtype) + u) / num_bins


def bits_per_dim(
    process: Process,
    denoise: Callable,
    x,
    *,
    key=None,
    data_range=(-1.0, 1.0),
    num_bins: int = 256,
    **likelihood_kwargs,
) -> jax.Array:
    r"""Negative log-likelihood of discrete data in bits per dimension, shape ``(batch,)``.

    **Data convention.** Integer ``x`` holds levels :math:`k \in \{0, \dots, B-1\}` (8-bit pixels,
    :math:`B = 256`), which :func:`dequantize` maps with uniform noise into the model's range
    ``data_range`` (default :math:`[-1, 1]`, as in Ho et al. 2020 and Song et al. 2021). Float
    ``x`` is taken as already dequantized and in that range. With bins of width
    :math:`\Delta = (hi - lo)/B` in the model's units, the uniform-dequantization bound
    :math:`\log P(k) \ge E_u[\log p(z)] + D\log\Delta` (Theis et al. 2016; Ho et al. 2020) gives

    .. math:: \mathrm{bpd} = -\frac{\log p_{t_{min}}(z) + D\log\Delta}{D\log 2},

    which is :math:`-\log p(z)/(D\log 2) + 7` for 8-bit data on :math:`[-1, 1]`. One draw of
    :math:`u` per example; average over examples (and draws) for the bound.

    Args:
        process, denoise: the forward process and the denoiser.
        x: integer levels or dequantized floats, ``(batch, ...)``.
        key: PRNG key for the dequantization noise and Hutchinson probes.
        data_range, num_bins: the model's data range and the number of levels.
        **likelihood_kwargs: passed to :func:`log_likelihood`.

    Example:
        >>> bpd = bits_per_dim(vp, denoise, images_uint8, key=key)             # doctest: +SKIP
    """
    x = jnp.asarray(x)
    k_deq, k_ll = (None, None) if key is None else tuple(jax.random.split(key))
    if not jnp.issubdtype(x.dtype, jnp.integer):
        solver_input(x, "x")  # floats only: the dtype and non-finite rows, named as ``x``
    elif key is None:
        raise ValueError("Integer data is dequantized with uniform noise: pass key=...")
    z = dequantize(x, key=k_deq, data_range=data_range, num_bins=num_bins)
    ll = log_likelihood(process, denoise, z, key=k_ll, **likelihood_kwargs)
    dim = math.prod(x.shape[1:])
    log_bin = math.log((data_range[1] - data_range[0]) / num_bins)
    return -(ll + dim * log_bin) / (dim * math.log(2.0))
