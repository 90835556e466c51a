"""Ancestral samplers: DDPM (Ho et al. 2020, Alg. 2) and DDIM (Song, Meng & Ermon 2021, Eq. 12).

Both are written for any linear SDE through the exact Gaussian transition kernel
(``sde.transition_coeffs``) and the marginal (alpha, sigma) (``sde.marginal_coeffs``). With
x_t = alpha_t x_0 + sigma_t eps, Tweedie's formula gives x0_hat = (x_t + sigma_t^2 s) / alpha_t and
eps_hat = -sigma_t s, and the posterior of the forward process between s < t is

    q(x_s | x_t, x_0) = N(mu, var),   mu  = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t
                                          + alpha_s sigma_{t|s}^2 / sigma_t^2 x_0,
                                      var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2
                                                             (Kingma et al. 2021, Eq. 31-32)

For VP this is Ho et al.'s posterior (Eq. 6-7; Alg. 2 with sigma_t^2 = beta_tilde_t); for VE it is
SMLD ancestral sampling (Song et al. 2021, Eq. 47).

Time grid: t_1 > ... > t_n, then a final step to t = 0. The grid is ``grids.make_grid(grid, sde, eps, steps)``
("uniform" = ``linspace(T, eps, steps)`` by default). DDPM's default eps is T / steps, which makes
its default grid the SDE's discrete DDPM grid ``sde.discrete_times(steps)`` (i T / steps); DDIM's is
``sde.default_eps``. The last step (t_n -> 0) uses no noise: with ``denoise=True`` the
sampler returns that noise-free mean (for VP it is exactly Tweedie's x0_hat at t_n; for VE it is
the mean of the kernel down to sigma(0) = sigma_min). NFE = steps.
"""

from __future__ import annotations

import torch

from sgm_lightning.samplers.common import CountingScore, Recorder, batch_time, tweedie_x0
from sgm_lightning.samplers.grids import make_grid
from sgm_lightning.sde import SDE
from sgm_lightning.utils import bcast, check_number, randn_like


def ancestral_grid(sde: SDE, steps: int, eps: float, grid: str = "uniform", device=None) -> torch.Tensor:
    """Decreasing float64 grid of ``steps`` times from T to eps followed by 0 (shape (steps + 1,))."""
    times = make_grid(grid, sde, eps, steps, device=device)
    return torch.cat([times, times.new_zeros(1)])


def posterior_coeffs(sde: SDE, t: torch.Tensor, s: torch.Tensor):
    """(c_x, c_x0, std) with q(x_s | x_t, x_0) = N(c_x x_t + c_x0 x_0, std^2 I) for s < t (see module doc)."""
    a_ts, s_ts = sde.transition_coeffs(t, s)
    a_s, sig_s = sde.marginal_coeffs(s)
    _, sig_t = sde.marginal_coeffs(t)
    var_t = sig_t * sig_t
    c_x = a_ts * sig_s * sig_s / var_t
    c_x0 = a_s * s_ts * s_ts / var_t
    std = s_ts * sig_s / sig_t
    return c_x, c_x0, std


def _x0_eps(sde: SDE, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor):
    """Tweedie: x0_hat = (x + sigma^2 s) / alpha and eps_hat = -sigma s."""
    sigma = bcast(sde.sigma(t).to(x.dtype), x)
    return tweedie_x0(sde, x, t, score), -sigma * score


def posterior_step(sde: SDE, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, score: torch.Tensor,
                   generator: torch.Generator | None, noise: bool = True):
    """One ancestral step x_t -> x_s ~ q(x_s | x_t, x0_hat). Returns (x_s, mean)."""
    x0_hat, _ = _x0_eps(sde, x, t, score)
    c_x, c_x0, std = (bcast(c.to(x.dtype), x) for c in posterior_coeffs(sde, t, s))
    mean = c_x * x + c_x0 * x0_hat
    return (mean + std * randn_like(x, generator) if noise else mean), mean


def ddpm(score: CountingScore, sde: SDE, x: torch.Tensor, *, steps: int, eps: float | None,
         generator: torch.Generator | None, denoise: bool, record: Recorder, grid: str = "uniform") -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) as the exact posterior q(x_s | x_t, x0_hat)."""
    grid = ancestral_grid(sde, steps, sde.T / steps if eps is None else eps, grid, device=x.device)
    for i in range(steps):
        t, s = batch_time(grid[i], x), batch_time(grid[i + 1], x)
        x, _ = posterior_step(sde, x, t, s, score(x, t), generator, noise=not (i == steps - 1 and denoise))
        record(i, grid[i + 1], x)
    return x


def ddim(score: CountingScore, sde: SDE, x: torch.Tensor, *, steps: int, eps: float | None,
         generator: torch.Generator | None, denoise: bool, record: Recorder, eta: float = 0.0,
         grid: str = "uniform") -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12) with stochasticity eta (Eq. 16):

        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - sigma_eta^2) eps_hat + sigma_eta z,
        sigma_eta^2 = eta^2 sigma_{t|s}^2 sigma_s^2 / sigma_t^2 (eta^2 times the posterior variance).

    eta = 0 is deterministic (a first-order solver of the probability-flow ODE); eta = 1 is the
    DDPM posterior step. Grid: ``linspace(T, eps, steps)`` (eps = ``sde.default_eps`` unless given),
    then a final step to t = 0 that adds no noise.
    """
    # eta <= 1 keeps sigma_eta <= sigma_s (as sigma_{t|s} <= sigma_t); above, the noise would exceed the marginal's
    eta = check_number("eta", eta, 0.0, 1.0, what=" in [0, 1] (0 = deterministic DDIM, 1 = DDPM; Song et al. Eq. 16)")
    grid = ancestral_grid(sde, steps, sde.default_eps if eps is None else eps, grid, device=x.device)
    for i in range(steps):
        t, s = batch_time(grid[i], x), batch_time(grid[i + 1], x)
        x0_hat, eps_hat = _x0_eps(sde, x, t, score(x, t))
        _, _, post_std = posterior_coeffs(sde, t, s)
        a_s, sig_s = sde.marginal_coeffs(s)
        last = i == steps - 1 and denoise
        std_eta = torch.zeros_like(post_std) if last else eta * post_std
        c_eps = (sig_s * sig_s - std_eta * std_eta).clamp_min(0.0).sqrt()
        a_s, c_eps, std_eta = (bcast(c.to(x.dtype), x) for c in (a_s, c_eps, std_eta))
        x = a_s * x0_hat + c_eps * eps_hat
        if eta > 0 and not last:
            x = x + std_eta * randn_like(x, generator)
        record(i, grid[i + 1], x)
    return x
