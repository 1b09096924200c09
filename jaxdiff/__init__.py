"""jaxdiff: diffusion models as differential equations, in JAX.

Two flows: process -> loss -> train step -> checkpoint, and
network -> denoiser -> sampler (scan) or SDE/ODE (diffrax) -> samples.
"""

from jaxdiff import analytic, parameterization, processes, samplers, schedules
from jaxdiff.parameterization import Denoiser, denoiser, eps, score
from jaxdiff.processes import EDM, VE, VP, Process, RectifiedFlow, SubVP, VPCosine
from jaxdiff.samplers import Sampler, SampleResult, sample

__version__ = "0.1.0"
