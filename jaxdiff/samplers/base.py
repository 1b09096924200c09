r"""The sampler protocol and the one engine that runs every sampler: ``jaxdiff.sample``.

A sampler is an immutable pytree (an ``eqx.Module``, the pattern of diffrax's solvers) that holds
its process and hyperparameters as fields and defines

- ``init(x_T, ts) -> state``: the sampler's own state (a NamedTuple declared beside it, multistep
  history lives here; :class:`EmptyState` for samplers without one),
- ``step(denoise, x, state, ts, i, key) -> (x_next, state, x0_hat, nfe)``: one step from ``ts[i]``
  to ``ts[i + 1]``; ``x0_hat`` is the denoiser output at ``(x, ts[i])`` (the denoising trajectory)
  and ``nfe`` the number of denoiser calls it made,
- ``final(denoise, x, state, ts, key) -> x0_hat``: the last step of a grid that ends at 0 (the
  EDM / k-diffusion convention: return the denoiser's output, one evaluation). Written once here;
  wrappers such as inpainting override it.
- optionally ``coefficients(ts, i)``: the numbers of step ``i`` that depend on the grid only
  (a NamedTuple of arrays). :func:`sample` computes them for all steps in one vectorized pass
  before the scan and calls ``step(..., coef=row)``; ``step`` computes them itself when
  ``coef`` is ``None`` (a wrapper calling it directly). The multistep and singlestep
  DPM-Solver++ and UniPC have them: the loop then runs only the array arithmetic, which on a
  cheap denoiser is what a step costs beyond its denoiser call.
- optionally ``split_first_step() -> (first_denoise, sampler) | None``: a first step that uses
  another denoiser (AFS's analytic one, ``afs=True``); :func:`sample` runs it before the scan
  and the other steps with the returned sampler, so no step of the loop tests whether it is
  the first.

Lowercase factories (``ddim(process, eta=0.0)``, ...) build them. Equal settings give equal,
hashable samplers. Numeric hyperparameters are pytree leaves (Python floats, so equal settings
hash equal); :func:`sample` turns them into traced arrays, so changing ``eta``, ``churn``, a
process's ``beta_max`` or a grid's values never recompiles; integers that fix the program's
shape (``order``) are static fields. A sampler passes through ``jax.jit`` as an argument.

``sample`` runs the steps as one ``jax.lax.scan``. Whether the grid ends at 0 is decided at run
time (``lax.cond``), so a grid of the same length never recompiles, whatever its values.

dtypes: ``x`` keeps its dtype through every step (bf16 and f16 included); the grid and every
coefficient are computed in at least float32; an integer or boolean ``x_T`` is a ``TypeError``.
A denoiser whose output is not shaped like ``x`` is a ``ValueError`` at trace time.

Example:
    >>> import jax, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> ts = jaxdiff.schedules.uniform(vp, 10)
    >>> x_T = vp.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(jaxdiff.samplers.ddim(vp), target.denoiser(vp), x_T, ts)
    >>> res.x.shape, int(res.nfe)
    ((4, 2), 10)
    >>> jaxdiff.samplers.ddim(vp) == jaxdiff.samplers.ddim(vp)
    True
"""

import abc
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox import AbstractVar

from jaxdiff._utils import check_like_x, is_concrete
from jaxdiff.processes import Process

__all__ = [
    "Sampler",
    "SampleResult",
    "EmptyState",
    "OneCallSampler",
    "sample",
    "check_grid",
    "check_sample_input",
    "checked_denoiser",
    "grid_dtype",
    "lift",
    "run",
    "normal_like",
    "step_noise",
]


class EmptyState(NamedTuple):
    """The state of a sampler without history (optax's ``EmptyState``)."""


class Sampler(eqx.Module):
    """Abstract sampler: ``init``, ``step`` and ``nfe_per_step``; ``final`` is written here.

    Subclasses are small final classes holding ``process`` and their hyperparameters.
    """

    process: AbstractVar[Process]

    @abc.abstractmethod
    def init(self, x_T, ts):
        """The initial state for a run from ``x_T`` over ``ts``."""

    @abc.abstractmethod
    def step(self, denoise, x, state, ts, i, key):
        """One step ``ts[i] -> ts[i + 1]``: ``(x_next, state, x0_hat, nfe)``."""

    def coefficients(self, ts, i):
        """The numbers of step ``i`` that depend only on the grid, not on ``x`` (optional).

        ``None`` by default. A sampler that overrides it takes them as ``step(..., coef=...)``
        (and computes them itself when ``coef`` is ``None``): :func:`sample` then computes them
        for every step in one vectorized pass before its scan, so the loop runs only the
        array arithmetic (on a cheap denoiser, the scalar work of a multistep method inside
        the loop is a visible share of each step). Wrappers that call ``step`` directly, with a
        grid of their own, get ``coef=None`` and the same numbers.
        """
        return None

    def split_first_step(self):
        """``(first_denoise, sampler)`` when the first step uses another denoiser (optional).

        ``None`` by default. A sampler whose first denoiser call is replaced by an analytic
        approximation (AFS, ``afs=True``) returns the approximation, ``first_denoise(x, t)``
        (no network call: :func:`sample` counts no evaluation for it), and the same sampler
        without that switch: :func:`sample` then runs the first step outside the scan and the
        others with no per-step test of whether they are the first.
        """
        return None

    def check(self, ts):
        """Eager checks of a concrete grid against this sampler's settings (a ``ValueError``).

        :func:`sample` calls it before compiling; by default there is nothing to check.
        """

    def final(self, denoise, x, state, ts, key):
        r"""The last step of a grid ending at 0: :math:`\hat x_0 = D(x, t_{n-1})` (one NFE)."""
        return denoise(x, ts[-2])

    @property
    def nfe_per_step(self) -> int:
        """Denoiser calls per ordinary step (the final step into 0 costs 1)."""
        return 1

    @property
    def noise_scale(self):
        """The hyperparameter that switches this sampler's noise on (``eta``, ``churn``), if any.

        ``None`` (the default) for samplers whose randomness does not depend on a setting.
        """
        return None

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws noise (then :func:`sample` needs a ``key``).

        With a ``noise_scale``: unless that scale is concretely 0 (a traced one may not be).
        """
        scale = self.noise_scale
        return scale is not None and not is_zero(scale)

    @property
    def needs_key(self) -> bool:
        """Whether :func:`sample` insists on a ``key``: the sampler is known to draw noise.

        Equal to ``stochastic`` except where the noise scale (``ddim``'s ``eta``, ``heun``'s
        ``churn``) is traced by an outer ``jax.jit``: then whether noise is drawn is unknown at
        trace time, and a missing key means ``jax.random.key(0)``.
        """
        scale = self.noise_scale
        if scale is None:
            return self.stochastic
        return is_concrete(scale) and not is_zero(scale)

    @property
    def name(self) -> str:
        """A short readable name for messages and tables."""
        return type(self).__name__.lower()

    def nfe(self, n: int) -> int:
        """Exact NFE of ``n`` steps on a grid that ends at 0: ``(n - 1) * nfe_per_step + 1``."""
        return (n - 1) * self.nfe_per_step + 1

    def steps_for_nfe(self, target: int) -> int:
        """Grid steps ``n >= 2`` whose NFE ``(n - 1) * nfe_per_step + 1`` is nearest ``target``.

        Ties go to the smaller ``n``: DPM-Solver-3 (3 per step) at 10 gets ``n = 4`` (NFE 10),
        at 5 ``n = 2`` (NFE 4, not 7).
        """
        per = self.nfe_per_step
        lo = max(2, (int(target) - 1) // per + 1)
        return min((max(2, lo - 1), lo, lo + 1), key=lambda n: (abs(self.nfe(n) - target), n))


class OneCallSampler(Sampler):
    r"""Abstract sampler of one denoiser call per step and no history.

    A subclass gives ``update(x, x0_hat, t, s, key) -> x_s``, the move from ``t`` to ``s`` once
    :math:`\hat x_0 = D(x, t)` is known (DDIM, DDPM, Euler, Euler-Maruyama).
    """

    def init(self, x_T, ts):
        return EmptyState()

    def step(self, denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]
        x0_hat = denoise(x, t)
        return self.update(x, x0_hat, t, s, key), state, x0_hat, 1

    @abc.abstractmethod
    def update(self, x, x0_hat, t, s, key):
        r"""The move from ``(x, t)`` to ``s`` given :math:`\hat x_0`."""


def is_zero(value) -> bool:
    """True when ``value`` is concretely 0 (a traced hyperparameter is never known to be 0)."""
    return is_concrete(value) and float(np.asarray(value)) == 0.0


class SampleResult(NamedTuple):
    """Output of :func:`sample`.

    Attributes:
        x: the final sample, shaped like ``x_T``.
        xs: the sampling trajectory ``(len(ts), *x.shape)`` (``xs[0] = x_T``), or ``None``.
        denoised: the denoising trajectory ``(len(ts) - 1, *x.shape)``: ``x0_hat`` at each
            ``(xs[i], ts[i])``, or ``None``.
        nfe: the exact number of denoiser evaluations (an integer array).
    """

    x: jax.Array
    xs: jax.Array | None
    denoised: jax.Array | None
    nfe: jax.Array


def check_grid(ts, process=None):
    """Eagerly validate a concrete time grid: 1-D, length >= 2, strictly decreasing, in range."""
    if not is_concrete(ts):
        return
    a = np.asarray(ts, dtype=np.float64)
    if a.ndim != 1 or a.shape[0] < 2:
        raise ValueError(
            f"ts must be a 1-D grid with at least 2 times (t_max ... [0]); got shape {a.shape}. "
            "Build one with jaxdiff.schedules, e.g. schedules.karras(process, n)."
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"ts contains NaN or inf: {a}.")
    if not np.all(np.diff(a) < 0):
        raise ValueError(
            f"ts must be strictly decreasing (time runs from noise at t_max down to data at 0); "
            f"got {a}. Reverse it with ts[::-1] if it is increasing."
        )
    if process is not None and is_concrete(process):
        body = a[:-1] if a[-1] == 0 else a
        lo, hi = float(process.t_min), float(process.t_max)
        if body.min() < lo * (1 - 1e-6) or body.max() > hi * (1 + 1e-6):
            raise ValueError(
                f"ts must lie in [t_min, t_max] = [{lo:g}, {hi:g}] of {type(process).__name__} "
                f"(a final 0 is allowed); got range [{body.min():g}, {body.max():g}]."
            )


def check_sample_input(x, name="x_T"):
    """``x`` as an array; an integer or boolean dtype is a ``TypeError`` naming ``name``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float32, float64, bfloat16 or float16); got "
            f"dtype {x.dtype}. Convert it, e.g. {name}.astype(jnp.float32)."
        )
    return x


def grid_dtype(x):
    """The dtype of times and coefficients for a state ``x``: ``x``'s dtype, at least float32.

    bf16/f16 states get float32 grids (in bf16, 0.999 rounds to 1.0); float32 and float64 states
    get grids of their own dtype.
    """
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def checked_denoiser(denoise: Callable) -> Callable:
    """``denoise`` with its output shape checked against ``x`` at trace time (``ValueError``)."""

    def checked(x, t):
        who = f"the denoiser {_describe(denoise)}"
        hint = " For a network, check its output channels (jaxdiff.denoiser checks it too)."
        return check_like_x(denoise(x, t), x, who, hint)

    return checked


def _describe(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def lift(tree):
    """Python-float leaves of a sampler (hyperparameters, process fields) as traced-ready arrays.

    A float leaf would be static under ``eqx.filter_jit`` (a recompile per value); as a weakly
    typed array it is traced, so new values reuse the compiled program.
    """
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v) if type(v) is float else v, tree)


def normal_like(key, x):
    """A standard normal draw shaped like ``x``, in at least float32.

    Noise never depends on ``x``'s dtype: a bf16 run draws the same numbers as a float32 run
    (then rounds the result), so the two stay close step by step.
    """
    return jax.random.normal(key, jnp.shape(x), grid_dtype(x))


def step_noise(key, x, on):
    """A standard normal draw shaped like ``x``, or zeros when ``on`` is false (``lax.cond``).

    Lets a sampler whose noise scale is a traced hyperparameter (``eta``, ``churn``) keep one
    compiled program for every value while drawing no noise where the scale is 0.
    """
    return jax.lax.cond(on, lambda: normal_like(key, x), lambda: jnp.zeros(x.shape, grid_dtype(x)))


def sample(
    sampler: Sampler,
    denoise: Callable,
    x_T,
    ts,
    *,
    key=None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""Run ``sampler`` over the decreasing grid ``ts`` from ``x_T``, as one ``jax.lax.scan``.

    Args:
        sampler: from a factory in :mod:`jaxdiff.samplers`.
        denoise: ``denoise(x, t) -> x0_hat``. Pass a pytree (an ``eqx.Module``, a
            ``jax.tree_util.Partial``) to keep its arrays traced; a plain function is static.
        x_T: the starting point, e.g. ``process.prior_sample(shape, key=...)``; a floating dtype,
            kept through every step.
        ts: ``n + 1`` decreasing times; a last entry 0 means the last step returns ``x0_hat``.
        key: PRNG key, required by stochastic samplers; folded with the step index.
        save_trajectory: also return the sampling and denoising trajectories.

    Returns:
        ``SampleResult(x, xs, denoised, nfe)``.
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(
            f"sampler must be a jaxdiff Sampler (from a factory such as "
            f"jaxdiff.samplers.ddim(process)); got {type(sampler).__name__}."
        )
    x_T = check_sample_input(x_T)
    ts = jnp.asarray(ts)
    check_grid(ts, sampler.process)
    if is_concrete(ts):
        sampler.check(np.asarray(ts, np.float64))
    if key is None:
        if sampler.needs_key:
            raise ValueError(f"{sampler.name} is stochastic: pass key=jax.random.key(seed).")
        key = jax.random.key(0)
    return run(sampler, denoise, x_T, ts, key=key, save_trajectory=save_trajectory)


def run(sampler: Sampler, denoise: Callable, x_T, ts, *, key, save_trajectory: bool = False):
    """The engine behind :func:`sample`, without its eager checks: any monotone grid.

    Runs ``sampler.step`` over every step of ``ts`` as one compiled ``lax.scan`` (the last step
    of a grid ending at 0 is ``sampler.final``). :func:`jaxdiff.editing.encode` runs it over an
    increasing grid (DDIM inversion); :func:`sample` over a checked decreasing one.
    """
    x_T = check_sample_input(x_T)
    ts = jnp.asarray(ts).astype(grid_dtype(x_T))
    return _run(lift(sampler), denoise, x_T, ts, key, save_trajectory)


@eqx.filter_jit
def _run(sampler, denoise, x_T, ts, key, save_trajectory):
    denoise = checked_denoiser(denoise)
    n, dtype = ts.shape[0] - 1, x_T.dtype

    table = _coefficient_table(sampler, ts)

    def body(carry, i):
        x, state = carry
        x_next, state, x0, nfe = _ordinary(sampler, denoise, x, state, ts, i, key, table)
        out = (x_next, x0) if save_trajectory else None
        return (x_next, state), (out, nfe)

    if n == 0:  # a one-point grid (encode's when it inverts only the final step): no step
        empty = jnp.zeros((0, *x_T.shape), dtype)
        traj = (x_T[None], empty) if save_trajectory else (None, None)
        return SampleResult(x_T, *traj, jnp.asarray(0, jnp.int32))
    # steps 0 .. n - 2 in the scan; the last one peeled off, so that the choice between an
    # ordinary step and the final step into 0 is made once, not inside every step of the loop
    init = (x_T, sampler.init(x_T, ts))
    split = sampler.split_first_step() if n >= 2 else None
    start, xs, x0s = 0, [x_T[None]], []  # the steps run before the scan, and their outputs
    if split is not None:  # AFS: the first denoiser call is analytic, the others are not
        first_denoise, sampler = split  # body (a closure) runs the sampler without the switch
        x_1, state_1, x0_0, _ = _ordinary(
            sampler, checked_denoiser(first_denoise), x_T, init[1], ts, 0, key, table
        )  # its one "evaluation" is no network call: not counted
        init, start, xs, x0s = (x_1, state_1), 1, xs + [x_1[None]], [x0_0[None]]
    (x, state), (traj, nfes) = jax.lax.scan(body, init, jnp.arange(start, n - 1))
    x_last, _, x0_last, nfe_last = _last_step(sampler, denoise, x, state, ts, n - 1, key)
    nfe = jnp.sum(nfes) + nfe_last
    if not save_trajectory:
        return SampleResult(x_last, None, None, nfe)
    xs = jnp.concatenate([*xs, traj[0], x_last[None]])
    return SampleResult(x_last, xs, jnp.concatenate([*x0s, traj[1], x0_last[None]]), nfe)


def _coefficient_table(sampler, ts):
    """``sampler.coefficients`` of the scan's steps ``0 .. n - 2``, stacked, or ``None``.

    The last step computes its own inside ``_last_step``'s ordinary branch: into a final 0 they
    are not finite (log-SNR of 0), and outside that branch their gradient would be NaN.
    """
    if type(sampler).coefficients is Sampler.coefficients:
        return None
    steps = jnp.arange(ts.shape[0] - 2)
    return jax.vmap(lambda i: sampler.coefficients(ts, i))(steps)


def _ordinary(sampler, denoise, x, state, ts, i, key, table=None):
    """Step ``i`` of the scan, in ``x``'s dtype, with its NFE as an int32."""
    key = jax.random.fold_in(key, i)
    if table is None:
        x_next, state, x0, nfe = sampler.step(denoise, x, state, ts, i, key)
    else:
        coef = jax.tree_util.tree_map(lambda c: c[i], table)
        x_next, state, x0, nfe = sampler.step(denoise, x, state, ts, i, key, coef=coef)
    return x_next.astype(x.dtype), state, x0.astype(x.dtype), jnp.asarray(nfe, jnp.int32)


def _last_step(sampler, denoise, x, state, ts, i, key):
    """The last step ``i``: ``sampler.final`` if the grid ends at 0 (decided at run time).

    Both branches are traced once, so grids ending at 0 or at ``t_min`` share one program.
    """

    def ordinary(x, state):
        return _ordinary(sampler, denoise, x, state, ts, i, key)  # computes its coefficients

    def to_zero(x, state):
        x0 = sampler.final(denoise, x, state, ts, jax.random.fold_in(key, i)).astype(x.dtype)
        return x0, state, x0, jnp.asarray(1, jnp.int32)

    return jax.lax.cond(ts[-1] == 0, to_zero, ordinary, x, state)
