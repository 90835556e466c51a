"""Time grids for every sampler (kept apart from the solvers, as k-diffusion keeps its schedules).

Each grid is a decreasing float64 tensor of ``n`` times from t = T to t = eps (both ends exact):

    "uniform"  t_i = T + i / (n - 1) (eps - T)                  (Song et al. 2021's sampling grid)
    "logsnr"   uniform in the half log-SNR lambda(t) = log(alpha(t) / sigma(t))
               (Lu et al. 2022, DPM-Solver, Sec. 3.3 "logSNR"); equivalently geometric in the
               noise-to-signal ratio n = sigma / alpha = exp(-lambda) (NCSN's geometric sigma ladder)
    "karras"   n_i = (n_max^(1/rho) + i / (n - 1) (n_min^(1/rho) - n_max^(1/rho)))^rho  (Karras et al.
               2022, Eq. 5) in the noise-to-signal ratio n, rho = 7 by default

A grid in n (or lambda) is mapped back to t with ``sde.t_from_noise_to_signal``; nothing here
depends on the SDE's type.
"""

from __future__ import annotations

import math

import torch

from sgm_lightning.sde import SDE
from sgm_lightning.utils import check_choice, check_positive

GRIDS = ("uniform", "logsnr", "karras")


def time_grid(T: float, eps: float, n: int, device=None) -> torch.Tensor:
    """n times from T down to eps, evenly spaced, float64 (Song et al. 2021's sampling grid)."""
    return torch.linspace(T, eps, n, dtype=torch.float64, device=device)


def karras_sigmas(n_max: float, n_min: float, steps: int, rho: float = 7.0, device=None) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: ``steps`` levels from n_max to n_min (float64), followed by 0."""
    check_positive("rho", rho)
    frac = torch.arange(steps, dtype=torch.float64, device=device) / max(steps - 1, 1)
    hi, lo = n_max ** (1.0 / rho), n_min ** (1.0 / rho)
    sig = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def _ratio_range(sde: SDE, eps: float) -> tuple[float, float]:
    """(n(T), n(eps)): the noise-to-signal ratio at both ends."""
    n_hi = float(sde.noise_to_signal(torch.tensor(sde.T, dtype=torch.float64)))
    n_lo = float(sde.noise_to_signal(torch.tensor(eps, dtype=torch.float64)))
    return n_hi, n_lo


def _times_from_ratios(sde: SDE, ratios: torch.Tensor, eps: float) -> torch.Tensor:
    times = sde.t_from_noise_to_signal(ratios)
    times[0], times[-1] = sde.T, eps  # exact end points
    return times


def logsnr_grid(sde: SDE, eps: float, n: int, device=None) -> torch.Tensor:
    """n times from T to eps uniform in lambda = log(alpha / sigma) (float64)."""
    n_hi, n_lo = _ratio_range(sde, eps)
    ratios = torch.exp(torch.linspace(math.log(n_hi), math.log(n_lo), n, dtype=torch.float64))
    return _times_from_ratios(sde, ratios, eps).to(device)


def karras_grid(sde: SDE, eps: float, n: int, rho: float = 7.0, device=None) -> torch.Tensor:
    """n times from T to eps on the Karras et al. 2022 (Eq. 5) noise-to-signal ladder (float64)."""
    n_hi, n_lo = _ratio_range(sde, eps)
    return _times_from_ratios(sde, karras_sigmas(n_hi, n_lo, n, rho)[:-1], eps).to(device)


def make_grid(name: str, sde: SDE, eps: float, n: int, rho: float = 7.0, device=None) -> torch.Tensor:
    """The grid ``name`` (one of GRIDS) with n >= 1 times from T to eps (n = 1 gives [T])."""
    check_choice("grid", name, GRIDS)
    if n == 1:
        return torch.full((1,), float(sde.T), dtype=torch.float64, device=device)
    if name == "uniform":
        return time_grid(sde.T, eps, n, device=device)
    if name == "logsnr":
        return logsnr_grid(sde, eps, n, device=device)
    return karras_grid(sde, eps, n, rho, device=device)
