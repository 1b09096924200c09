r"""Editing with the probability-flow ODE: inversion, SDEdit, inpainting and interpolation.

The probability-flow ODE is a bijection between data and noise, so a sample can be *encoded*
(run the ODE from data to noise), edited in noise space and *decoded* (sample back). Every
function here works with any sampler of :mod:`jaxdiff.samplers` and any process.

- :func:`encode` / :func:`decode`: DDIM inversion (Song et al. 2021, "Denoising Diffusion
  Implicit Models", Sec. 4.3; Dhariwal & Nichol 2021, App. F): run a deterministic sampler on the
  reversed grid,

  .. math:: x_{t_{k+1}} = \alpha_{t_{k+1}}\hat x_0(x_{t_k}, t_k)
      + \sigma_{t_{k+1}}\hat\epsilon(x_{t_k}, t_k),\qquad t_k < t_{k+1},

  or solve the ODE forward in time with diffrax (:class:`DiffraxODE`).
- :func:`sdedit`: noise an input to ``ts[0]`` and sample back (Meng et al. 2022, "SDEdit").
- :func:`inpaint`: replacement (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
  App. I.2) with RePaint's resampling (Lugmayr et al. 2022).
- :func:`interpolate`: spherical interpolation of two encodings, decoded (DDIM, Sec. 5.3).

**Grid convention.** Every function takes the *sampling* grid ``ts`` (decreasing, as for
:func:`jaxdiff.sample`). When it ends with 0, sampling's last step returns the denoiser's output
:math:`D(x_{t_{min}}, t_{min})`; :func:`encode` inverts that step exactly, by finding the point
:math:`x` with :math:`D(x, t_{min}) = x_0` with the fixed-point iteration

.. math:: x \leftarrow \alpha_{t_{min}} x_0 + \sigma_{t_{min}}\hat\epsilon(x, t_{min})
    = x + \alpha_{t_{min}}\,(x_0 - D(x, t_{min})),

started at :math:`\alpha_{t_{min}} x_0` (the DDIM-inversion step with :math:`\hat\epsilon`
evaluated at its end point; a contraction with rate :math:`\approx\sigma_{t_{min}}^2/
(\alpha_{t_{min}}^2 s^2 + \sigma_{t_{min}}^2)` for data of scale :math:`s`). With that,
``decode(encode(x0)) - x0`` is only the ODE solvers' discretisation error, which vanishes at the
sampler's order as the grid is refined. A grid ending at :math:`t > 0` treats ``x0`` as the
state at ``ts[-1]``.

Example:
    >>> import jax, jax.numpy as jnp, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jnp.zeros(2), jnp.eye(2))
    >>> denoise, ts = target.denoiser(vp), jaxdiff.schedules.log_snr_uniform(vp, 50)
    >>> x0 = target.sample(4, key=jax.random.key(0))
    >>> z = encode(vp, denoise, x0, ts)                           # DDIM inversion
    >>> x0_rec = decode(jaxdiff.samplers.ddim(vp), denoise, z, ts)
    >>> bool(jnp.max(jnp.abs(x0_rec - x0)) < 0.25)  # 0.19; first order: halves as steps double
    True
"""

import warnings
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._utils import bcast, is_concrete
from jaxdiff.processes import Process
from jaxdiff.samplers.base import (
    Sampler,
    check_grid,
    check_sample_input,
    grid_dtype,
    lift,
    normal_like,
    run,
    sample,
)
from jaxdiff.samplers.ddim import ddim
from jaxdiff.sde import solve_ode

__all__ = [
    "DiffraxODE",
    "Inpaint",
    "encode",
    "decode",
    "sdedit",
    "inpaint",
    "interpolate",
    "slerp",
]


class DiffraxODE(eqx.Module):
    r"""Solve the probability-flow ODE with diffrax instead of a fixed-grid sampler.

    Passed as ``method`` to :func:`encode` and as ``sampler`` to :func:`decode` and
    :func:`interpolate`. Only the end points of the grid ``ts`` are used; steps are adaptive
    (``diffrax.PIDController(rtol, atol)``).

    Example:
        >>> ode = DiffraxODE(jaxdiff.VP(), rtol=1e-8, atol=1e-8)  # doctest: +SKIP
    """

    process: Process
    solver: Any = None
    rtol: jax.Array = eqx.field(default=1e-5, converter=jnp.asarray)  # arrays: no recompiles
    atol: jax.Array = eqx.field(default=1e-5, converter=jnp.asarray)
    max_steps: int = eqx.field(default=4096, static=True)

    def solve(self, denoise, x, t0, t1):
        """The ODE state at ``t1`` starting from ``x`` at ``t0`` (either direction in time)."""
        sol = solve_ode(
            self.process,
            denoise,
            x,
            t0=t0,
            t1=t1,
            solver=diffrax.Tsit5() if self.solver is None else self.solver,
            stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=self.atol),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=self.max_steps,
        )
        return sol.ys[-1]


# --------------------------------------------------------------------------------------------
# Input checks (eager, on concrete values only)
# --------------------------------------------------------------------------------------------


def _check_sampling_grid(ts, process, fn):
    """A decreasing grid in the process's range; a clear message for the increasing case."""
    if is_concrete(ts):
        a = np.asarray(ts, dtype=np.float64)
        if a.ndim == 1 and a.shape[0] >= 2 and np.all(np.diff(a) > 0):
            raise ValueError(
                f"{fn} takes the sampling grid ts (decreasing, t_max ... [0], the grid you decode "
                f"with) and reverses it itself; got an increasing grid {a}. Pass ts[::-1]."
            )
    check_grid(ts, process)


def _check_deterministic(sampler, fn):
    if isinstance(sampler, DiffraxODE):
        return
    if not isinstance(sampler, Sampler):
        raise TypeError(
            f"{fn} needs a jaxdiff Sampler (e.g. samplers.ddim(process)) or a DiffraxODE; "
            f"got {type(sampler).__name__}."
        )
    if sampler.stochastic:
        raise ValueError(
            f"{fn} needs a deterministic sampler (an ODE solver), but {sampler.name} is "
            "stochastic. Use samplers.ddim(process) (eta=0), heun, dpm_solver or a DiffraxODE."
        )


def _check_process(sampler, process):
    other = getattr(sampler, "process", None)
    if other is not None and is_concrete(process, other) and not eqx.tree_equal(other, process):
        raise ValueError(
            f"The sampler was built for {other}, but process={process}. Build the sampler with "
            "the same process."
        )


def _sampler_process(sampler, fn):
    if sampler.process is None:
        raise ValueError(f"{fn} needs a sampler built with a process (sampler.process is None).")
    return sampler.process


def _check_key(key, fn):
    if key is None:
        raise ValueError(f"{fn} is random: pass key=jax.random.key(seed).")


def _as_grid(ts, x):
    return jnp.asarray(ts).astype(grid_dtype(x))


# --------------------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------------------


def _invert_denoiser(process, denoise, x0, t, iters):
    r"""The point :math:`x` with :math:`D(x, t) = x_0`, by ``iters`` fixed-point iterations."""
    a = bcast(process.alpha(t), x0)

    def body(_, x):
        return (x + a * (x0 - denoise(x, t))).astype(x0.dtype)

    return jax.lax.fori_loop(0, iters, body, (a * x0).astype(x0.dtype))


@eqx.filter_jit
def _encode(method, process, denoise, x0, ts, final_iters):
    def from_zero(x0):
        x = _invert_denoiser(process, denoise, x0, ts[-2], final_iters)
        return _flow_up(method, denoise, x, ts[:-1][::-1])

    def from_last(x0):
        return _flow_up(method, denoise, x0, ts[::-1])

    return jax.lax.cond(ts[-1] == 0, from_zero, from_last, x0)


def _flow_up(method, denoise, x, ts_up):
    """The flow over an increasing grid: the sampling engine itself, or diffrax."""
    if isinstance(method, DiffraxODE):
        return method.solve(denoise, x, ts_up[0], ts_up[-1])
    return run(method, denoise, x, ts_up, key=jax.random.key(0)).x


def encode(
    process: Process,
    denoise: Callable,
    x0,
    ts,
    *,
    method: Sampler | DiffraxODE | None = None,
    final_iters: int = 3,
) -> jax.Array:
    r"""Map data to noise along the probability-flow ODE (DDIM inversion), undoing :func:`decode`.

    With a deterministic scan sampler, its step is applied on the reversed grid
    (increasing times); for DDIM that is
    :math:`x_{t_{k+1}} = \alpha_{t_{k+1}}\hat x_0 + \sigma_{t_{k+1}}\hat\epsilon` at
    :math:`(x_{t_k}, t_k)`. Every deterministic sampler inverts this way, multistep ones with the
    history they gather on the reversed grid. The round trip ``decode(encode(x0))`` has order
    :math:`p` for a sampler of odd order :math:`p` and :math:`p + 1` for even :math:`p` (the
    leading local errors of a step and its reverse, odd in the step size, cancel); measured on
    a 6-d mixture: DDIM 1, Heun 3, DPM-Solver-3 3, iPNDM 4.2. With :class:`DiffraxODE` the ODE is
    solved forward in time by diffrax. A final 0 in ``ts`` is inverted exactly by
    ``final_iters`` fixed-point iterations (module docstring).

    Args:
        process: the forward process of ``denoise``.
        denoise: ``denoise(x, t) -> x0_hat``.
        x0: data, batched on the leading axis.
        ts: the sampling grid (decreasing) that :func:`decode` will use.
        method: a deterministic :class:`~jaxdiff.samplers.Sampler` (default
            ``samplers.ddim(process)``) or a :class:`DiffraxODE` (adaptive, forward in time).
            The strings ``"ddim"`` and ``"diffrax"`` still work but are deprecated.
        final_iters: fixed-point iterations inverting the final ``t_min -> 0`` denoising step
            (each one denoiser call; 0 gives :math:`\alpha_{t_{min}} x_0`).

    Returns:
        The encoding at ``ts[0]``, shaped like ``x0``.

    Example:
        >>> z = encode(vp, denoise, x0, jaxdiff.schedules.karras(vp, 100))  # doctest: +SKIP
    """
    method = _resolve_method(method, process)
    _check_deterministic(method, "encode")
    _check_process(method, process)
    _check_sampling_grid(ts, process, "encode")
    if not isinstance(final_iters, int) or final_iters < 0:
        raise ValueError(f"final_iters must be a non-negative int; got {final_iters!r}.")
    x0 = check_sample_input(x0, "x0")
    method = lift(method) if isinstance(method, Sampler) else method
    return _encode(method, process, denoise, x0, _as_grid(ts, x0), final_iters)


def _resolve_method(method, process):
    if method is None:
        return ddim(process)
    if isinstance(method, str) and method in ("ddim", "diffrax"):
        warnings.warn(
            f"encode(method={method!r}) is deprecated: pass samplers.ddim(process) or "
            "DiffraxODE(process).",
            DeprecationWarning,
            stacklevel=3,
        )
        return ddim(process) if method == "ddim" else DiffraxODE(process)
    if isinstance(method, str):
        raise ValueError(
            f"Unknown method {method!r}: use 'ddim', 'diffrax', a deterministic Sampler "
            "(e.g. samplers.heun(process)) or DiffraxODE(process, solver=..., rtol=..., atol=...)."
        )
    return method


@eqx.filter_jit
def _decode_ode(ode, denoise, z, ts):
    def to_zero(z):
        return denoise(ode.solve(denoise, z, ts[0], ts[-2]), ts[-2])

    def to_last(z):
        return ode.solve(denoise, z, ts[0], ts[-1])

    return jax.lax.cond(ts[-1] == 0, to_zero, to_last, z)


def decode(sampler: Sampler | DiffraxODE, denoise: Callable, z, ts) -> jax.Array:
    r"""Map noise to data: plain deterministic sampling from ``z`` at ``ts[0]`` along ``ts``.

    ``decode(s, D, encode(p, D, x0, ts, method=s), ts)`` reconstructs ``x0`` up to the solver's
    discretisation error. A :class:`DiffraxODE` solves the ODE adaptively from ``ts[0]`` to
    ``ts[-2]`` and returns :math:`D(x, t_{min})` when ``ts`` ends with 0.

    Example:
        >>> x0 = decode(jaxdiff.samplers.ddim(vp), denoise, z, ts)  # doctest: +SKIP
    """
    _check_deterministic(sampler, "decode")
    z = check_sample_input(z, "z")
    if isinstance(sampler, DiffraxODE):
        _check_sampling_grid(ts, sampler.process, "decode")
        return _decode_ode(sampler, denoise, z, _as_grid(ts, z))
    return sample(sampler, denoise, z, ts).x


# --------------------------------------------------------------------------------------------
# SDEdit
# --------------------------------------------------------------------------------------------


def sdedit(sampler: Sampler, denoise: Callable, x, ts, *, key) -> jax.Array:
    r"""SDEdit (Meng et al. 2022): noise ``x`` to :math:`t_0` = ``ts[0]``, then sample along ``ts``.

    .. math:: x_{t_0} = \alpha_{t_0} x + \sigma_{t_0}\epsilon,\quad \epsilon\sim\mathcal N(0, I),

    then any sampler from :math:`x_{t_0}`. The start time sets the realism-faithfulness trade-off:
    near ``t_min`` the output stays within about :math:`\sigma_{t_0}/\alpha_{t_0}` of ``x``; at
    ``t_max`` it is an unconditional sample.

    Args:
        sampler: any sampler, deterministic or stochastic.
        denoise: ``denoise(x, t) -> x0_hat``.
        x: the guide (e.g. a rough stroke painting), batched.
        ts: decreasing grid whose first entry is the start time in ``[t_min, t_max]``.
        key: PRNG key for the noise (and the sampler, if stochastic).

    Example:
        >>> ts = jaxdiff.schedules.log_snr_uniform(vp, 50)[25:]  # start half-way # doctest: +SKIP
        >>> out = sdedit(jaxdiff.samplers.ddim(vp), denoise, strokes, ts, key=key)  # doctest: +SKIP
    """
    process = _sampler_process(sampler, "sdedit")
    _check_key(key, "sdedit")
    if is_concrete(ts) and np.ndim(ts) == 1 and np.shape(ts)[0] >= 1:
        process.check_t(np.asarray(ts)[0], name="ts[0] (the SDEdit start time)")
    _check_sampling_grid(ts, process, "sdedit")
    x = check_sample_input(x, "x")
    ts = _as_grid(ts, x)
    k_noise, k_sample = jax.random.split(key)
    x_t = process.marginal(x, jax.random.normal(k_noise, x.shape, x.dtype), ts[0])
    return sample(sampler, denoise, x_t, ts, key=k_sample).x


# --------------------------------------------------------------------------------------------
# Inpainting
# --------------------------------------------------------------------------------------------


def _check_mask(mask, shape):
    mask = jnp.asarray(mask)
    try:
        out = np.broadcast_shapes(mask.shape, shape)
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"mask must broadcast to x_known.shape={tuple(shape)}; got mask.shape={mask.shape}. "
            "Use 1 for known entries and 0 for those to fill, e.g. shape (1, *x.shape[1:])."
        )
    if is_concrete(mask):
        m = np.asarray(mask)
        if not np.all((m == 0) | (m == 1)):
            bad = np.unique(m[(m != 0) & (m != 1)])[:5]
            raise ValueError(
                f"mask must contain only 0 (fill) and 1 (known); found {bad}. Threshold a soft "
                "mask first, e.g. (mask > 0.5)."
            )
    return mask != 0


def _renoise(process, x_s, s, t, noise):
    r"""Forward transition :math:`q(x_t\mid x_s)`, :math:`t > s` (RePaint's jump back)."""
    a_s, sig_s = bcast(process.alpha(s), x_s), bcast(process.sigma(s), x_s)
    a_t, sig_t = bcast(process.alpha(t), x_s), bcast(process.sigma(t), x_s)
    r = a_t / a_s
    return r * x_s + jnp.sqrt(jnp.maximum(sig_t**2 - (r * sig_s) ** 2, 0.0)) * noise


class Inpaint(Sampler):
    r"""A sampler wrapper: replacement after every step, with RePaint resampling (see :func:`inpaint`).

    Each step of the wrapped ``sampler`` from :math:`t` to :math:`s` is tried ``resample`` times;
    after each try the known entries are replaced by :math:`\alpha_s x_{known} + \sigma_s\epsilon`
    and, between tries, the state jumps back to :math:`t` with the forward transition. The final
    step of a grid ending at 0 returns the denoiser's output with the known entries pasted in.
    Run it with :func:`jaxdiff.sample` like any sampler (the optax ``chain`` pattern).
    """

    sampler: Sampler
    x_known: jax.Array
    mask: jax.Array
    resample: jax.Array = eqx.field(default=1, converter=jnp.asarray)  # traced: no recompiles

    @property
    def process(self):
        return self.sampler.process

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def nfe_per_step(self) -> int:
        return self.sampler.nfe_per_step  # per try; ``resample`` tries per step

    def nfe(self, n: int) -> int:
        return (n - 1) * self.nfe_per_step * int(self.resample) + 1

    def init(self, x_T, ts):
        return self.sampler.init(x_T, ts)

    def step(self, denoise, x, state, ts, i, key):
        t, s = ts[i], ts[i + 1]

        def attempt(j, carry):
            x_t, _, _, _ = carry
            k = jax.random.fold_in(key, j)
            k_step = jax.random.fold_in(k, 0)  # every try starts from the state before the step
            x_s, new_state, x0, _ = self.sampler.step(denoise, x_t, state, ts, i, k_step)
            eps, noise = normal_like(jax.random.fold_in(k, 1), jnp.stack([x, x]))
            x_s = jnp.where(self.mask, self.process.marginal(self.x_known, eps, s), x_s)
            x_s = x_s.astype(x.dtype)
            x_back = _renoise(self.process, x_s, s, t, noise).astype(x.dtype)
            x_t = jnp.where(j + 1 < self.resample, x_back, x_t)
            return x_t, x_s, new_state, x0.astype(x.dtype)

        _, x_s, new_state, x0 = jax.lax.fori_loop(0, self.resample, attempt, (x, x, state, x))
        return x_s, new_state, x0, self.sampler.nfe_per_step * self.resample

    def final(self, denoise, x, state, ts, key):
        return jnp.where(self.mask, self.x_known, denoise(x, ts[-2]))


def inpaint(
    sampler: Sampler,
    denoise: Callable,
    x_known,
    mask,
    ts,
    *,
    key,
    resample: int = 1,
) -> jax.Array:
    r"""Fill the entries where ``mask == 0`` by sampling with replacement (and RePaint resampling).

    After every sampler step :math:`t \to s` the known entries are replaced by the known data
    noised to :math:`s`, :math:`\alpha_s x_{known} + \sigma_s\epsilon` (Song et al. 2021,
    App. I.2). With ``resample = U > 1`` each step is redone ``U`` times; between two tries the
    state jumps back with the forward transition (Lugmayr et al. 2022, "RePaint", Alg. 1)

    .. math:: x_t \sim \mathcal N\!\left(\tfrac{\alpha_t}{\alpha_s}x_s,\;
        \left(\sigma_t^2 - \tfrac{\alpha_t^2}{\alpha_s^2}\sigma_s^2\right) I\right),

    which lets the unknown part harmonise with the known part. The output equals ``x_known``
    exactly where ``mask == 1``. Cost: ``resample`` times the sampler's NFE. Every try starts
    from the sampler's state before the step, so a multistep sampler's history still describes
    the trajectory before the jump: on coarse grids prefer one-step samplers (on a 4-d Gaussian,
    ``dpm_solver_pp(order=2)`` with ``resample=5`` missed the conditional covariance by 0.54 at
    20 steps and by 0.08 at 100; DDPM by 0.06 and 0.02).

    Args:
        sampler: any sampler (its ``step`` and state are used; stochastic ones get keys).
        denoise: ``denoise(x, t) -> x0_hat``.
        x_known: data whose entries are known where ``mask == 1`` (others are ignored).
        mask: 0/1 array broadcastable to ``x_known`` (1 = known, 0 = fill).
        ts: decreasing sampling grid (usually from ``t_max``; a last 0 ends with ``x0_hat``).
        key: PRNG key.
        resample: how many times each step is done (RePaint's ``U``; 1 = plain replacement).

    Example:
        >>> mask = jnp.zeros((1, 8, 8, 1)).at[:, :, :4].set(1)  # left half known # doctest: +SKIP
        >>> sampler = jaxdiff.samplers.ddpm(vp)  # doctest: +SKIP
        >>> out = inpaint(sampler, denoise, x, mask, ts, key=key, resample=5)  # doctest: +SKIP
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a jaxdiff Sampler; got {type(sampler).__name__}.")
    _sampler_process(sampler, "inpaint")
    _check_key(key, "inpaint")
    if not isinstance(resample, (int, np.integer)) or resample < 1:
        raise ValueError(f"resample must be a positive int (1 = no resampling); got {resample!r}.")
    x_known = check_sample_input(x_known, "x_known")
    mask = jnp.broadcast_to(_check_mask(mask, x_known.shape), x_known.shape)
    _check_sampling_grid(ts, sampler.process, "inpaint")
    ts = _as_grid(ts, x_known)
    k_init, k_run = jax.random.split(key)
    z = jax.random.normal(k_init, x_known.shape, x_known.dtype)
    x_T = sampler.process.marginal(jnp.where(mask, x_known, 0.0), z, ts[0]).astype(x_known.dtype)
    wrapper = Inpaint(sampler, x_known, mask, jnp.asarray(resample, jnp.int32))
    x = sample(wrapper, denoise, x_T, ts, key=k_run).x
    return jnp.where(mask, x_known, x)


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------


def slerp(z_a, z_b, lambdas) -> jax.Array:
    r"""Spherical interpolation per example (Shoemake 1985; DDIM Sec. 5.3).

    .. math:: z_\lambda = \frac{\sin((1-\lambda)\theta)}{\sin\theta}z_a
        + \frac{\sin(\lambda\theta)}{\sin\theta}z_b,\qquad
        \cos\theta = \frac{\langle z_a, z_b\rangle}{\|z_a\|\|z_b\|},

    linear where :math:`\theta \approx 0`. ``z_a``, ``z_b``: ``(batch, ...)``; ``lambdas``:
    ``(L,)``; returns ``(L, batch, ...)``.
    """
    z_a, z_b = jnp.asarray(z_a), jnp.asarray(z_b)
    lam = jnp.asarray(lambdas, z_a.dtype).reshape(-1, *([1] * z_a.ndim))
    axes = tuple(range(1, z_a.ndim))
    norm = jnp.sqrt(jnp.sum(z_a**2, axes) * jnp.sum(z_b**2, axes))
    cos = jnp.clip(jnp.sum(z_a * z_b, axes) / norm, -1.0, 1.0)
    theta = bcast(jnp.arccos(cos), z_a)
    small = theta < 1e-6
    sin = jnp.where(small, 1.0, jnp.sin(theta))
    w_a = jnp.where(small, 1 - lam, jnp.sin((1 - lam) * theta) / sin)
    w_b = jnp.where(small, lam, jnp.sin(lam * theta) / sin)
    return w_a * z_a + w_b * z_b


def interpolate(
    process: Process,
    denoise: Callable,
    x_a,
    x_b,
    ts,
    lambdas,
    *,
    sampler: Sampler | DiffraxODE | None = None,
    final_iters: int = 3,
) -> jax.Array:
    r"""Interpolate between data ``x_a`` and ``x_b`` through their encodings (DDIM, Sec. 5.3).

    Encode both with :func:`encode`, interpolate the encodings with :func:`slerp` (the prior is
    concentrated near a sphere, where linear mixes would have too small a norm) and decode every
    mix with :func:`decode`. ``lambdas = 0`` and ``1`` reconstruct ``x_a`` and ``x_b`` up to the
    round-trip error.

    Args:
        process, denoise: the model.
        x_a, x_b: two batches of the same shape ``(batch, ...)``.
        ts: the decreasing sampling grid.
        lambdas: interpolation weights ``(L,)`` in ``[0, 1]``.
        sampler: deterministic sampler or :class:`DiffraxODE` for both directions
            (default ``samplers.ddim(process)``).
        final_iters: see :func:`encode`.

    Returns:
        ``(L, batch, ...)``.

    Example:
        >>> lambdas = jnp.linspace(0, 1, 8)  # doctest: +SKIP
        >>> strip = interpolate(vp, denoise, x[:1], x[1:2], ts, lambdas)  # doctest: +SKIP
    """
    x_a, x_b = jnp.asarray(x_a), jnp.asarray(x_b)
    if x_a.shape != x_b.shape or x_a.ndim < 2:
        raise ValueError(
            f"x_a and x_b must be batches of the same shape (batch, ...); got {x_a.shape} and "
            f"{x_b.shape}. Add a leading axis with x[None] for single examples."
        )
    lambdas = jnp.asarray(lambdas, x_a.dtype).reshape(-1)
    sampler = ddim(process) if sampler is None else sampler
    z = encode(
        process, denoise, jnp.concatenate([x_a, x_b]), ts, method=sampler, final_iters=final_iters
    )
    zs = slerp(z[: x_a.shape[0]], z[x_a.shape[0] :], lambdas)
    out = decode(sampler, denoise, zs.reshape((-1,) + x_a.shape[1:]), ts)
    return out.reshape(zs.shape)
