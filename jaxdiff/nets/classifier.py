r"""A noise-conditional image classifier for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

The encoder half of the U-Net (:mod:`jaxdiff.nets.unet` blocks with the noise-level embedding),
then GroupNorm, SiLU, global average pooling and a linear layer to logits. Trained on noisy
inputs :math:`x_t` with cross-entropy (:func:`jaxdiff.training.classifier_loss`), it estimates
:math:`\log p_t(y \mid x_t)`, whose gradient guidance adds to the score:

.. math:: \nabla_x \log p_t(x \mid y) = \nabla_x \log p_t(x) + \nabla_x \log p_t(y \mid x).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> clf = Classifier(1, 10, image_size=8, channels=16, rngs=nnx.Rngs(0))
    >>> clf(jnp.zeros((3, 8, 8, 1)), jnp.full((3,), 0.5)).shape
    (3, 10)
    >>> clf.log_prob(jnp.zeros((3, 8, 8, 1)), 0.5, jnp.array([0, 1, 2])).shape
    (3,)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.nets.embeddings import GroupNorm, TimeEmbedding, batch_time, groups_for
from jaxdiff.nets.unet import AttentionBlock, ResBlock, conv

__all__ = ["Classifier"]


class Classifier(nnx.Module):
    """Noise-conditional classifier ``clf(x, t) -> logits`` of shape ``(batch, num_classes)``.

    Args:
        in_channels: image channels (NHWC input).
        num_classes: number of classes.
        image_size: height = width (divisible by ``2**(len(channel_mults) - 1)``).
        channels, channel_mults, num_res_blocks, attn_resolutions, dropout, embedding,
            time_scale, dtype: as in :class:`~jaxdiff.nets.UNet`.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        image_size: int,
        channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
        embedding: str = "sinusoidal",
        time_scale: float | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} must be divisible by {factor}.")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        emb_dim = 4 * channels
        self.time = TimeEmbedding(
            channels, emb_dim, kind=embedding, time_scale=time_scale, dtype=dtype, rngs=rngs
        )
        self.conv_in = conv(in_channels, channels, dtype, rngs)
        blocks, c, res = [], channels, image_size
        for i, m in enumerate(channel_mults):
            w = channels * m
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, w, emb_dim, dropout=dropout, dtype=dtype, rngs=rngs))
                if res in attn_resolutions:
                    blocks.append(AttentionBlock(w, dtype=dtype, rngs=rngs))
                c = w
            if i < len(channel_mults) - 1:
                blocks.append(conv(c, c, dtype, rngs, stride=2))
                res //= 2
        self.blocks = nnx.List(blocks)
        self.norm = GroupNorm(c, num_groups=groups_for(c), dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(c, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x, t, *, key=None):
        expected = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"Classifier expects NHWC images (batch, *{expected}); got {x.shape}.")
        emb = self.time(batch_time(t, x))
        rngs = None if key is None else nnx.Rngs(dropout=key)
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb, rngs) if isinstance(block, ResBlock) else block(h)
        h = jnp.mean(jax.nn.silu(self.norm(h)), axis=(1, 2))
        return self.head(h).astype(jnp.float32)

    def log_prob(self, x, t, y, *, key=None):
        r""":math:`\log p_t(y \mid x_t)` for integer labels ``y`` ``(batch,)``; shape ``(batch,)``.

        ``functools.partial(clf.log_prob, y=labels)`` is the ``log_prob(x, t)`` that
        ``jaxdiff.guidance.classifier`` expects.
        """
        logp = jax.nn.log_softmax(self(x, t, key=key), axis=-1)
        y = jnp.broadcast_to(jnp.asarray(y), x.shape[:1])
        return jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0].astype(x.dtype)
