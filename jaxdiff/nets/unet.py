r"""A DDPM++-style U-Net for NHWC images (Song et al. 2021, "Score-Based Generative Modeling
through SDEs", App. H; Ho et al. 2020; Karras et al. 2022 keep the same network as "DDPM++").

Residual block, with the noise-level embedding :math:`e` added as a per-channel bias after the
second normalization (as the shift of EDM's adaptive norm; before it, a GroupNorm with one channel
per group would subtract the bias and erase the conditioning) and the skip connection rescaled by
:math:`1/\sqrt2`:

.. math::
    h = \mathrm{GN}\big(\mathrm{Conv}(\mathrm{SiLU}(\mathrm{GN}(x)))\big) + W e,\qquad
    \mathrm{out} = \frac{\mathrm{skip}(x) + \mathrm{Conv}_0\big(\mathrm{Drop}(\mathrm{SiLU}(h))\big)}{\sqrt 2},

where :math:`\mathrm{Conv}_0` starts at zero (DDPM++ ``init_scale = 0``), so every block starts as
the identity. Self-attention blocks at the chosen resolutions, the same rescaled residual.
Class conditioning adds a label embedding to :math:`e`; index ``num_classes`` is the null class
of classifier-free guidance (Ho & Salimans 2022).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = UNet(1, image_size=8, channels=16, channel_mults=(1, 2), rngs=nnx.Rngs(0))
    >>> net(jnp.zeros((2, 8, 8, 1)), jnp.full((2,), 0.5)).shape
    (2, 8, 8, 1)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.nets.embeddings import GroupNorm, TimeEmbedding, batch_time, groups_for
from jaxdiff.nets.mlp import LabelEmbedding, check_labels

__all__ = ["UNet", "ResBlock", "AttentionBlock", "conv"]

_SKIP = 1.0 / math.sqrt(2.0)


def conv(cin, cout, dtype, rngs, *, kernel=3, stride=1, zero=False):
    """A ``kernel x kernel`` SAME convolution (LeCun-normal or zero initialised)."""
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.lecun_normal()
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=stride, padding="SAME", kernel_init=init,
        dtype=dtype, rngs=rngs,
    )  # fmt: skip


def _norm(channels, dtype, rngs):
    return GroupNorm(channels, num_groups=groups_for(channels), dtype=dtype, rngs=rngs)


class ResBlock(nnx.Module):
    """DDPM++ residual block ``(x, emb, rngs) -> out`` (channels ``cin -> cout``)."""

    def __init__(self, cin, cout, emb_dim, *, dropout=0.0, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = _norm(cin, dtype, rngs)
        self.conv1 = conv(cin, cout, dtype, rngs)
        self.emb = nnx.Linear(emb_dim, cout, dtype=dtype, rngs=rngs)
        self.norm2 = _norm(cout, dtype, rngs)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = conv(cout, cout, dtype, rngs, zero=True)
        self.skip = None if cin == cout else conv(cin, cout, dtype, rngs, kernel=1)

    def __call__(self, x, emb, rngs=None):
        h = self.norm2(self.conv1(jax.nn.silu(self.norm1(x))))
        # the embedding is added after the norm: GN with one channel per group (<= 32 channels)
        # would subtract a per-channel bias and erase the time and label conditioning
        h = h + self.emb(jax.nn.silu(emb))[:, None, None, :]
        h = self.dropout(jax.nn.silu(h), deterministic=rngs is None, rngs=rngs)
        skip = x if self.skip is None else self.skip(x)
        return (skip + self.conv2(h)) * _SKIP


class AttentionBlock(nnx.Module):
    r"""Multi-head self-attention over the ``H*W`` positions, rescaled residual.

    .. math:: \mathrm{out} = \big(x + W_o\,\mathrm{softmax}(QK^\top/\sqrt{d})V\big)/\sqrt 2
    """

    def __init__(self, channels, *, num_heads=1, dtype=jnp.float32, rngs: nnx.Rngs):
        if channels % num_heads:
            raise ValueError(f"channels={channels} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.norm = _norm(channels, dtype, rngs)
        self.qkv = nnx.Linear(channels, 3 * channels, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(
            channels, channels, kernel_init=nnx.initializers.zeros_init(), dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (batch, positions, heads, dim)
        a = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)  # scale 1/sqrt(dim)
        return (x + self.out(a)) * _SKIP


class _Level(nnx.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, cins: list[int], cout: int, emb_dim: int, attn: bool, opts, rngs):
        dropout, heads, dtype = opts
        self.res = nnx.List(
            [ResBlock(ci, cout, emb_dim, dropout=dropout, dtype=dtype, rngs=rngs) for ci in cins]
        )
        self.attn = nnx.List(
            [AttentionBlock(cout, num_heads=heads, dtype=dtype, rngs=rngs) for _ in cins]
            if attn
            else []
        )

    def block(self, i, x, emb, rngs):
        x = self.res[i](x, emb, rngs)
        return self.attn[i](x) if len(self.attn) else x


def _upsample(x):
    """Nearest-neighbour 2x upsampling as a broadcast (no gather, unlike ``jax.image.resize``)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class UNet(nnx.Module):
    """DDPM++-style U-Net ``model(x, t, y=None, *, key=None) -> out`` (NHWC, out shaped like x).

    Args:
        in_channels: image channels (1 for MNIST / digits, 3 for CIFAR-10).
        image_size: height = width of the images (must be divisible by ``2**(len(channel_mults) - 1)``).
        channels: base width; level ``i`` has ``channels * channel_mults[i]`` channels.
        channel_mults: width multipliers, one resolution level each (downsampling by 2 between).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (in pixels) at which self-attention follows each block; the
            middle block always has attention.
        dropout: dropout rate inside residual blocks, active only when ``key`` is passed.
        num_classes: enables class conditioning (null class index ``num_classes``).
        embedding, time_scale: the noise-level embedding (see ``TimeEmbedding``).
        num_heads: attention heads.
        out_channels: output channels (default ``in_channels``); ``2 * in_channels`` for a
            learned variance (Improved DDPM): the mean's prediction, then :math:`v`, on the
            channel axis (see ``jaxdiff.discrete.learned_variance_model``).
        dtype: computation dtype (``jnp.bfloat16`` for mixed precision); parameters stay float32.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        image_size: int,
        channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] = (8,),
        dropout: float = 0.0,
        num_classes: int | None = None,
        embedding: str = "sinusoidal",
        time_scale: float | None = None,
        num_heads: int = 1,
        out_channels: int | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mults) - 1) = "
                f"{factor}; use fewer levels or pad the images."
            )
        self.in_channels, self.image_size = in_channels, image_size
        emb_dim = 4 * channels
        opts = (dropout, num_heads, dtype)
        self.time = TimeEmbedding(
            channels, emb_dim, kind=embedding, time_scale=time_scale, dtype=dtype, rngs=rngs
        )
        self.label = (
            None
            if num_classes is None
            else LabelEmbedding(num_classes, emb_dim, dtype=dtype, rngs=rngs)
        )
        self.conv_in = conv(in_channels, channels, dtype, rngs)
        widths = [channels * m for m in channel_mults]
        # Encoder: record every skip's width for the decoder.
        down, skips, c, res = [], [channels], channels, image_size
        for i, w in enumerate(widths):
            cins = [c] + [w] * (num_res_blocks - 1)
            down.append(_Level(cins, w, emb_dim, res in attn_resolutions, opts, rngs))
            skips += [w] * num_res_blocks
            c = w
            if i < len(widths) - 1:
                skips.append(c)
                res //= 2
        self.down = nnx.List(down)
        self.downsample = nnx.List([conv(w, w, dtype, rngs, stride=2) for w in widths[:-1]])
        self.mid1 = ResBlock(c, c, emb_dim, dropout=dropout, dtype=dtype, rngs=rngs)
        self.mid_attn = AttentionBlock(c, num_heads=num_heads, dtype=dtype, rngs=rngs)
        self.mid2 = ResBlock(c, c, emb_dim, dropout=dropout, dtype=dtype, rngs=rngs)
        up = []
        for w in reversed(widths):
            cins = [(c if j == 0 else w) + skips.pop() for j in range(num_res_blocks + 1)]
            up.append(_Level(cins, w, emb_dim, res in attn_resolutions, opts, rngs))
            c, res = w, res * 2
        self.up = nnx.List(up)
        self.upsample = nnx.List([conv(w, w, dtype, rngs) for w in widths[:0:-1]])
        self.norm_out = _norm(c, dtype, rngs)
        self.conv_out = conv(c, out_channels or in_channels, dtype, rngs)

    def _check(self, x, y):
        expected = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"UNet expects NHWC images of shape (batch, *{expected}); got {x.shape}."
            )
        check_labels(self.label, y)

    def embed(self, x, t, y):
        emb = self.time(batch_time(t, x))
        return emb if self.label is None else emb + self.label(y, x.shape[0])

    def __call__(self, x, t, y=None, *, key=None):
        self._check(x, y)
        emb = self.embed(x, t, y)
        rngs = None if key is None else nnx.Rngs(dropout=key)
        h = self.conv_in(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for j in range(len(level.res)):
                h = level.block(j, h, emb, rngs)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb, rngs)), emb, rngs)
        for i, level in enumerate(self.up):
            for j in range(len(level.res)):
                h = level.block(j, jnp.concatenate([h, hs.pop()], axis=-1), emb, rngs)
            if i < len(self.upsample):
                h = self.upsample[i](_upsample(h))
        return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(x.dtype)
