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

import math
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

__all__ = [
    "probability_flow",
    "reverse_sde",
    "solve_ode",
    "solve_sde",
    "ode_sample",
    "sde_sample",
    "SDE_SOLVERS",
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


def _score(process: Process, denoise: Callable, x, t):
    r"""Tweedie: :math:`(\alpha_t\hat x_0 - x)/\sigma_t^2`."""
    return (bcast(process.alpha(t), x) * denoise(x, t) - x) / bcast(process.sigma(t), x) ** 2


def _pf_velocity(process: Process, denoise: Callable, x, t):
    r"""Probability-flow velocity :math:`f x - \tfrac12 g^2\nabla\log p_t(x)`."""
    t = as_time(t, x)
    score = _score(process, denoise, x, t)
    v = bcast(process.f(t), x) * x - 0.5 * bcast(process.g2(t), x) * score
    return v.astype(x.dtype)


class _ProbabilityFlow(eqx.Module):
    process: Process
    denoise: Callable

    def __call__(self, t, x, args):
        return _pf_velocity(self.process, self.denoise, x, t)


class _ReverseDrift(eqx.Module):
    """Drift of the reverse SDE in :math:`s = t_0 - s`: :math:`-[f x - g^2\\,score](t_0 - s)`."""

    process: Process
    denoise: Callable
    t0: Any

    def __call__(self, s, x, args):
        t = as_time(self.t0 - s, x)
        score = _score(self.process, self.denoise, x, t)
        drift = bcast(self.process.f(t), x) * x - bcast(self.process.g2(t), x) * score
        return (-drift).astype(x.dtype)


class _ReverseDiffusion(eqx.Module):
    """Diffusion :math:`g(t_0 - s)\\,I`, a diagonal operator independent of ``x`` (additive)."""

    process: Process
    t0: Any

    def __call__(self, s, x, args):
        t = as_time(self.t0 - s, x)
        g = jnp.sqrt(jnp.maximum(self.process.g2(t), 0.0)).astype(x.dtype)
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


def _check_ode_solver(solver):
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


def _controller(solver, stepsize_controller, dt0, rtol=1e-5, atol=1e-5):
    """Default step-size control: PID for adaptive solvers, fixed ``dt0`` otherwise."""
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
        x_T: the state at ``t0``, shape ``(batch, ...)``.
        t0, t1: start and end times in ``[t_min, t_max]`` (defaults ``t_max`` and ``t_min``).
        solver: any diffrax ODE solver (default ``Tsit5``).
        stepsize_controller: default ``PIDController(rtol=1e-5, atol=1e-5)`` for adaptive
            solvers and ``ConstantStepSize`` (with ``dt0``) for the others.
        saveat: ``diffrax.SaveAt`` (default: the final state, ``ys`` of shape ``(1, batch, ...)``).
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
    _check_ode_solver(solver)
    x_T = jnp.asarray(x_T)
    controller = _cast_step_to(_controller(solver, stepsize_controller, dt0), x_T)
    t0, t1 = as_time(t0, x_T), as_time(t1, x_T)  # times in the state's dtype: f32 stays f32
    dt0 = _signed_dt0(dt0, t0, t1)
    return dfx.diffeqsolve(
        probability_flow(process, denoise),
        solver,
        t0,
        t1,
        dt0,
        x_T,
        saveat=dfx.SaveAt(t1=True) if saveat is None else saveat,
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
    t1 = process.t_min if kwargs.get("t1") is None else kwargs["t1"]
    return denoise(x, as_time(t1, x)) if denoise_final else x


# --------------------------------------------------------------------------------------------
# SDE
# --------------------------------------------------------------------------------------------


class _SaveInT(eqx.Module):
    """A ``SaveAt(fn=...)`` function called with ``t = t0 - s`` instead of ``s``."""

    fn: Callable
    t0: Any

    def __call__(self, s, y, args):
        return self.fn(self.t0 - s, y, args)


def _saveat_in_s(saveat, t0, t1):
    """Rewrite a ``SaveAt`` given in ``t`` into the solver time ``s = t0 - t``."""
    if saveat is None:
        return dfx.SaveAt(t1=True)
    sub = saveat.subs
    if saveat.dense or not isinstance(sub, dfx.SubSaveAt):
        raise ValueError(
            "solve_sde supports SaveAt(t0=..., t1=..., ts=..., steps=..., fn=...) without "
            "dense=True or nested SubSaveAts (the solver runs in s = t0 - t, so a dense "
            "interpolation would be in s). Save the times you need with SaveAt(ts=...)."
        )
    ts = sub.ts
    if ts is not None:
        if is_concrete(ts):
            a = np.asarray(ts, np.float64)
            lo, hi = float(t1), float(t0)
            if np.any(np.diff(a) > 0) or a.min() < lo - 1e-9 * hi or a.max() > hi * (1 + 1e-9):
                raise ValueError(
                    f"SaveAt(ts=...) must be non-increasing times in [t1, t0] = [{lo:g}, {hi:g}] "
                    f"(the reverse SDE runs from t0 down to t1); got {a}."
                )
        ts = jnp.asarray(t0) - jnp.asarray(ts)
    return dfx.SaveAt(
        t0=sub.t0,
        t1=sub.t1,
        ts=ts,
        steps=sub.steps,
        fn=_SaveInT(sub.fn, t0),
        solver_state=saveat.solver_state,
        controller_state=saveat.controller_state,
        made_jump=saveat.made_jump,
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


def _brownian(kind, solver, shape, key, span, dt0, tol, levy_area, controller):
    if isinstance(kind, dfx.AbstractBrownianPath):  # the caller's own path, in s
        _levy_area(solver, kind.levy_area)
        return kind
    levy = _levy_area(solver, levy_area)
    if kind == "unsafe":
        return dfx.UnsafeBrownianPath(shape=shape, key=key, levy_area=levy)
    if kind == "virtual":
        if tol is None:  # well below the smallest step, so that increments are exact
            step = jnp.abs(dt0) if dt0 is not None else jnp.min(jnp.diff(controller.ts))
            adaptive = isinstance(controller, dfx.AbstractAdaptiveStepSizeController)
            tol = step / (256 if adaptive else 16)
        return dfx.VirtualBrownianTree(0.0, span, tol=tol, shape=shape, key=key, levy_area=levy)
    raise ValueError(
        f"brownian must be 'unsafe' (UnsafeBrownianPath: fixed steps, fastest) or 'virtual' "
        f"(VirtualBrownianTree: adaptive steps, reverse-mode gradients) or a "
        f"diffrax.AbstractBrownianPath over s in [0, t0 - t1]; got {kind!r}."
    )


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
    brownian="unsafe",
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
        x_T: the state at ``t0``, shape ``(batch, ...)``.
        key: PRNG key of the Brownian motion (required unless ``brownian`` is a path).
        t0, t1: ``t_max`` and ``t_min`` by default; ``t0 > t1``.
        solver: default ``Euler()`` (Euler--Maruyama); any of :data:`SDE_SOLVERS`.
        dt0: fixed step size, default ``(t0 - t1) / 1000``; for adaptive controllers the first step.
        stepsize_controller: default ``ConstantStepSize``; ``StepTo(ts)`` with a decreasing grid
            in ``t`` (e.g. from :mod:`jaxdiff.schedules`, without the final 0); an adaptive
            controller needs ``brownian="virtual"``.
        saveat: ``SaveAt`` in ``t`` (default the final state: ``ys`` of shape ``(1, batch, ...)``).
        brownian: ``"unsafe"`` (``UnsafeBrownianPath``, fast, fixed steps only, no reverse-mode
            gradients) or ``"virtual"`` (``VirtualBrownianTree``, tolerance ``brownian_tol``,
            default a sixteenth of ``dt0`` or of the smallest ``StepTo`` step, and ``dt0 / 256``
            with adaptive steps), or your own ``diffrax.AbstractBrownianPath`` over the solver
            time ``s`` in ``[0, t0 - t1]`` (then ``key``, ``brownian_tol`` and ``levy_area`` are
            unused).
        levy_area: the Brownian path's increment type (default: the least the solver needs).
            The path depends on it, so give two solvers the same ``key``, ``brownian="virtual"``
            and ``levy_area=diffrax.SpaceTimeLevyArea`` to solve on the same Brownian path.
        adjoint: default ``ForwardMode()`` for ``"unsafe"`` and diffrax's default otherwise.
        max_steps: default: exactly enough for fixed steps, else 16384.
        **kwargs: passed to ``diffrax.diffeqsolve``.

    Example:
        >>> sol = solve_sde(vp, denoise, x_T, key=key, solver=diffrax.ShARK(), dt0=0.01)
        >>> sol.ys[-1].shape == x_T.shape                                  # doctest: +SKIP
    """
    t0, t1 = _times(process, t0, t1, stepsize_controller, sde=True)
    _check_sde_solver(solver)
    x_T = jnp.asarray(x_T)
    t0 = as_time(t0, x_T)  # times in the state's dtype: float32 stays float32
    controller = dfx.ConstantStepSize() if stepsize_controller is None else stepsize_controller
    controller = _controller_in_s(_cast_step_to(controller, x_T), t0)
    span = controller.ts[-1] if isinstance(controller, dfx.StepTo) else t0 - as_time(t1, x_T)
    if isinstance(controller, dfx.StepTo):
        dt0 = None
    elif dt0 is None:
        dt0 = span / 1000
    adaptive = isinstance(controller, dfx.AbstractAdaptiveStepSizeController)
    if adaptive and isinstance(brownian, str) and brownian == "unsafe":
        raise ValueError(
            "Adaptive step sizes need a Brownian path that can be queried on any interval: "
            "pass brownian='virtual' (VirtualBrownianTree), or use fixed steps."
        )
    if key is None and isinstance(brownian, str):
        raise ValueError("solve_sde draws a Brownian motion: pass key=jax.random.key(seed).")
    shape = jax.ShapeDtypeStruct(x_T.shape, x_T.dtype)
    bm = _brownian(brownian, solver, shape, key, span, dt0, brownian_tol, levy_area, controller)
    if adjoint is None:
        unsafe = isinstance(bm, dfx.UnsafeBrownianPath)
        adjoint = dfx.ForwardMode() if unsafe else dfx.RecursiveCheckpointAdjoint()
    dt0 = None if dt0 is None else jnp.abs(as_time(dt0, x_T))
    sol = dfx.diffeqsolve(
        reverse_sde(process, denoise, bm, t0=t0),
        solver,
        0.0,
        span,
        dt0,
        x_T,
        saveat=_saveat_in_s(saveat, t0, t1),
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
    t1 = process.t_min if kwargs.get("t1") is None else kwargs["t1"]
    return denoise(x, as_time(t1, x)) if denoise_final else x
