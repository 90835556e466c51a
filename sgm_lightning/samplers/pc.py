"""Predictor-corrector sampling (Song et al. 2021, Alg. 1; Alg. 2 for VE, Alg. 3 for VP).

Written once for every SDE: predictors ask the reverse-time SDE object (``sde.reverse(score)``)
for its drift / discretization, the corrector asks ``sde.transition_coeffs`` for the one-step
signal scale. Nothing here branches on the SDE's type.

Grid: t_0 = T > ... > t_{n-1} = eps (``grid``: "uniform" = ``linspace(T, eps, steps)`` by default, or
"logsnr" / "karras", see ``grids``; float64). At every t_i the
corrector runs ``corrector_steps`` Langevin steps at t_i, then the predictor moves from t_i to
t_{i+1} (t_n = 0: the last predictor step goes from eps to 0). With ``denoise=True`` the sampler
returns the last predictor step's noise-free mean x_mean (as score_sde does).
NFE = steps * (corrector_steps + 1) for Langevin (no predictor / corrector evaluations when set to "none").

Predictors (one reverse step t -> t - dt, z ~ N(0, I)):
    "reverse_diffusion": x_mean = x - f_rev, x = x_mean + G z, with (f_rev, G) the reverse
                         discretization of the exact forward kernel (Song et al. 2021, Eq. 46)
    "euler_maruyama":    x_mean = x - [f - g^2 s] dt, x = x_mean + g sqrt(dt) z (Eq. 6)
    "ancestral":         the exact posterior step q(x_{t-dt} | x_t, x0_hat) (Eq. 47 for VE; DDPM for VP)
    "none":              x unchanged (corrector-only sampling)
Corrector "hmc": Hamiltonian / underdamped Langevin at fixed t (Neal 2011, Sec. 5.5.3): partial momentum
refresh v = gamma v + sqrt(1 - gamma^2) z (``hmc_persistence`` gamma, 0 = full refresh), then
``hmc_leapfrog`` leapfrog steps of size delta = sqrt(2 eps_i) with eps_i the Langevin SNR rule below
(one leapfrog step with gamma = 0 is exactly the Langevin step); no Metropolis test (the density is
not available, only its score), so like the Langevin corrector it is invariant for p_t up to the
step-size bias. NFE per corrector step = hmc_leapfrog + 1.
Corrector "langevin" (Song et al. 2021, Alg. 4 / 5):
    eps_i = 2 alpha_i (r ||z|| / ||s||)^2,  x = x + eps_i s + sqrt(2 eps_i) z,
with r the target signal-to-noise ratio ``snr`` and alpha_i = alpha_{t|t-dt}^2 (= 1 for VE,
= 1 - beta_i for VP). ``snr_norm`` says where the norms are taken:
    "batch"   (default) the per-example norms ||z||, ||s|| averaged over the batch (as score_sde
              does): one step size for the whole batch, independent of the position x;
    "example" each example's own norms (Alg. 4 read per sample): the step then depends on x
              (and on the noise z it multiplies), which breaks the Langevin chain's invariance: with
              exact scores it over-disperses (2-D mixture: mode weight 0.69 instead of 0.80; 16-D
              Gaussian: covariance error 0.13 vs 0.04; see benchmarks/samplers.py). In low dimension
              ||s|| -> 0 near a mode makes eps_i heavy-tailed (E[1 / chi^2_2] is infinite).
"""


from __future__ import annotations

import torch

from sgm_lightning.samplers.ancestral import posterior_step
from sgm_lightning.samplers.common import CountingScore, Recorder, batch_time, langevin_step, per_example_norm
from sgm_lightning.samplers.grids import make_grid
from sgm_lightning.sde import SDE
from sgm_lightning.utils import bcast, check_choice, check_int, check_number, check_positive, randn_like

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral", "none")
CORRECTORS = ("langevin", "hmc", "none")


def predict(kind: str, sde: SDE, score: CountingScore, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
            generator: torch.Generator | None):
    """One predictor step from t to t - dt (dt > 0). Returns (x, x_mean)."""
    if kind == "none":
        return x, x
    if kind == "ancestral":
        return posterior_step(sde, x, t, t - dt, score(x, t), generator)
    rsde = sde.reverse(score)
    if kind == "reverse_diffusion":
        rev_f, rev_g = rsde.discretize(x, t, dt)
        x_mean = x - rev_f
        return x_mean + bcast(rev_g, x) * randn_like(x, generator), x_mean
    drift, g = rsde.sde(x, t)  # euler_maruyama
    dt_x = dt.to(x.dtype)
    x_mean = x - drift * dt_x
    return x_mean + bcast(g, x) * torch.sqrt(dt_x) * randn_like(x, generator), x_mean


SNR_NORMS = ("batch", "example")


def snr_step_size(sde: SDE, t: torch.Tensor, dt: torch.Tensor, s: torch.Tensor, z: torch.Tensor, snr: float,
                  snr_norm: str) -> torch.Tensor:
    """eps_i = 2 alpha_i (r ||z|| / ||s||)^2 (Song et al. 2021, Alg. 4/5), shape (B,)."""
    a_ts, _ = sde.transition_coeffs(t, t - dt)
    alpha_i = (a_ts * a_ts).to(s.dtype)
    z_norm, s_norm = per_example_norm(z), per_example_norm(s)
    if snr_norm == "batch":
        z_norm, s_norm = z_norm.mean().expand_as(z_norm), s_norm.mean().expand_as(s_norm)
    ratio = snr * z_norm / s_norm.clamp_min(torch.finfo(s.dtype).tiny)
    return 2 * alpha_i * ratio * ratio


def langevin_correct(sde: SDE, score: CountingScore, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                     snr: float, generator: torch.Generator | None, snr_norm: str = "batch"):
    """One Langevin corrector step at time t with the SNR step-size rule (Song et al. 2021, Alg. 4/5)."""
    s = score(x, t)
    z = randn_like(x, generator)
    return langevin_step(x, s, snr_step_size(sde, t, dt, s, z, snr, snr_norm), z)


def hmc_correct(sde: SDE, score: CountingScore, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                dt: torch.Tensor, snr: float, generator: torch.Generator | None, snr_norm: str = "batch",
                leapfrog: int = 3, persistence: float = 0.0):
    """One Hamiltonian (underdamped) Langevin corrector step at time t targeting p_t (see module doc).

    Returns (x, x, v). NFE = leapfrog + 1.
    """
    s = score(x, t)
    z = randn_like(x, generator)
    v = persistence * v + (1 - persistence**2) ** 0.5 * z  # partial momentum refresh
    delta = bcast(snr_step_size(sde, t, dt, s, z, snr, snr_norm), x).mul(2).sqrt()  # eps_i = delta^2 / 2
    for _ in range(leapfrog):  # leapfrog (Neal 2011, Eq. 5.18-5.20) on H = -log p_t(x) + |v|^2 / 2
        v = v + 0.5 * delta * s
        x = x + delta * v
        s = score(x, t)
        v = v + 0.5 * delta * s
    return x, x, v


def pc(score: CountingScore, sde: SDE, x: torch.Tensor, *, steps: int, eps: float | None,
       generator: torch.Generator | None, denoise: bool, record: Recorder,
       predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
       corrector_steps: int = 1, snr_norm: str = "batch", grid: str = "uniform", hmc_leapfrog: int = 3,
       hmc_persistence: float = 0.0) -> torch.Tensor:
    """Predictor-corrector sampler (Song et al. 2021, Alg. 1); see the module docstring."""
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    check_positive("snr", snr)
    check_choice("snr_norm", snr_norm, SNR_NORMS)
    corrector_steps = check_int("corrector_steps", corrector_steps, min=0)
    hmc_leapfrog = check_int("hmc_leapfrog", hmc_leapfrog)
    hmc_persistence = check_number("hmc_persistence", hmc_persistence, 0.0, 1.0, hi_open=True, what=" in [0, 1)")
    n_corr = corrector_steps if corrector != "none" else 0
    if predictor == "none" and n_corr == 0:
        raise ValueError("predictor='none' needs corrector='langevin' or 'hmc' with corrector_steps >= 1")
    eps = sde.default_eps if eps is None else eps
    grid = make_grid(grid, sde, eps, steps, device=x.device)
    grid = torch.cat([grid, grid.new_zeros(1)])
    x_mean, v = x, torch.zeros_like(x)
    for i in range(steps):
        t = batch_time(grid[i], x)
        dt = grid[i] - grid[i + 1]
        for _ in range(n_corr):
            if corrector == "hmc":
                x, x_mean, v = hmc_correct(sde, score, x, v, t, dt, snr, generator, snr_norm, hmc_leapfrog,
                                           hmc_persistence)
            else:
                x, x_mean = langevin_correct(sde, score, x, t, dt, snr, generator, snr_norm)
        x, x_mean = predict(predictor, sde, score, x, t, dt, generator)
        record(i, grid[i + 1], x)
    return x_mean if denoise else x
