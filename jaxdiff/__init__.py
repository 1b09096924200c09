"""jaxdiff: diffusion models as differential equations, in JAX."""

from jaxdiff import parameterization, processes
from jaxdiff.parameterization import Denoiser, denoiser, eps, score
from jaxdiff.processes import EDM, VE, VP, Process, RectifiedFlow, SubVP, VPCosine

__version__ = "0.1.0"
