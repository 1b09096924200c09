r"""The probability-flow ODE and the reverse SDE, solved with diffrax.

For the forward process :math:`dx = f(t)\,x\,dt + g(t)\,dW` with marginals
:math:`x_t = \alpha_t x_0 + \sigma_t\epsilon`, and the score from the denoiser by Tweedie's formula
:math:`\nabla\log p_t(x) = (\alpha_t\hat x_0(x, t) - x)/\sigma_t^2`:

- the **probability-flow ODE** (Song et al. 2021, Eq. 13) shares the marginals :math:`p_t`,

  .. math:: \frac{dx}{dt} = f(t)\,x - \tfrac12 g(t)^2\,\nabla\log p_t(x);

- the **reverse SDE** (Anderson 1982; Song et al. 2021, Eq. 6), run from :math:`t_0` down to
  :math:`t_1 < t_0`,

  .. math:: dx = \left[f(t)\,x - g(t)^2\,\nabla\log p_t(x)\right]dt + g(t)\,d\bar W_t.

The reverse SDE is solved **forward** in :math:`s = t_0 - t`, where it reads

.. math:: dx = -\left[f\,x - g^2\,\nabla\log p\right](t_0 - s)\,ds + g(t_0 - s)\,dW_s,
    \qquad s \in [0, t_0 - t_1],

a time change that leaves the law of the solution unchanged. Diffrax's stochastic Runge--Kutta
solvers for additive noise (SRA1, ShARK, SEA, ...) give wrong answers when asked to integrate
backward in time (diffrax issue 598); forward in :math:`s` every accepted solver is right. The
noise is additive (:math:`g` depends on :math:`t` only), so the Itô and Stratonovich solutions
coincide and Itô solvers (Euler) and Stratonovich solvers (Heun, EulerHeun, SRKs) agree.
ODEs are solved directly in :math:`t` (diffrax's ODE solvers take a negative step).

**The Brownian motion** of :func:`solve_sde` comes from a factory, :func:`unsafe_path` (fixed
steps, fastest) or :func:`virtual_tree` (any steps, reverse-mode gradients), or is a
``diffrax.AbstractBrownianPath`` of your own over :math:`s`.

**dtypes.** The state ``x`` may be float64, float32, bfloat16 or float16; the solve runs in at
least float32 (times, coefficients, the state and the denoiser's input; diffrax's step-size
control is hopeless in 8 mantissa bits) and the saved states come back in ``x``'s dtype. An
integer, boolean or complex ``x`` is a ``TypeError``.

**Non-finite input.** A NaN or inf in one example would stall the step-size control of the whole
batch. Called eagerly, :func:`solve_ode` and :func:`solve_sde` raise a ``ValueError`` naming the
non-finite rows; under ``jax.jit`` (where the values are unknown) those rows are solved as zeros
and come back NaN, and the other rows are solved as usual (:func:`solver_input`).

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> from jaxdiff import sde
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jnp.zeros(2), jnp.eye(2))
    >>> x_T = vp.prior_sample((8, 2), key=jax.random.key(0))
    >>> sol = sde.solve_ode(vp, target.denoiser(vp), x_T)            # t_max -> t_min, Tsit5
    >>> sol.ys.shape
    (1, 8, 2)
    >>> sol = sde.solve_sde(vp, target.denoiser(vp), x_T, key=jax.random.key(1), dt0=0.01)
    >>> float(sol.ts[-1]) == vp.t_min                                 # times are t, not s
    True
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from jaxdiff._utils import as_time, bcast, is_concrete
from jaxdiff.processes import Process
from jaxdiff.samplers.base import check_sample_input, checked_denoiser, grid_dtype

__all__ = [
    "probability_flow",
    "probability_flow_velocity",
    "reverse_sde",
    "solve_ode",
    "solve_sde",
    "ode_sample",
    "sde_sample",
    "SDE_SOLVERS",
    "BrownianFactory",
    "UnsafePath",
    "VirtualTree",
    "unsafe_path",
    "virtual_tree",
    "InputGuard",
    "solver_input",
    "check_ode_solver",
    "default_stepsize_controller",
]

#: Solver families :func:`solve_sde` accepts (instances of these classes).
SDE_SOLVERS = (
    dfx.Euler,
    dfx.EulerHeun,
    dfx.ReversibleHeun,
    dfx.StratonovichMilstein,
    dfx.AbstractERK,  # Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, Dopri8
    dfx.AbstractSRK,  # SRA1, ShARK, SEA, GeneralShARK, SlowRK, SPaRK
)
_SDE_NAMES = (
    "Euler, EulerHeun, Heun, Midpoint, Ralston, ReversibleHeun, StratonovichMilstein, "
    "SRA1, ShARK, SEA, GeneralShARK, SlowRK, SPaRK (and the explicit RK solvers Bosh3, Tsit5, "
    "Dopri5, Dopri8, which converge to the same solution here)"
)


# --------------------------------------------------------------------------------------------
# Vector fields
# --------------------------------------------------------------------------------------------


def _drift(process: Process, denoise: Callable, x, t, weight):
    r""":math:`f(t)x - w\,g(t)^2\nabla\log p_t(x)`: ``w = 1/2`` the probability flow, ``1`` the
    reverse SDE's drift (the score by Tweedie's formula from the denoiser)."""
    t = as_time(t, x)
    score = process.score_from_x0(x, checked_denoiser(denoise)(x, t), t)
    return (process.drift(x, t) - weight * bcast(process.g2(t), x) * score).astype(x.dtype)


def probability_flow_velocity(process: Process, denoise: Callable, x, t):
    r"""The probability-flow velocity at a batch ``x`` and a time ``t`` (scalar or ``(batch,)``).

    .. math:: v(x, t) = f(t)\,x - \tfrac12 g(t)^2\,\frac{\alpha_t\hat x_0(x, t) - x}{\sigma_t^2}

    (Song et al. 2021, Eq. 13): the vector field of :func:`probability_flow`, shared with
    :mod:`jaxdiff.likelihood`, which takes its divergence.

    Example:
        >>> v = probability_flow_velocity(vp, denoise, x_T, vp.t_max)      # doctest: +SKIP
    """
    return _drift(process, denoise, x, t, 0.5)


class _ProbabilityFlow(eqx.Module):
    process: Process
    denoise: Callable

    def __call__(self, t, x, args):
        return probability_flow_velocity(self.process, self.denoise, x, t)


class _ReverseDrift(eqx.Module):
    """Drift of the reverse SDE in :math:`s = t_0 - t`: :math:`-[f x - g^2\\,score](t_0 - s)`."""

    process: Process
    denoise: Callable
    t0: Any

    def __call__(self, s, x, args):
        return -_drift(self.process, self.denoise, x, self.t0 - s, 1.0)


class _ReverseDiffusion(eqx.Module):
    """Diffusion :math:`g(t_0 - s)\\,I`, a diagonal operator independent of ``x`` (additive)."""

    process: Process
    t0: Any

    def __call__(self, s, x, args):
        g = self.process.diffusion(as_time(self.t0 - s, x)).astype(x.dtype)
        return lx.DiagonalLinearOperator(jnp.broadcast_to(g, jnp.shape(x)))


def probability_flow(process: Process, denoise: Callable) -> dfx.ODETerm:
    r"""The probability-flow ODE as a ``diffrax.ODETerm`` in the time ``t`` of the process.

    .. math:: \frac{dx}{dt} = f(t)\,x - \tfrac12 g(t)^2\,\frac{\alpha_t\hat x_0(x, t) - x}{\sigma_t^2}

    (Song et al. 2021, Eq. 13). The state is a batch ``(batch, ...)``; ``t`` is the scalar solver
    time. Solve it backward (``t0 > t1``) to sample and forward to encode.

    Example:
        >>> term = probability_flow(vp, target.denoiser(vp))               # doctest: +SKIP
        >>> diffrax.diffeqsolve(term, diffrax.Tsit5(), 1.0, 1e-3, -0.01, x_T)  # doctest: +SKIP
    """
    return dfx.ODETerm(_ProbabilityFlow(process, denoise))


def reverse_sde(process: Process, denoise: Callable, brownian, *, t0=None) -> dfx.MultiTerm:
    r"""The reverse SDE as diffrax terms in the forward time :math:`s = t_0 - t`.

    .. math:: dx = -\left[f(t)x - g(t)^2\nabla\log p_t(x)\right]_{t = t_0 - s} ds
        + g(t_0 - s)\,dW_s

    (Anderson 1982; Song et al. 2021, Eq. 6, with time reversed so that diffrax integrates
    forward). Returns ``MultiTerm(ODETerm(drift), ControlTerm(diffusion, brownian))``; the
    diffusion is a ``lineax.DiagonalLinearOperator`` that does not depend on ``x`` (additive
    noise, as SRA1/ShARK/SEA require).

    Args:
        process: the forward process.
        denoise: ``denoise(x, t) -> x0_hat``.
        brownian: a diffrax Brownian path over ``s`` in ``[0, t0 - t1]`` with the shape and
            dtype of the state (e.g. ``diffrax.UnsafeBrownianPath(shape=..., key=...)``).
        t0: the reverse solve's start time in ``t`` (default ``process.t_max``); ``s = 0`` there.

    Example:
        >>> bm = diffrax.UnsafeBrownianPath(jax.ShapeDtypeStruct(x_T.shape, x_T.dtype), key)
        >>> terms = reverse_sde(vp, denoise, bm)                            # doctest: +SKIP
        >>> diffrax.diffeqsolve(terms, diffrax.Euler(), 0.0, vp.t_max - vp.t_min, 1e-3, x_T,
        ...                     adjoint=diffrax.ForwardMode())              # doctest: +SKIP
    """
    t0 = process.t_max if t0 is None else t0
    drift = dfx.ODETerm(_ReverseDrift(process, denoise, t0))
    return dfx.MultiTerm(drift, dfx.ControlTerm(_ReverseDiffusion(process, t0), brownian))


# --------------------------------------------------------------------------------------------
# The state: dtype and non-finite rows
# --------------------------------------------------------------------------------------------


class InputGuard(eqx.Module):
    """What a solve owes its caller's input: its dtype, and NaN in the rows that were not finite.

    ``finite`` is ``None`` when every row is known to be finite (checked eagerly), else a
    ``(batch,)`` boolean mask (under tracing).
    """

    finite: jax.Array | None
    dtype: Any = eqx.field(static=True)

    def mask(self, y):
        """``y`` (batched like the input) with NaN in the rows whose input was not finite."""
        return y if self.finite is None else jnp.where(bcast(self.finite, y), y, jnp.nan)

    def restore(self, y):
        """A solver state back as the caller gave it: :meth:`mask`, in the input's dtype."""
        return self.mask(y).astype(self.dtype)


def _row_finite(x):
    """``(batch,)``: whether every entry of each example is finite (a scalar for a scalar ``x``)."""
    return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def solver_input(x, name: str = "x_T") -> tuple[jax.Array, InputGuard]:
    r"""``x`` as the state of a diffrax solve, and the :class:`InputGuard` that restores outputs.

    - An integer, boolean or complex ``x`` is a ``TypeError`` naming ``name`` and the dtype
      (:func:`jaxdiff.samplers.base.check_sample_input`, as for the samplers).
    - The state is in at least float32: bfloat16 and float16 are promoted (an adaptive step-size
      control cannot work in their precision); ``guard.restore`` casts results back.
    - Non-finite rows (NaN or inf anywhere in an example): eagerly a ``ValueError`` naming them;
      under tracing they are replaced by zeros, so that they cannot stall the step-size control of
      the other rows, and ``guard.restore`` puts NaN back in them.

    Example:
        >>> x, guard = solver_input(x_T.astype(jnp.bfloat16))                # doctest: +SKIP
        >>> x.dtype, guard.restore(x).dtype                                 # doctest: +SKIP
        (dtype('float32'), dtype(bfloat16))
    """
    x = check_sample_input(x, name)
    guard = InputGuard(None, x.dtype)
    x = x.astype(grid_dtype(x))
    finite = _row_finite(x)
    if is_concrete(finite):
        bad = np.flatnonzero(~np.asarray(finite))
        if bad.size:
            shown = ", ".join(map(str, bad[:10])) + (", ..." if bad.size > 10 else "")
            raise ValueError(
                f"{name} is not finite (NaN or inf) in {bad.size} row(s): [{shown}]. A diffrax solve "
                "cannot step through them (its step-size control would stall the whole batch); "
                "drop or fix those rows. Under jax.jit they come back NaN and the other rows are "
                "solved as usual."
            )
        return x, guard
    return jnp.where(bcast(finite, x), x, 0), InputGuard(finite, guard.dtype)


class _SaveFn(eqx.Module):
    """A ``SaveAt`` function given the caller's time and state: ``t = t0 - s`` when the solver
    runs in ``s`` (``t0`` set), and the state restored by the input's guard."""

    fn: Callable
    guard: InputGuard
    t0: Any = None

    def __call__(self, t, y, args):
        t = t if self.t0 is None else self.t0 - t
        return self.fn(t, self.guard.restore(y), args)


def _saveat(saveat, guard: InputGuard, t0=None):
    """The caller's ``SaveAt`` for the solver: saves the restored state; with ``t0`` (the solver
    runs in ``s = t0 - t``) save times ``ts`` in ``t`` become ``t0 - ts``."""
    saveat = dfx.SaveAt(t1=True) if saveat is None else saveat
    if saveat.subs is None:
        return saveat

    def sub(s):
        ts = s.ts if t0 is None or s.ts is None else jnp.asarray(t0) - jnp.asarray(s.ts)
        fn = _SaveFn(s.fn, guard, t0)
        return dfx.SubSaveAt(t0=s.t0, t1=s.t1, ts=ts, steps=s.steps, fn=fn)

    subs = jax.tree.map(sub, saveat.subs, is_leaf=lambda s: isinstance(s, dfx.SubSaveAt))
    return eqx.tree_at(lambda s: s.subs, saveat, subs)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _times(process: Process, t0, t1, controller, *, sde: bool):
    """Defaults (a ``StepTo`` grid's ends, else ``t_max``/``t_min``) and eager range checks."""
    grid = controller.ts if isinstance(controller, dfx.StepTo) else None
    t0 = (process.t_max if grid is None else grid[0]) if t0 is None else t0
    t1 = (process.t_min if grid is None else grid[-1]) if t1 is None else t1
    process.check_t(t0, name="t0")
    process.check_t(t1, name="t1")
    if is_concrete(t0, t1):
        if float(t0) == float(t1):
            raise ValueError(f"t0 and t1 must differ; got t0 = t1 = {float(t0):g}.")
        if sde and float(t0) < float(t1):
            raise ValueError(
                f"solve_sde runs the reverse SDE from noise to data and needs t0 > t1; got "
                f"t0={float(t0):g}, t1={float(t1):g}. To move data towards noise use solve_ode "
                "(the probability-flow ODE runs both ways) or process.sample_marginal."
            )
    return t0, t1


def _is_single_term_solver(solver) -> bool:
    ts = solver.term_structure
    return isinstance(ts, type) and issubclass(ts, dfx.AbstractTerm)


def check_ode_solver(solver) -> None:
    """Raise a ``TypeError`` unless ``solver`` is a diffrax solver of a single ODE term.

    Every such solver is right in both directions of time (a negative ``dt0``), so the
    probability-flow ODE is solved in ``t`` directly; SDE solvers (several terms) are refused.
    """
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(f"solver must be a diffrax solver, e.g. diffrax.Tsit5(); got {solver!r}.")
    if not _is_single_term_solver(solver):
        raise TypeError(
            f"{type(solver).__name__} is not an ODE solver (it expects the terms "
            f"{solver.term_structure}). Use an ODE solver such as diffrax.Tsit5, Dopri5, Dopri8, "
            "Heun, Euler, Bosh3 or Kvaerno5; for the reverse SDE use jaxdiff.sde.solve_sde."
        )


def _check_sde_solver(solver):
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(f"solver must be a diffrax solver, e.g. diffrax.Euler(); got {solver!r}.")
    if isinstance(solver, dfx.ItoMilstein):
        raise TypeError(
            "ItoMilstein is not supported: it materialises the Jacobian of the diffusion over the "
            "whole batch, and with additive noise it reduces to Euler anyway. Supported solvers: "
            f"{_SDE_NAMES}."
        )
    if not isinstance(solver, SDE_SOLVERS):
        raise TypeError(
            f"{type(solver).__name__} cannot solve the reverse SDE (implicit, Langevin-specific "
            f"or split-term solvers are not supported). Supported solvers: {_SDE_NAMES}."
        )


def _levy_area(solver, levy_area=None):
    """The cheapest Brownian increment type that satisfies the solver (or the one asked for)."""
    need = getattr(solver, "minimal_levy_area", dfx.AbstractBrownianIncrement)
    if levy_area is not None:
        if not (isinstance(levy_area, type) and issubclass(levy_area, need)):
            raise ValueError(
                f"{type(solver).__name__} needs a Brownian path with {need.__name__}; got "
                f"levy_area={levy_area!r}. Use diffrax.SpaceTimeLevyArea or leave it None."
            )
        return levy_area
    for kind in (dfx.BrownianIncrement, dfx.SpaceTimeLevyArea, dfx.SpaceTimeTimeLevyArea):
        if issubclass(kind, need):
            return kind
    raise TypeError(f"{type(solver).__name__} needs a Levy area diffrax cannot simulate: {need}.")


def default_stepsize_controller(solver, stepsize_controller=None, dt0=None, rtol=1e-5, atol=1e-5):
    """The step-size controller a solve uses: the one given, else ``PIDController(rtol, atol)``
    for an adaptive solver without ``dt0``, else ``ConstantStepSize`` (which needs ``dt0``)."""
    if stepsize_controller is not None:
        return stepsize_controller
    if isinstance(solver, dfx.AbstractAdaptiveSolver) and dt0 is None:
        return dfx.PIDController(rtol=rtol, atol=atol)
    if dt0 is None:
        raise ValueError(
            f"{type(solver).__name__} has no error estimate, so it needs a fixed step: pass "
            "dt0=... or stepsize_controller=diffrax.StepTo(ts=...)."
        )
    return dfx.ConstantStepSize()


def _cast_step_to(controller, x):
    """A ``StepTo`` grid in the state's dtype (diffrax needs its ends to equal t0 and t1)."""
    if isinstance(controller, dfx.StepTo):
        return dfx.StepTo(ts=as_time(controller.ts, x))
    return controller


def _signed_dt0(dt0, t0, t1):
    """``|dt0|`` with the sign of ``t1 - t0`` (callers may give the step as a magnitude)."""
    if dt0 is None:
        return None
    dt0 = jnp.abs(as_time(dt0, t0))
    return jnp.where(t1 > t0, dt0, -dt0)


def _max_steps(max_steps, controller, dt0, span, default=4096):
    """Enough steps for a fixed-step solve (decided from concrete values), else ``default``."""
    if max_steps is not None:
        return max_steps
    if isinstance(controller, dfx.StepTo):
        return int(np.shape(controller.ts)[0])
    if isinstance(controller, dfx.ConstantStepSize) and is_concrete(dt0, span):
        n = math.ceil(abs(float(span)) / abs(float(dt0)) * (1 + 1e-6)) + 2
        return max(16, 1 << (n - 1).bit_length())  # a power of 2: fewer recompiles
    return default


def _denoise_final(process: Process, denoise: Callable, x, t1):
    r""":math:`\hat x_0 = D(x_{t_1}, t_1)` in ``x``'s dtype, ``t_1`` in at least float32."""
    t1 = process.t_min if t1 is None else t1
    return denoise(x, as_time(t1, grid_dtype(x))).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# ODE
# --------------------------------------------------------------------------------------------


def solve_ode(
    process: Process,
    denoise: Callable,
    x_T,
    *,
    t0=None,
    t1=None,
    solver=dfx.Tsit5(),
    stepsize_controller=None,
    saveat=None,
    dt0=None,
    max_steps=None,
    **kwargs,
) -> dfx.Solution:
    r"""Solve the probability-flow ODE with diffrax, from ``t0`` to ``t1`` (either direction).

    .. math:: \frac{dx}{dt} = f(t)\,x - \tfrac12 g(t)^2\,\nabla\log p_t(x)

    Backward (``t0 > t1``, the default ``t_max -> t_min``) it samples; forward it encodes data
    into noise (Song et al. 2021, Sec. 4.3). The time is the process's ``t`` throughout.

    Args:
        process, denoise: the forward process and ``denoise(x, t) -> x0_hat``.
        x_T: the state at ``t0``, shape ``(batch, ...)``, a floating dtype. bfloat16 and float16
            are solved in float32 (the denoiser sees float32) and the saved states come back in
            ``x_T``'s dtype; rows with NaN or inf are a ``ValueError`` (eagerly) or come back
            NaN without disturbing the other rows (under ``jax.jit``); see the module docstring.
        t0, t1: start and end times in ``[t_min, t_max]`` (defaults ``t_max`` and ``t_min``).
        solver: any diffrax ODE solver (default ``Tsit5``).
        stepsize_controller: default ``PIDController(rtol=1e-5, atol=1e-5)`` for adaptive
            solvers and ``ConstantStepSize`` (with ``dt0``) for the others.
        saveat: ``diffrax.SaveAt`` (default: the final state, ``ys`` of shape ``(1, batch, ...)``).
            Its ``fn`` receives the state in ``x_T``'s dtype. A dense interpolation
            (``dense=True``) is of the solver's own state (at least float32).
        dt0: initial (adaptive) or fixed step size; its magnitude is used, the sign follows
            the direction of integration.
        max_steps: default: exactly enough for a fixed step, 4096 for adaptive steps. diffrax
            raises ``"The maximum number of solver steps was reached"`` when it runs out.
        **kwargs: passed to ``diffrax.diffeqsolve`` (``adjoint``, ``throw``, ``progress_meter``...).

    Returns:
        The ``diffrax.Solution``; ``sol.ys[-1]`` is the state at ``t1``.

    Example:
        >>> sol = solve_ode(vp, denoise, x_T, saveat=diffrax.SaveAt(ts=jnp.linspace(1, 1e-3, 5)))
        >>> sol.ys.shape  # (5, batch, d)                                  # doctest: +SKIP
    """
    t0, t1 = _times(process, t0, t1, stepsize_controller, sde=False)
    check_ode_solver(solver)
    x, guard = solver_input(x_T, "x_T")
    controller = _cast_step_to(default_stepsize_controller(solver, stepsize_controller, dt0), x)
    t0, t1 = as_time(t0, x), as_time(t1, x)  # times in the state's dtype: f32 stays f32
    dt0 = _signed_dt0(dt0, t0, t1)
    return dfx.diffeqsolve(
        probability_flow(process, denoise),
        solver,
        t0,
        t1,
        dt0,
        x,
        saveat=_saveat(saveat, guard),
        stepsize_controller=controller,
        max_steps=_max_steps(max_steps, controller, dt0, t1 - t0),
        **kwargs,
    )


def ode_sample(process: Process, denoise: Callable, x_T, *, denoise_final=True, **kwargs):
    r"""Sample with the probability-flow ODE: the final array of :func:`solve_ode`.

    With ``denoise_final=True`` the state at ``t1`` (default ``t_min``) is mapped to
    :math:`\hat x_0 = D(x_{t_1}, t_1)`, the scan samplers' final step into ``t = 0``.

    Example:
        >>> x0 = ode_sample(vp, denoise, x_T)                               # doctest: +SKIP
    """
    if "saveat" in kwargs:
        raise ValueError("ode_sample returns the final state; use solve_ode for saveat.")
    x = solve_ode(process, denoise, x_T, **kwargs).ys[-1]
    return _denoise_final(process, denoise, x, kwargs.get("t1")) if denoise_final else x


# --------------------------------------------------------------------------------------------
# Brownian paths
# --------------------------------------------------------------------------------------------


class BrownianFactory(eqx.Module):
    """How :func:`solve_sde` draws its Brownian motion: builds a diffrax path for one solve.

    Called as ``factory(t0, t1, shape, *, key, levy_area, step)`` with the solver-time interval
    ``[t0, t1]`` (the reverse SDE runs in ``s``, ``t0 = 0``), the state's
    ``jax.ShapeDtypeStruct``, a PRNG key, the increment type the solver needs and ``step``, the
    finest resolution the solve asks for (its fixed step, or a sixteenth of the first step of an
    adaptive solve). Concrete factories: :class:`UnsafePath`, :class:`VirtualTree`.
    """

    @abc.abstractmethod
    def __call__(self, t0, t1, shape, *, key, levy_area, step) -> dfx.AbstractBrownianPath:
        """The Brownian path of one solve."""


class UnsafePath(BrownianFactory):
    """``diffrax.UnsafeBrownianPath``: fresh increments per step; the fastest, for fixed steps
    only (not adaptive ones), and without reverse-mode gradients (solved with ``ForwardMode``)."""

    def __call__(self, t0, t1, shape, *, key, levy_area, step):
        return dfx.UnsafeBrownianPath(shape=shape, key=key, levy_area=levy_area)


class VirtualTree(BrownianFactory):
    """``diffrax.VirtualBrownianTree`` to tolerance ``tol``: any interval can be queried (adaptive
    steps, reverse-mode gradients) at some cost (tens of times slower than :class:`UnsafePath` on
    CPU). Default ``tol``: a sixteenth of the solve's ``step``, so increments are exact."""

    tol: Any = None

    def __call__(self, t0, t1, shape, *, key, levy_area, step):
        tol = step / 16 if self.tol is None else jnp.asarray(self.tol)  # traced: no recompile
        return dfx.VirtualBrownianTree(t0, t1, tol=tol, shape=shape, key=key, levy_area=levy_area)


def unsafe_path() -> UnsafePath:
    """The fast Brownian motion of fixed-step solves (:class:`UnsafePath`); the default.

    Example:
        >>> solve_sde(vp, denoise, x_T, key=key, brownian=unsafe_path(), dt0=1e-3)  # doctest: +SKIP
    """
    return UnsafePath()


def virtual_tree(tol=None) -> VirtualTree:
    """A queryable Brownian motion (:class:`VirtualTree`) for adaptive steps and gradients.

    Example:
        >>> solve_sde(vp, denoise, x_T, key=key, solver=diffrax.Heun(), brownian=virtual_tree(),
        ...           stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3))  # doctest: +SKIP
    """
    return VirtualTree(tol)


_BROWNIAN_ALIASES = {"unsafe": unsafe_path, "virtual": virtual_tree}


def _brownian_factory(brownian, tol):
    """A deprecated string (``'unsafe'``, ``'virtual'``) and ``brownian_tol`` as a factory."""
    if tol is not None:
        warnings.warn(
            "brownian_tol is deprecated: pass brownian=jaxdiff.sde.virtual_tree(tol=...).",
            DeprecationWarning,
            stacklevel=3,
        )
    if isinstance(brownian, str):
        if brownian not in _BROWNIAN_ALIASES:
            raise ValueError(
                "brownian must be 'unsafe' or 'virtual' if a string (deprecated aliases of "
                "jaxdiff.sde.unsafe_path() and virtual_tree()), a BrownianFactory such as "
                "virtual_tree(tol=1e-4), or a diffrax.AbstractBrownianPath over s in "
                f"[0, t0 - t1]; got {brownian!r}."
            )
        warnings.warn(
            f"brownian={brownian!r} is deprecated: pass brownian=jaxdiff.sde.{brownian}_"
            f"{'path' if brownian == 'unsafe' else 'tree'}().",
            DeprecationWarning,
            stacklevel=3,
        )
        brownian = _BROWNIAN_ALIASES[brownian]()
    if tol is not None and isinstance(brownian, VirtualTree) and brownian.tol is None:
        brownian = VirtualTree(tol)
    return brownian


def _brownian(brownian, solver, shape, key, span, step, levy_area):
    """The diffrax path of one solve: the caller's own path, or one built by the factory."""
    if isinstance(brownian, dfx.AbstractBrownianPath):  # the caller's own path, in s
        _levy_area(solver, brownian.levy_area)
        return brownian
    if not isinstance(brownian, BrownianFactory):
        raise TypeError(
            "brownian must be a BrownianFactory (jaxdiff.sde.unsafe_path(), virtual_tree()) or a "
            f"diffrax.AbstractBrownianPath; got {brownian!r}."
        )
    if key is None:
        raise ValueError("solve_sde draws a Brownian motion: pass key=jax.random.key(seed).")
    levy = _levy_area(solver, levy_area)
    return brownian(0.0, span, shape, key=key, levy_area=levy, step=step)


# --------------------------------------------------------------------------------------------
# SDE
# --------------------------------------------------------------------------------------------


def _check_saveat_in_t(saveat, t0, t1):
    """The ``SaveAt``s :func:`solve_sde` can rewrite in ``s``: flat, not dense, ts in [t1, t0]."""
    if saveat is None:
        return
    sub = saveat.subs
    if saveat.dense or not isinstance(sub, dfx.SubSaveAt):
        raise ValueError(
            "solve_sde supports SaveAt(t0=..., t1=..., ts=..., steps=..., fn=...) without "
            "dense=True or nested SubSaveAts (the solver runs in s = t0 - t, so a dense "
            "interpolation would be in s). Save the times you need with SaveAt(ts=...)."
        )
    if sub.ts is not None and is_concrete(sub.ts):
        a = np.asarray(sub.ts, np.float64)
        lo, hi = float(t1), float(t0)
        if np.any(np.diff(a) > 0) or a.min() < lo - 1e-9 * hi or a.max() > hi * (1 + 1e-9):
            raise ValueError(
                f"SaveAt(ts=...) must be non-increasing times in [t1, t0] = [{lo:g}, {hi:g}] "
                f"(the reverse SDE runs from t0 down to t1); got {a}."
            )


def _controller_in_s(controller, t0):
    """A ``StepTo`` grid given in ``t`` (decreasing) becomes one in ``s`` (increasing)."""
    if isinstance(controller, dfx.StepTo):
        return dfx.StepTo(ts=jnp.asarray(t0) - jnp.asarray(controller.ts))
    if isinstance(controller, dfx.ClipStepSizeController):
        flip = lambda ts: None if ts is None else jnp.sort(jnp.asarray(t0) - jnp.asarray(ts))
        return dfx.ClipStepSizeController(
            controller.controller,
            step_ts=flip(controller.step_ts),
            jump_ts=flip(controller.jump_ts),
        )
    return controller


def _solution_in_t(sol: dfx.Solution, t0) -> dfx.Solution:
    """Times of a solution in ``s`` back to ``t = t0 - s`` (padding ``inf`` stays ``inf``)."""
    to_t = lambda s: jnp.where(jnp.isfinite(s), t0 - s, s).astype(s.dtype)
    sol = eqx.tree_at(lambda r: (r.t0, r.t1), sol, (to_t(sol.t0), to_t(sol.t1)))
    if sol.ts is not None:
        sol = eqx.tree_at(lambda r: r.ts, sol, to_t(sol.ts))
    return sol


def solve_sde(
    process: Process,
    denoise: Callable,
    x_T,
    *,
    key=None,
    t0=None,
    t1=None,
    solver=dfx.Euler(),
    dt0=None,
    stepsize_controller=None,
    saveat=None,
    brownian=UnsafePath(),
    brownian_tol=None,
    levy_area=None,
    adjoint=None,
    max_steps=None,
    **kwargs,
) -> dfx.Solution:
    r"""Sample by solving the reverse SDE with diffrax, from ``t0`` down to ``t1 < t0``.

    .. math:: dx = \left[f(t)x - g(t)^2\nabla\log p_t(x)\right]dt + g(t)\,d\bar W_t

    (Anderson 1982; Song et al. 2021, Eq. 6). Internally diffrax integrates **forward** in
    :math:`s = t_0 - t` (see :func:`reverse_sde`), which is what makes SRA1, ShARK and SEA
    correct; the returned solution's ``t0``, ``t1`` and ``ts`` are converted back to ``t``
    (``sol.ts`` decreases from ``t0`` to ``t1``). Times you pass (``saveat`` ts and fn, a
    ``StepTo`` grid, ``ClipStepSizeController`` step/jump times) are in ``t`` too; ``dt0`` is a
    positive step size. ``SaveAt(dense=True)`` is refused (the interpolation would be in ``s``).

    Args:
        process, denoise: the forward process and ``denoise(x, t) -> x0_hat``.
        x_T: the state at ``t0``, shape ``(batch, ...)``; dtypes and non-finite rows as in
            :func:`solve_ode` (bfloat16/float16 solved in float32, NaN rows refused eagerly).
        key: PRNG key of the Brownian motion (required unless ``brownian`` is a path).
        t0, t1: ``t_max`` and ``t_min`` by default; ``t0 > t1``.
        solver: default ``Euler()`` (Euler--Maruyama); any of :data:`SDE_SOLVERS`.
        dt0: fixed step size, default ``(t0 - t1) / 1000``; for adaptive controllers the first step.
        stepsize_controller: default ``ConstantStepSize``; ``StepTo(ts)`` with a decreasing grid
            in ``t`` (e.g. from :mod:`jaxdiff.schedules`, without the final 0); an adaptive
            controller needs ``brownian=virtual_tree()``.
        saveat: ``SaveAt`` in ``t`` (default the final state: ``ys`` of shape ``(1, batch, ...)``).
        brownian: a :class:`BrownianFactory`: :func:`unsafe_path` (default; fixed steps only, no
            reverse-mode gradients) or :func:`virtual_tree` (any steps; default tolerance a
            sixteenth of ``dt0`` or of the smallest ``StepTo`` step, ``dt0 / 256`` with adaptive
            steps); or your own ``diffrax.AbstractBrownianPath`` over the solver time ``s`` in
            ``[0, t0 - t1]`` (then ``key`` and ``levy_area`` are unused). The strings
            ``"unsafe"`` and ``"virtual"`` are deprecated aliases of the two factories.
        brownian_tol: deprecated; use ``virtual_tree(tol=...)``.
        levy_area: the Brownian path's increment type (default: the least the solver needs).
            The path depends on it, so give two solvers the same ``key``,
            ``brownian=virtual_tree()`` and ``levy_area=diffrax.SpaceTimeLevyArea`` to solve on
            the same Brownian path.
        adjoint: default ``ForwardMode()`` for an ``UnsafeBrownianPath`` and diffrax's default
            otherwise.
        max_steps: default: exactly enough for fixed steps, else 16384.
        **kwargs: passed to ``diffrax.diffeqsolve``.

    Example:
        >>> sol = solve_sde(vp, denoise, x_T, key=key, solver=diffrax.ShARK(), dt0=0.01)
        >>> sol.ys[-1].shape == x_T.shape                                  # doctest: +SKIP
    """
    t0, t1 = _times(process, t0, t1, stepsize_controller, sde=True)
    _check_sde_solver(solver)
    _check_saveat_in_t(saveat, t0, t1)
    brownian = _brownian_factory(brownian, brownian_tol)
    x, guard = solver_input(x_T, "x_T")
    t0 = as_time(t0, x)  # times in the state's dtype: float32 stays float32
    controller = dfx.ConstantStepSize() if stepsize_controller is None else stepsize_controller
    controller = _controller_in_s(_cast_step_to(controller, x), t0)
    span = controller.ts[-1] if isinstance(controller, dfx.StepTo) else t0 - as_time(t1, x)
    if isinstance(controller, dfx.StepTo):
        dt0, step = None, jnp.min(jnp.diff(controller.ts))
    else:
        dt0 = jnp.abs(as_time(span / 1000 if dt0 is None else dt0, x))
        adaptive = isinstance(controller, dfx.AbstractAdaptiveStepSizeController)
        step = dt0 / 16 if adaptive else dt0
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    bm = _brownian(brownian, solver, shape, key, span, step, levy_area)
    unsafe = isinstance(bm, dfx.UnsafeBrownianPath)
    if unsafe and isinstance(controller, dfx.AbstractAdaptiveStepSizeController):
        raise ValueError(
            "Adaptive step sizes need a Brownian path that can be queried on any interval: pass "
            "brownian=jaxdiff.sde.virtual_tree() (formerly brownian='virtual'), or use fixed steps."
        )
    if adjoint is None:
        adjoint = dfx.ForwardMode() if unsafe else dfx.RecursiveCheckpointAdjoint()
    sol = dfx.diffeqsolve(
        reverse_sde(process, denoise, bm, t0=t0),
        solver,
        0.0,
        span,
        dt0,
        x,
        saveat=_saveat(saveat, guard, t0),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=_max_steps(max_steps, controller, dt0, span, default=16384),
        **kwargs,
    )
    return _solution_in_t(sol, t0)


def sde_sample(process: Process, denoise: Callable, x_T, *, key, denoise_final=True, **kwargs):
    r"""Sample with the reverse SDE: the final array of :func:`solve_sde`.

    With ``denoise_final=True`` the state at ``t1`` (default ``t_min``) is mapped to
    :math:`\hat x_0 = D(x_{t_1}, t_1)`, the scan samplers' final step into ``t = 0``.

    Example:
        >>> x0 = sde_sample(vp, denoise, x_T, key=key, dt0=1e-3)            # doctest: +SKIP
    """
    if "saveat" in kwargs:
        raise ValueError("sde_sample returns the final state; use solve_sde for saveat.")
    x = solve_sde(process, denoise, x_T, key=key, **kwargs).ys[-1]
    return _denoise_final(process, denoise, x, kwargs.get("t1")) if denoise_final else x
