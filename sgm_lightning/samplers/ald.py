"""Langevin dynamics: plain (Welling & Teh 2011) and annealed (Song & Ermon 2019, Alg. 1).

Langevin dynamics with step alpha (Song & Ermon 2019, Eq. 4):

    x_k = x_{k-1} + alpha / 2 grad_x log p(x_{k-1}) + sqrt(alpha) z_k,   z_k ~ N(0, I).

Plain Langevin mixes badly between well-separated modes: started from a broad distribution, the
relative mode weights stay wrong for any practical number of steps (Song & Ermon 2019, Sec. 3.2,
Fig. 3). Annealed Langevin dynamics runs T_steps Langevin steps at each of L noise levels
sigma_1 > ... > sigma_L, on p_{sigma_i}, with step alpha_i = step_lr sigma_i^2 / sigma_L^2.

Any linear SDE has p_t(x) = alpha^{-D} p~(x / alpha; n), p~(.; n) = p_data * N(0, n^2 I) with the
noise-to-signal ratio n = sigma(t) / alpha(t): in the scaled variable x~ = x / alpha the SDE's
marginals are exactly NCSN's perturbed densities with sigma = n. Langevin runs on x~ with
sigma_i = n(t_i) at L times t_1 = T > ... > t_L = eps; the default ``grid="logsnr"`` makes n
geometric (for VE, x~ = x and this is NCSN's geometric sigma ladder); the score of p~ is
alpha grad log p_t(alpha x~). Without the scaling, VP-type chains would have to undo the shrinking by alpha(t) with steps ~ sigma_i^2 and
stay biased. The default ``step_lr`` is 0.2 sigma_L^2, the paper's ratio (2e-5 for sigma_L = 0.01). With ``denoise=True`` the sampler returns
Tweedie's x0_hat at the last level (Song & Ermon 2020's final denoising step; one extra NFE).
NFE = L * steps_per_level (+ 1).
"""

from __future__ import annotations

from typing import Callable

import torch

from sgm_lightning.samplers.common import CountingScore, Recorder, batch_time, langevin_step, tweedie_x0
from sgm_lightning.samplers.grids import make_grid
from sgm_lightning.sde import SDE
from sgm_lightning.utils import check_int, check_positive, randn_like


DEFAULT_LR_RATIO = 0.2  # step_lr / sigma_L^2: Song & Ermon 2019 use 2e-5 with sigma_L = 0.01


def langevin(score_fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, step_size: float, n_steps: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain (non-annealed) Langevin dynamics (Song & Ermon 2019, Eq. 4) on a fixed density.

    Args:
        score_fn: ``score_fn(x) -> grad_x log p(x)`` (no time argument; p does not change).
        x0: start points (B, ...).
        step_size: alpha in Eq. 4 (> 0).
        n_steps: number of steps K (integer >= 0).
        generator: torch.Generator for the noise (None = global RNG).
    Returns:
        x_K, shaped like ``x0``.
    """
    check_positive("step_size", step_size)
    n_steps = check_int("n_steps", n_steps, min=0)
    x = x0
    for _ in range(n_steps):
        x, _ = langevin_step(x, score_fn(x), 0.5 * step_size, randn_like(x, generator))
    return x


def ald(score: CountingScore, sde: SDE, x: torch.Tensor, *, steps: int, eps: float | None,
        generator: torch.Generator | None, denoise: bool, record: Recorder, steps_per_level: int = 100,
        step_lr: float | None = None, grid: str = "logsnr") -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) with ``steps`` noise levels; see module doc."""
    steps_per_level = check_int("steps_per_level", steps_per_level)
    eps = sde.default_eps if eps is None else eps
    times = make_grid(grid, sde, eps, steps, device=x.device)
    alphas, sigmas = sde.marginal_coeffs(times)
    levels = sigmas / alphas  # NCSN's sigma_i for the scaled variable x~ = x / alpha
    if step_lr is None:
        step_lr = float(DEFAULT_LR_RATIO * levels[-1] ** 2)
    check_positive("step_lr", step_lr)
    xt = x / float(alphas[0])
    for i in range(steps):
        t, a = batch_time(times[i], x), float(alphas[i])
        step = float(step_lr * levels[i] ** 2 / levels[-1] ** 2)
        for _ in range(steps_per_level):
            s_tilde = a * score(a * xt, t)  # grad of log p~(x~; n_i) = alpha grad log p_t(alpha x~)
            xt, _ = langevin_step(xt, s_tilde, 0.5 * step, randn_like(xt, generator))
        record(i, times[i], a * xt)
    x = float(alphas[-1]) * xt
    if denoise:
        t = batch_time(times[-1], x)
        x = tweedie_x0(sde, x, t, score(x, t))
    return x
