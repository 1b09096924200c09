"""Small shared helpers: broadcasting, dtypes and eager input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def bcast(c, x):
    r"""Broadcast a per-example coefficient ``c`` (shape ``()`` or ``(batch,)``) against ``x``.

    This is the one broadcast helper of the library: every ``alpha(t) * x`` with a batched ``t``
    goes through it, so ``t`` may be a scalar or have shape ``(batch,)``.
    """
    c = jnp.asarray(c)
    return c.reshape(c.shape + (1,) * (jnp.ndim(x) - c.ndim))


def weighted_sum(weights, terms):
    r""":math:`\sum_j w_j\,\mathrm{terms}_j`, written out term by term.

    ``weights`` has shape ``(m,)`` (or per example ``(m, batch)``); ``terms`` is an array
    ``(m, *x.shape)`` or a sequence of ``m`` arrays like ``x`` (no stacking needed), ``m`` static
    and small (a multistep history). Unlike ``jnp.tensordot``, which XLA:CPU runs as a separate
    matrix product, the written-out sum fuses with the update around it: one pass over memory
    per step. ``m = 0`` gives 0.
    """
    total = 0.0
    for j in range(len(terms)):
        total = total + bcast(weights[j], terms[j]) * terms[j]
    return total


def float_dtype(*xs):
    """The floating dtype the arguments promote to (float32 unless one of them is wider)."""
    dt = jnp.result_type(*[x for x in xs if x is not None])
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.dtype(jnp.float32)


def as_time(t, like=None):
    """``t`` as a floating array, in the dtype of ``like`` when given (so float32 stays float32).

    Times are never narrower than float32: a bfloat16 or float16 ``like`` gives float32 times
    (in bf16, 0.999 rounds to 1.0 and a process's ends are lost).
    """
    dtype = jnp.result_type(like) if like is not None else None
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        dtype = None
    if dtype is not None:
        dtype = jnp.promote_types(dtype, jnp.float32)
    t = jnp.asarray(t, dtype=dtype)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(float_dtype(t))
    return t


def is_concrete(*xs) -> bool:
    """True when none of ``xs`` is a tracer, so eager value checks are possible."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def check_time_range(t, t_lo, t_hi, name="t", allow_zero=False):
    """Raise ``ValueError`` if a concrete ``t`` lies outside ``[t_lo, t_hi]`` (eager check only)."""
    if not is_concrete(t):
        return
    a = np.asarray(t, dtype=np.float64)
    if np.any(~np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf: {a}")
    inside = (a >= t_lo * (1 - 1e-6)) & (a <= t_hi * (1 + 1e-6))
    if allow_zero:
        inside |= a == 0
    if not np.all(inside):
        bad = a[~inside].ravel()[:5]
        extra = " (or exactly 0)" if allow_zero else ""
        raise ValueError(
            f"{name} must lie in [t_min, t_max] = [{t_lo:g}, {t_hi:g}]{extra}; got {bad}. "
            f"Clip it to the process's range or build the process with other t_min/t_max."
        )


def check_batch(x, t, name="x"):
    """Raise if a batched ``t`` does not match the leading axis of ``x``."""
    t_shape = jnp.shape(t)
    if len(t_shape) > 1 or (len(t_shape) == 1 and (jnp.ndim(x) == 0 or t_shape[0] != x.shape[0])):
        raise ValueError(
            f"t must be a scalar or have shape (batch,) = ({x.shape[0] if jnp.ndim(x) else '?'},) "
            f"matching {name}.shape={tuple(jnp.shape(x))}; got t.shape={t_shape}."
        )


def check_like_x(out, x, who: str, hint: str = ""):
    """Raise ``ValueError`` (at trace time) unless ``out`` has the shape of ``x``.

    ``who`` names what returned ``out`` (it leads the message, e.g. ``"denoiser ..."``); both
    shapes are in the message. Broadcasting, e.g. a ``(batch, 1)`` output for ``x`` of shape
    ``(batch, d)``, is an error too: it would silently give a wrong answer.
    """
    if jnp.shape(out) != jnp.shape(x):
        raise ValueError(
            f"{who} returned shape {tuple(jnp.shape(out))} for x of shape "
            f"{tuple(jnp.shape(x))}; it must return an array shaped like x.{hint}"
        )
    return out


def in_dtype_of(y, *xs):
    """``y`` cast to the dtype the arrays ``xs`` promote to.

    Coefficients are computed in at least float32 (see :func:`as_time`); what multiplies ``x``
    comes back in ``x``'s own dtype, so a bfloat16 ``x`` stays bfloat16.
    """
    return jnp.asarray(y).astype(jnp.result_type(*xs))


def tree_hash(tree) -> int:
    """A hash of a pytree that reads array leaves by value (shape, dtype and bytes).

    ``eqx.Module``s with array leaves are not hashable by default; configuration objects whose
    numbers are array leaves (traced under ``jax.jit``, so new values never recompile) define
    ``__hash__ = tree_hash`` so that equal settings hash equal. Needs concrete arrays: do not
    hash under a trace.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return hash((treedef, tuple(_leaf_key(leaf) for leaf in leaves)))


def _leaf_key(leaf):
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        a = np.asarray(leaf)
        return a.shape, str(a.dtype), a.tobytes()
    return leaf


def sum_except_batch(x):
    """Sum over every axis but the leading one."""
    return jnp.sum(x, axis=tuple(range(1, jnp.ndim(x))))


def mean_except_batch(x):
    """Mean over every axis but the leading one."""
    return jnp.mean(x, axis=tuple(range(1, jnp.ndim(x))))
