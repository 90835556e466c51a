"""Sampler families (math layer). The public entry point is ``sgm_lightning.sampling.sample``.

Modules: ``common`` (result type, NFE counting, grids, Tweedie, Langevin step), ``pc``
(predictor-corrector), ``ancestral`` (DDPM, DDIM), ``ode`` (probability flow), ``heun`` (EDM),
``ald`` (annealed / plain Langevin).
"""

from sgm_lightning.samplers.ald import ald, langevin
from sgm_lightning.samplers.ancestral import ddim, ddpm
from sgm_lightning.samplers.common import SampleResult
from sgm_lightning.samplers.heun import heun, karras_sigmas
from sgm_lightning.samplers.ode import ode
from sgm_lightning.samplers.pc import CORRECTORS, PREDICTORS, pc

METHODS = ("pc", "ddpm", "ddim", "ode", "heun", "ald")

__all__ = ["METHODS", "PREDICTORS", "CORRECTORS", "SampleResult", "pc", "ddpm", "ddim", "ode", "heun", "ald",
           "langevin", "karras_sigmas"]
