r"""A residual MLP for low-dimensional data (toy 2-D sets, tabular vectors).

.. math::
    h_0 = W_{in} x + e(t) + e(y),\qquad
    h_{l+1} = h_l + W_2\,\mathrm{SiLU}\big(W_1\,\mathrm{LN}(h_l) + e_l(t, y)\big),\qquad
    \mathrm{out} = W_{out}\,\mathrm{SiLU}(\mathrm{LN}(h_L)) + W_{skip}\,x,

with :math:`e(t)` the :class:`~jaxdiff.nets.embeddings.TimeEmbedding` and :math:`e(y)` a label
embedding whose extra index ``num_classes`` is the null class of classifier-free guidance
(Ho & Salimans 2022). The linear skip :math:`W_{skip}x` keeps the output's scale tied to the
input's, which the layer norms remove: at high noise the optimal noise prediction is
:math:`\hat\epsilon \approx x/\sigma_t`, also far in the prior's tails.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = MLP(2, hidden=32, depth=2, rngs=nnx.Rngs(0))
    >>> net(jnp.zeros((5, 2)), jnp.full((5,), 0.5)).shape
    (5, 2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.nets.embeddings import TimeEmbedding, batch_time

__all__ = ["MLP", "LabelEmbedding"]


class LabelEmbedding(nnx.Module):
    """Class labels ``y`` (``(batch,)`` ints) to vectors; index ``num_classes`` is the null class.

    ``y=None`` means "unconditional" and embeds the null class for the whole batch.
    """

    def __init__(self, num_classes: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes}.")
        self.num_classes = num_classes
        self.embed = nnx.Embed(num_classes + 1, dim, dtype=dtype, rngs=rngs)

    def __call__(self, y, batch: int):
        if y is None:
            y = jnp.full((batch,), self.num_classes, jnp.int32)
        y = jnp.asarray(y)
        if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(
                f"y must be integer labels of shape (batch,) = ({batch},); got shape {y.shape} "
                f"and dtype {y.dtype}. Use index {self.num_classes} for the null class."
            )
        return self.embed(y)


def check_labels(label_embedding, y):
    """Raise if labels are given to a network built without ``num_classes``."""
    if label_embedding is None and y is not None:
        raise ValueError(
            "this network is unconditional (num_classes=None) but got labels y; build it with "
            "num_classes=K to condition on classes."
        )


class _ResidualBlock(nnx.Module):
    def __init__(self, hidden: int, dropout: float, dtype, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
        self.lin1 = nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs)
        self.emb = nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs)
        self.lin2 = nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, h, emb, rngs):
        z = jax.nn.silu(self.lin1(self.norm(h)) + self.emb(emb))
        z = self.dropout(z, deterministic=rngs is None, rngs=rngs)
        return h + self.lin2(z)


class MLP(nnx.Module):
    """Residual MLP ``model(x, t, y=None, *, key=None) -> out`` for data of shape ``(batch, dim)``.

    Args:
        dim: data dimension.
        hidden: width of the residual stream.
        depth: number of residual blocks.
        emb_features: width of the frequency features of ``t``.
        out_dim: output width (default ``dim``; e.g. ``num_classes`` for a classifier's logits).
        num_classes: enables class conditioning (null class index ``num_classes``).
        embedding, time_scale: see :class:`~jaxdiff.nets.embeddings.TimeEmbedding`.
        dropout: dropout rate, active only when a ``key`` is passed to the call.
        dtype: computation dtype (``jnp.bfloat16`` for mixed precision); parameters stay float32.
        rngs: parameter initialisation.
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden: int = 128,
        depth: int = 3,
        emb_features: int = 64,
        out_dim: int | None = None,
        num_classes: int | None = None,
        embedding: str = "sinusoidal",
        time_scale: float | None = None,
        dropout: float = 0.0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim = dim
        self.inp = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.time = TimeEmbedding(
            emb_features, hidden, kind=embedding, time_scale=time_scale, dtype=dtype, rngs=rngs
        )
        self.label = (
            None
            if num_classes is None
            else LabelEmbedding(num_classes, hidden, dtype=dtype, rngs=rngs)
        )
        self.blocks = nnx.List([_ResidualBlock(hidden, dropout, dtype, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(hidden, out_dim or dim, dtype=dtype, rngs=rngs)
        self.skip = nnx.Linear(dim, out_dim or dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x, t, y=None, *, key=None):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (batch, {self.dim}); got {x.shape}.")
        check_labels(self.label, y)
        emb = self.time(batch_time(t, x))
        if self.label is not None:
            emb = emb + self.label(y, x.shape[0])
        rngs = None if key is None else nnx.Rngs(dropout=key)
        h = self.inp(x) + emb
        for block in self.blocks:
            h = block(h, jax.nn.silu(emb), rngs)
        return (self.out(jax.nn.silu(self.norm(h))) + self.skip(x)).astype(x.dtype)
