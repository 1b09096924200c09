"""jaxdiff: diffusion models as differential equations, in JAX.

Two flows: process -> loss -> train step -> checkpoint, and
network -> denoiser -> sampler (scan) or SDE/ODE (diffrax) -> samples.

The core (processes, parameterization, losses, analytic, discrete, schedules, fitted_grids,
samplers, sde, guidance, likelihood, editing, geometry, metrics) needs only jax, diffrax and numpy
and is imported here. The training side (``nets``, ``training``, ``data``, ``checkpoint``: Flax,
optax, orbax, grain), the FID network (``inception``) and the diffusers loaders (``pretrained``:
Flax, safetensors) are imported on first access, so ``import jaxdiff`` stays light for users with
their own models.
"""

import importlib

from jaxdiff import (
    analytic,
    discrete,
    editing,
    fitted_grids,
    geometry,
    guidance,
    likelihood,
    losses,
    metrics,
    parameterization,
    processes,
    samplers,
    schedules,
    sde,
)
from jaxdiff.parameterization import Denoiser, denoiser, eps, score
from jaxdiff.processes import EDM, VE, VP, DiscreteVP, Process, RectifiedFlow, SubVP, VPCosine
from jaxdiff.samplers import Sampler, SampleResult, sample

__version__ = "0.1.0"

_LAZY = ("nets", "training", "data", "checkpoint", "inception", "pretrained")

__all__ = [
    "analytic",
    "discrete",
    "editing",
    "fitted_grids",
    "geometry",
    "guidance",
    "likelihood",
    "losses",
    "metrics",
    "parameterization",
    "processes",
    "samplers",
    "schedules",
    "sde",
    *_LAZY,
    "Denoiser",
    "denoiser",
    "eps",
    "score",
    "Process",
    "VP",
    "VPCosine",
    "SubVP",
    "VE",
    "EDM",
    "RectifiedFlow",
    "DiscreteVP",
    "Sampler",
    "SampleResult",
    "sample",
]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"jaxdiff.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")
