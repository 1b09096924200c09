"""Flax NNX networks: ``MLP`` (low-dimensional data), ``UNet`` (DDPM++-style, NHWC images) and a
noise-conditional ``Classifier`` for classifier guidance.

Every network is called as ``model(x, t, y=None, *, key=None)`` with ``t`` a scalar or of shape
``(batch,)``; ``y`` are class labels (index ``num_classes`` is the null class of classifier-free
guidance) and ``key`` turns dropout on. Turn a network into a denoiser with
``jaxdiff.denoiser(functools.partial(model, y=labels), process, prediction)``, or, inside
``jax.jit``, with :func:`jaxdiff.training.apply_fn` on its split state.
"""

from jaxdiff.nets.classifier import Classifier
from jaxdiff.nets.embeddings import (
    FourierFrequencies,
    GroupNorm,
    TimeEmbedding,
    sinusoidal_embedding,
)
from jaxdiff.nets.mlp import MLP, LabelEmbedding
from jaxdiff.nets.unet import AttentionBlock, ResBlock, UNet

__all__ = [
    "MLP",
    "UNet",
    "Classifier",
    "ResBlock",
    "AttentionBlock",
    "TimeEmbedding",
    "LabelEmbedding",
    "FourierFrequencies",
    "GroupNorm",
    "sinusoidal_embedding",
]
