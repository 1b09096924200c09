"""Samplers: optax-style factories returning ``Sampler(init, step)``, run by ``jaxdiff.sample``."""

from jaxdiff.samplers.base import Sampler, SampleResult, check_grid, sample
from jaxdiff.samplers.ddim import ddim, ddim_step
from jaxdiff.samplers.ddpm import ddpm, ddpm_step
from jaxdiff.samplers.dpm_solver import (
    dpm_solver,
    dpm_solver_pp,
    dpm_solver_pp_sde,
    dpm_solver_pp_sde_step,
    dpm_solver_pp_step,
    dpm_solver_step,
)
from jaxdiff.samplers.euler import churn_step, euler, euler_step, heun, heun_step, noise_level
from jaxdiff.samplers.ipndm import ipndm, ipndm_step
from jaxdiff.samplers.stochastic import (
    euler_maruyama,
    euler_maruyama_step,
    langevin_step,
    predictor_corrector,
)
from jaxdiff.samplers.unipc import unipc, unipc_update

__all__ = ["Sampler", "SampleResult", "sample", "check_grid", "ddim", "ddim_step"]
__all__ += ["ddpm", "ddpm_step", "euler", "euler_step", "heun", "heun_step"]
__all__ += ["churn_step", "noise_level", "euler_maruyama", "euler_maruyama_step"]
__all__ += ["langevin_step", "predictor_corrector"]
__all__ += ["dpm_solver", "dpm_solver_step", "dpm_solver_pp", "dpm_solver_pp_step"]
__all__ += ["dpm_solver_pp_sde", "dpm_solver_pp_sde_step", "ipndm", "ipndm_step"]
__all__ += ["unipc", "unipc_update"]
