"""EDM-style second-order Heun sampler (Karras et al. 2022, Alg. 1; optional churn of Alg. 2).

Any linear SDE has p_t(x) = alpha^{-D} p~(x / alpha; n) with p~(.; n) = p_data * N(0, n^2 I) and
the noise-to-signal ratio n(t) = sigma(t) / alpha(t) (``sde.noise_to_signal``). On the scaled
variable x~ = x / alpha the probability-flow ODE (Song et al. 2021, Eq. 13) becomes Karras et al.'s
ODE with sigma(t) = t, s(t) = 1 (Eq. 4 with Table 1 "EDM"):

    dx~/dn = (x~ - D(x~; n)) / n,    D(x~; n) = x0_hat = (x + sigma^2 grad log p_t(x)) / alpha  (Tweedie),

evaluated at x = alpha(t) x~, t = ``sde.t_from_noise_to_signal(n)``. Noise levels n_i = n(t_i)
come from the time grid (``grid``, default "karras": Karras et al.'s Eq. 5 ladder from
n_max = n(T) to n_min = n(eps) with exponent ``rho``; see ``grids``), followed by n_N = 0. Each
step is Heun's method; the last step (to n_N = 0) is an Euler step, which lands exactly on D(x~; n_min), i.e. Tweedie's x0_hat at t = eps: that is the
``denoise=True`` output. NFE = 2 N - 1. With ``denoise=False`` the last step is dropped and the
sampler returns x at t = eps (NFE = 2 N - 2).

Stochastic churn (Alg. 2): with ``s_churn > 0``, at levels in [s_tmin, s_tmax] the level is raised
to n_hat = n_i (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1) (capped at n_max), by adding
noise of std sqrt(n_hat^2 - n_i^2) s_noise before the step.
"""

from __future__ import annotations

import math

import torch

from sgm_lightning.samplers.common import CountingScore, Recorder, batch_time, tweedie_x0
from sgm_lightning.samplers.grids import make_grid
from sgm_lightning.sde import SDE
from sgm_lightning.utils import check_number, check_positive, randn_like


def heun(score: CountingScore, sde: SDE, x: torch.Tensor, *, steps: int, eps: float | None,
         generator: torch.Generator | None, denoise: bool, record: Recorder, rho: float = 7.0,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
         grid: str = "karras") -> torch.Tensor:
    """Heun's 2nd-order sampler on the Karras grid (Karras et al. 2022, Alg. 1 / 2); see module doc."""
    s_churn, s_tmin, s_noise = (check_number(name, v, 0.0, what=" >= 0")
                                for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)))
    s_tmax = check_number("s_tmax", s_tmax, what=" (a noise-to-signal level; math.inf: no upper bound)")
    if s_churn > 0 and s_tmin > s_tmax:  # Alg. 2 churns on [S_tmin, S_tmax]: an empty range would drop s_churn
        raise ValueError(f"s_tmin={s_tmin!r} > s_tmax={s_tmax!r} leaves no noise level to churn at (s_churn="
                         f"{s_churn!r} would be ignored): churn happens for levels in [s_tmin, s_tmax]; swap them")
    eps = sde.default_eps if eps is None else eps
    T64 = torch.tensor(sde.T, dtype=torch.float64)
    check_positive("rho", rho)
    times = make_grid(grid, sde, eps, steps, rho)
    sigmas = torch.cat([sde.noise_to_signal(times), times.new_zeros(1)])
    n_max = float(sigmas[0])
    times = torch.cat([times, times.new_zeros(1)])

    def denoiser(xt: torch.Tensor, i: int, n: float | None = None) -> torch.Tensor:
        """D(x~; n) at level n (grid level i unless n is given)."""
        t = times[i] if n is None else sde.t_from_noise_to_signal(torch.tensor(n, dtype=torch.float64))
        tb = batch_time(t, xt)
        a = float(sde.alpha(t))
        xs = a * xt
        return tweedie_x0(sde, xs, tb, score(xs, tb))

    xt = x / float(sde.alpha(T64))
    n_steps = steps if denoise else steps - 1
    gamma_max = min(s_churn / steps, math.sqrt(2) - 1)
    for i in range(n_steps):
        n_cur, n_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = gamma_max if s_tmin <= n_cur <= s_tmax else 0.0
        n_hat = min(n_cur * (1 + gamma), n_max)
        if n_hat > n_cur:
            xt = xt + math.sqrt(n_hat**2 - n_cur**2) * s_noise * randn_like(xt, generator)
            d = (xt - denoiser(xt, i, n_hat)) / n_hat
        else:
            d = (xt - denoiser(xt, i)) / n_hat
        x_next = xt + (n_next - n_hat) * d
        if n_next > 0:
            d_next = (x_next - denoiser(x_next, i + 1)) / n_next
            x_next = xt + (n_next - n_hat) * 0.5 * (d + d_next)
        xt = x_next
        record(i, times[i + 1], float(sde.alpha(times[i + 1])) * xt)
    return float(sde.alpha(times[n_steps])) * xt
