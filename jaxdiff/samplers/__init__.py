"""Samplers: immutable pytrees (``eqx.Module``) built by lowercase factories, run by ``jaxdiff.sample``."""

from jaxdiff.samplers.adaptive import DPMSolverAdaptive, adaptive_grid, dpm_solver_adaptive
from jaxdiff.samplers.ancestral import Ancestral, ancestral
from jaxdiff.samplers.base import (
    EmptyState,
    OneCallSampler,
    Sampler,
    SampleResult,
    check_grid,
    sample,
)
from jaxdiff.samplers.ddim import DDIM, ddim, ddim_step
from jaxdiff.samplers.ddpm import DDPM, ddpm, ddpm_step
from jaxdiff.samplers.deis import DEIS, deis, deis_step
from jaxdiff.samplers.discrete import DiscreteDDPM, discrete_ddpm
from jaxdiff.samplers.dpm_solver import (
    DPMSolver,
    DPMSolverPP,
    DPMSolverPPSDE,
    DPMSolverPPSinglestep,
    dpm_solver,
    dpm_solver_pp,
    dpm_solver_pp_sde,
    dpm_solver_pp_sde_step,
    dpm_solver_pp_singlestep,
    dpm_solver_pp_singlestep_step,
    dpm_solver_pp_step,
    dpm_solver_step,
)
from jaxdiff.samplers.euler import (
    Euler,
    Heun,
    churn_step,
    euler,
    euler_step,
    heun,
    heun_step,
    noise_level,
)
from jaxdiff.samplers.ipndm import IPNDM, ipndm, ipndm_step
from jaxdiff.samplers.langevin import AnnealedLangevin, annealed_langevin
from jaxdiff.samplers.lms import LMS, lms
from jaxdiff.samplers.stochastic import (
    EulerMaruyama,
    PredictorCorrector,
    euler_maruyama,
    euler_maruyama_step,
    langevin_step,
    predictor_corrector,
)
from jaxdiff.samplers.unipc import UniPC, unipc, unipc_update

__all__ = [
    "Sampler",
    "OneCallSampler",
    "SampleResult",
    "EmptyState",
    "sample",
    "check_grid",
    "ddim",
    "ddim_step",
]
__all__ += ["ddpm", "ddpm_step", "euler", "euler_step", "heun", "heun_step"]
__all__ += ["churn_step", "noise_level", "euler_maruyama", "euler_maruyama_step"]
__all__ += ["langevin_step", "predictor_corrector"]
__all__ += ["dpm_solver", "dpm_solver_step", "dpm_solver_pp", "dpm_solver_pp_step"]
__all__ += ["dpm_solver_pp_sde", "dpm_solver_pp_sde_step", "ipndm", "ipndm_step"]
__all__ += ["unipc", "unipc_update"]
__all__ += ["DDIM", "DDPM", "Euler", "Heun", "DPMSolver", "DPMSolverPP", "DPMSolverPPSDE"]
__all__ += ["IPNDM", "UniPC", "EulerMaruyama", "PredictorCorrector"]
__all__ += ["discrete_ddpm", "DiscreteDDPM"]
__all__ += ["lms", "ancestral", "dpm_solver_pp_singlestep", "dpm_solver_pp_singlestep_step"]
__all__ += ["deis", "deis_step", "dpm_solver_adaptive", "adaptive_grid", "annealed_langevin"]
__all__ += ["LMS", "Ancestral", "DPMSolverPPSinglestep", "DEIS", "DPMSolverAdaptive"]
__all__ += ["AnnealedLangevin"]
