"""Sampler families (math layer). The public entry point is ``sgm_lightning.sampling.sample``.

Modules: ``common`` (result type, NFE counting, Tweedie, Langevin step), ``grids`` (time grids),
``pc`` (predictor-corrector, Langevin / HMC correctors), ``ancestral`` (DDPM, DDIM), ``ode``
(probability flow), ``dopri`` (adaptive Dormand-Prince), ``heun`` (EDM), ``ald`` (annealed / plain
Langevin), ``exponential`` (DPM-Solver++, UniPC), ``reverse_sde`` (torchsde solvers), ``encode``
(PF-ODE encode / decode / interpolate).
"""

from sgm_lightning.samplers.ald import ald, langevin
from sgm_lightning.samplers.ancestral import ddim, ddpm
from sgm_lightning.samplers.common import SampleResult
from sgm_lightning.samplers.encode import decode, encode, interpolate, slerp
from sgm_lightning.samplers.exponential import dpm2m, dpm3m, dpm_sde, unipc
from sgm_lightning.samplers.grids import GRIDS, karras_sigmas, make_grid
from sgm_lightning.samplers.heun import heun
from sgm_lightning.samplers.ode import ode
from sgm_lightning.samplers.pc import CORRECTORS, PREDICTORS, pc
from sgm_lightning.samplers.reverse_sde import SDE_SOLVERS, sde_solve

METHODS = ("pc", "ddpm", "ddim", "ode", "heun", "ald", "dpm2m", "dpm3m", "dpm_sde", "unipc", "sde")

__all__ = ["METHODS", "PREDICTORS", "CORRECTORS", "SDE_SOLVERS", "GRIDS", "SampleResult", "pc", "ddpm", "ddim",
           "ode", "heun", "ald", "langevin", "dpm2m", "dpm3m", "dpm_sde", "unipc", "sde_solve", "karras_sigmas",
           "make_grid", "encode", "decode", "slerp", "interpolate"]
