"""Samplers: optax-style factories returning ``Sampler(init, step)``, run by ``jaxdiff.sample``."""

from jaxdiff.samplers.base import Sampler, SampleResult, check_grid, sample
from jaxdiff.samplers.ddim import ddim, ddim_step

__all__ = ["Sampler", "SampleResult", "sample", "check_grid", "ddim", "ddim_step"]
