r"""The sampler protocol and the one engine that runs every sampler: ``jaxdiff.sample``.

A sampler is built by a factory that captures its process and hyperparameters (optax-style) and
returns ``Sampler(init, step)``:

- ``init(x_T, ts) -> state``: the sampler's own state (a NamedTuple declared beside it; multistep
  history lives here),
- ``step(denoise, x, state, ts, i, key) -> (x_next, state, x0_hat, nfe)``: one step from ``ts[i]``
  to ``ts[i + 1]``; ``x0_hat`` is the denoiser output at ``(x, ts[i])`` (the denoising trajectory)
  and ``nfe`` the number of denoiser calls it made (a Python int).

``sample`` runs the steps as one ``jax.lax.scan``. A grid whose last entry is 0 ends with the
denoiser's output: the final step returns ``denoise(x, ts[-2])`` (one evaluation), the EDM /
k-diffusion convention, for every sampler. Grid values are traced, so a grid of the same length
and dtype never recompiles.

Example:
    >>> import jax, jaxdiff
    >>> vp = jaxdiff.VP()
    >>> target = jaxdiff.analytic.Gaussian(jax.numpy.zeros(2), jax.numpy.eye(2))
    >>> ts = jaxdiff.schedules.uniform(vp, 10)
    >>> x_T = vp.prior_sample((4, 2), key=jax.random.key(0))
    >>> res = jaxdiff.sample(jaxdiff.samplers.ddim(vp), target.denoiser(vp), x_T, ts)
    >>> res.x.shape, int(res.nfe)
    ((4, 2), 10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._utils import is_concrete

__all__ = ["Sampler", "SampleResult", "sample", "check_grid"]


class Sampler(NamedTuple):
    """A sampler: ``init(x_T, ts) -> state`` and ``step(denoise, x, state, ts, i, key)``.

    ``process`` (when given) lets ``sample`` check the grid against the process's time range;
    ``stochastic`` makes ``sample`` insist on a ``key``; ``name`` is for messages and tables.
    """

    init: Callable
    step: Callable
    process: Any = None
    stochastic: bool = False
    name: str = "sampler"


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
    if process is not None:
        body = a[:-1] if a[-1] == 0 else a
        lo, hi = float(process.t_min), float(process.t_max)
        if body.min() < lo * (1 - 1e-6) or body.max() > hi * (1 + 1e-6):
            raise ValueError(
                f"ts must lie in [t_min, t_max] = [{lo:g}, {hi:g}] of {type(process).__name__} "
                f"(a final 0 is allowed); got range [{body.min():g}, {body.max():g}]."
            )


def _final_is_zero(ts):
    """True/False when decidable now; None when ``ts`` is traced (decided at run time)."""
    if not is_concrete(ts):
        return None
    return bool(np.asarray(ts)[-1] == 0)


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
        x_T: the starting point, e.g. ``process.prior_sample(shape, key=...)``.
        ts: ``n + 1`` decreasing times; a last entry 0 means the last step returns ``x0_hat``.
        key: PRNG key, required by stochastic samplers; folded with the step index.
        save_trajectory: also return the sampling and denoising trajectories.

    Returns:
        ``SampleResult(x, xs, denoised, nfe)``.
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a jaxdiff Sampler (from a factory); got {type(sampler)}.")
    ts = jnp.asarray(ts)
    check_grid(ts, sampler.process)
    if key is None:
        if sampler.stochastic:
            raise ValueError(f"{sampler.name} is stochastic: pass key=jax.random.key(seed).")
        key = jax.random.key(0)
    return _run(sampler, denoise, x_T, ts, key, save_trajectory, _final_is_zero(ts))


@eqx.filter_jit
def _run(sampler, denoise, x_T, ts, key, save_trajectory, final_zero):
    x_T = jnp.asarray(x_T)
    ts = ts.astype(x_T.dtype)
    n = ts.shape[0] - 1
    state = sampler.init(x_T, ts)

    def body(carry, i):
        x, state = carry
        x_next, state, x0, nfe = sampler.step(denoise, x, state, ts, i, jax.random.fold_in(key, i))
        out = (x_next, x0.astype(x.dtype)) if save_trajectory else None
        return (x_next, state), (out, jnp.asarray(nfe, jnp.int32))

    (x, state), (traj, nfes) = jax.lax.scan(body, (x_T, state), jnp.arange(n - 1))
    x_last, x0_last, nfe_last = _last_step(sampler, denoise, x, state, ts, key, final_zero)
    nfe = jnp.sum(nfes) + nfe_last
    if not save_trajectory:
        return SampleResult(x_last, None, None, nfe)
    xs = jnp.concatenate([x_T[None], traj[0], x_last[None]])
    denoised = jnp.concatenate([traj[1], x0_last[None]])
    return SampleResult(x_last, xs, denoised, nfe)


def _last_step(sampler, denoise, x, state, ts, key, final_zero):
    """The final step: ``x0_hat`` when the grid ends at 0, else an ordinary step."""
    i = ts.shape[0] - 2
    k = jax.random.fold_in(key, i)

    def to_zero(x):
        x0 = denoise(x, ts[i]).astype(x.dtype)  # a wider denoiser must not widen x
        return x0, x0, jnp.asarray(1, jnp.int32)

    def ordinary(x):
        x_next, _, x0, nfe = sampler.step(denoise, x, state, ts, i, k)
        return x_next.astype(x.dtype), x0.astype(x.dtype), jnp.asarray(nfe, jnp.int32)

    if final_zero is True:
        return to_zero(x)
    if final_zero is False:
        return ordinary(x)
    return jax.lax.cond(ts[-1] == 0, to_zero, ordinary, x)
