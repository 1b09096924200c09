r"""Noise-level embeddings and the small layers the networks share.

A network sees the time (or EDM's :math:`c_{noise}`) through a fixed frequency embedding followed by
a two-layer MLP (Ho et al. 2020; Song et al. 2021, NCSN++ / DDPM++):

.. math::
    \mathrm{sinusoidal}(t)_k = \big[\cos(s\,t\,\omega_k),\ \sin(s\,t\,\omega_k)\big],\qquad
    \omega_k = P^{-k/(d/2)},

with time scale :math:`s` (1000 maps :math:`t \in [0, 1]` to DDPM's step index) and period
:math:`P = 10^4`; the Gaussian Fourier features of NCSN++ draw :math:`\omega_k \sim \mathcal N(0,
\text{scale}^2)` once and keep them fixed.

Example:
    >>> import jax.numpy as jnp
    >>> sinusoidal_embedding(jnp.array([0.0, 0.5]), 8).shape
    (2, 8)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "sinusoidal_embedding",
    "FourierFrequencies",
    "TimeEmbedding",
    "batch_time",
    "groups_for",
]


def batch_time(t, x):
    """``t`` (scalar or ``(batch,)``) as a float32 vector of shape ``(batch,)`` matching ``x``."""
    t = jnp.asarray(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(
            f"t must be a scalar or have shape (batch,) = ({x.shape[0]},); got t.shape={t.shape}."
        )
    return jnp.broadcast_to(t.astype(jnp.float32), x.shape[:1])


def sinusoidal_embedding(t, dim: int, *, scale: float = 1.0, max_period: float = 10_000.0):
    r"""Transformer-style embedding :math:`[\cos(s t \omega_k), \sin(s t \omega_k)]` of ``t`` ``(batch,)``.

    Returns an array of shape ``(batch, dim)``; ``dim`` must be even (Vaswani et al. 2017; Ho et al.
    2020, Sec. 4).
    """
    if dim % 2:
        raise ValueError(f"dim must be even for a sinusoidal embedding, got {dim}.")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * t)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class FourierFrequencies(nnx.Variable):
    """Fixed random frequencies of Gaussian Fourier features (not trained, not a ``nnx.Param``)."""


class TimeEmbedding(nnx.Module):
    r"""``t -> Linear(SiLU(Linear(features(t))))`` with sinusoidal or Gaussian Fourier features.

    Args:
        features: width of the frequency features (even).
        out_dim: width of the embedding.
        kind: ``"sinusoidal"`` (DDPM++) or ``"fourier"`` (NCSN++, random fixed frequencies with
            standard deviation ``fourier_scale``).
        time_scale: multiplies ``t`` before the features; default 1000 for ``"sinusoidal"`` (``t``
            in ``[0, 1]`` becomes DDPM's step index) and 1 for ``"fourier"``.
    """

    def __init__(
        self,
        features: int,
        out_dim: int,
        *,
        kind: str = "sinusoidal",
        time_scale: float | None = None,
        fourier_scale: float = 16.0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kind not in ("sinusoidal", "fourier"):
            raise ValueError(f"kind must be 'sinusoidal' or 'fourier', got {kind!r}.")
        if features % 2:
            raise ValueError(f"features must be even, got {features}.")
        if time_scale is None:
            time_scale = 1000.0 if kind == "sinusoidal" else 1.0
        self.kind, self.features, self.time_scale = kind, features, float(time_scale)
        if kind == "fourier":
            w = fourier_scale * jax.random.normal(rngs.params(), (features // 2,), jnp.float32)
            self.freqs = FourierFrequencies(w)
        self.lin1 = nnx.Linear(features, out_dim, dtype=dtype, rngs=rngs)
        self.lin2 = nnx.Linear(out_dim, out_dim, dtype=dtype, rngs=rngs)

    def _features(self, t):
        if self.kind == "sinusoidal":
            return sinusoidal_embedding(t, self.features, scale=self.time_scale)
        args = 2 * math.pi * (self.time_scale * t)[:, None] * self.freqs[...][None, :]
        return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)

    def __call__(self, t):
        return self.lin2(jax.nn.silu(self.lin1(self._features(t))))


def groups_for(channels: int, max_groups: int = 32) -> int:
    """The largest number of groups ``<= max_groups`` that divides ``channels`` (for GroupNorm)."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)
