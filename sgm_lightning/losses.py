"""Training objectives of score-based generative models.

Noise-conditional losses (``DSMLoss``, ``DDPMLoss``, ``NCSNLoss``) are callables

    loss(model, x0, generator=None, return_t=False, **cond) -> (B,)   [or ((B,), t) with return_t]

where ``model`` is a :class:`sgm_lightning.parametrization.ScoreModel` and ``**cond`` (e.g. ``y=``
class labels) is forwarded to it. They perturb x0 with the SDE's Gaussian kernel,
x_t = alpha(t) x0 + sigma(t) z, and compare the model with the kernel's score
grad log p_0t(x_t | x0) = -z / sigma(t). Per example the squared error is averaged over the data
dimensions (``reduce="mean"``, the default: losses are comparable across resolutions) or summed
(``reduce="sum"``, the objective exactly as written in the papers). The LightningModule reduces over
the batch.

``EDMLoss`` is Karras et al. 2022's objective (log-normal noise levels, weighting
(sigma^2 + sigma_data^2) / (sigma sigma_data)^2) with the same signature; ``dsm_grid_loss`` is the
deterministic validation loss (DSM on a fixed grid of t with fixed noise).

The noise-free objectives (``SlicedScoreMatchingLoss``, ``ImplicitScoreMatchingLoss``, ``FDSMLoss``)
live in ``sgm_lightning.score_matching`` and are importable from here too.
"""

from __future__ import annotations

import math

import torch

from sgm_lightning.sde import SDE
from sgm_lightning.utils import (batch_dim_mean, batch_dim_sum, bcast, check_choice, check_int, check_positive,
                                 rand_like_batch, randn_like)

_REDUCTIONS = ("mean", "sum")

from sgm_lightning.score_matching import (FDSMLoss, ImplicitScoreMatchingLoss,  # noqa: E402,F401 (public here)
                                          SlicedScoreMatchingLoss)


def _reduce(err: torch.Tensor, reduce: str) -> torch.Tensor:
    return batch_dim_mean(err) if reduce == "mean" else batch_dim_sum(err)


def _eps_error(sde: SDE, model, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None,
               reduce: str, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturb x_t = alpha(t) x0 + sigma(t) z with fresh z and return (|| eps_theta(x_t, t) - z ||^2 reduced
    per example, t in x0's dtype). Coefficients are taken at ``t`` as given (float64 grids stay exact)."""
    if not torch.is_floating_point(x0):
        raise ValueError(f"x0 must be a floating-point tensor, got dtype {x0.dtype}: convert the data, e.g. x0.float()")
    z = randn_like(x0, generator)
    alpha, sigma = (c.to(x0.dtype) for c in sde.marginal_coeffs(t))
    t = t.to(x0.dtype)
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * z
    return _reduce((model.outputs(x_t, t, **cond).eps - z) ** 2, reduce), t


def _check_eps(eps: float, sde: SDE) -> float:
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
    return float(eps)


class DSMLoss:
    """Continuous-time denoising score matching (Song et al. 2021, Eq. 7).

        L(theta) = E_{t ~ U(eps, T)} E_{x0, z} [ lambda(t) || s_theta(x_t, t) + z / sigma(t) ||^2 ],
        x_t = alpha(t) x0 + sigma(t) z.

    Since s_theta = -eps_theta / sigma (Tweedie; ``ScoreModel.outputs``), the bracket equals
    (lambda(t) / sigma(t)^2) || eps_theta(x_t, t) - z ||^2 for *every* prediction type; the loss is
    computed in this epsilon form, which is exactly the weighted score-matching objective and stays
    finite at small sigma for eps-/v-/EDM-parametrized models. The weights:

    * ``weighting="sigma2"``: lambda(t) = sigma(t)^2 (Song et al. 2021), so the loss is
      || sigma s_theta + z ||^2 = || eps_theta - z ||^2 (Ho et al. 2020's "simple" loss in continuous t).
    * ``weighting="likelihood"``: lambda(t) = g(t)^2 (Song, Durkan et al. 2021, Thm. 1: the objective
      then bounds the negative log-likelihood), i.e. weight g(t)^2 / sigma(t)^2 on || eps_theta - z ||^2.

    With ``importance_sampling=True`` (likelihood weighting only) t is drawn from
    q(t) ∝ g(t)^2 / sigma(t)^2 on [eps, T] (Song, Durkan et al. 2021, Sec. 5.1) by inverting a
    float64-tabulated CDF, and each term is multiplied by (g^2 / sigma^2)(t) / ((T - eps) q(t)); q is
    the exact (piecewise-constant) density of the sampler, so the estimator is unbiased for the same
    objective as uniform t, with far lower variance.

    Args:
        sde: the forward process.
        weighting: "sigma2" or "likelihood".
        eps: smallest time (default ``sde.default_eps``).
        importance_sampling: sample t ∝ g^2 / sigma^2 (needs ``weighting="likelihood"``).
        reduce: "mean" (default) or "sum" over data dimensions per example.
        grid_size: number of float64 grid points of the tabulated importance-sampling CDF.
    """

    def __init__(self, sde: SDE, weighting: str = "sigma2", eps: float | None = None,
                 importance_sampling: bool = False, reduce: str = "mean", grid_size: int = 4096):
        check_choice("weighting", weighting, ("sigma2", "likelihood"))
        check_choice("reduce", reduce, _REDUCTIONS)
        check_int("grid_size", grid_size, min=2)  # the tabulated CDF needs the two ends [eps, T]
        if importance_sampling and weighting != "likelihood":
            raise ValueError("importance_sampling=True needs weighting='likelihood' "
                             f"(got weighting={weighting!r}); with sigma2 weighting t is sampled uniformly")
        self.sde = sde
        self.weighting = weighting
        self.eps = _check_eps(sde.default_eps if eps is None else eps, sde)
        self.importance_sampling = bool(importance_sampling)
        self.reduce = reduce
        if self.importance_sampling:
            self._grid, self._cdf, self._Z = self._tabulate(int(grid_size))

    # ----------------------------------------------------------------- weights and t-sampling
    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) / sigma(t)^2: the weight of || eps_theta - z ||^2 (1 or g^2 / sigma^2)."""
        if self.weighting == "sigma2":
            return torch.ones_like(t)
        _, g = self.sde.drift_coeff_and_diffusion(t)
        sigma = self.sde.sigma(t)
        return (g / sigma) ** 2

    def _tabulate(self, m: int):
        """Grid, normalised CDF and normaliser Z = int_eps^T g^2 / sigma^2 dt (trapezoid, float64).

        The grid is the union of a uniform and a geometric grid on [eps, T] so that it resolves the
        1/t growth of g^2 / sigma^2 near t = 0 (VP, sub-VP) as well as the bulk.
        """
        T, eps = self.sde.T, self.eps
        lin = torch.linspace(eps, T, m, dtype=torch.float64)
        geo = torch.exp(torch.linspace(math.log(eps), math.log(T), m, dtype=torch.float64))
        grid = torch.unique(torch.cat([lin, geo]))  # sorted
        grid = grid.clamp(eps, T)
        w = self.snr_weight(grid)
        mass = 0.5 * (w[1:] + w[:-1]) * (grid[1:] - grid[:-1])
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mass, 0)])
        Z = cdf[-1].item()
        return grid, cdf / Z, Z

    def sample_t(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw t (B,) in x0's dtype and the factor multiplying lambda / sigma^2 (1 without IS)."""
        u = rand_like_batch(x0, generator, dtype=torch.float64)
        if not self.importance_sampling:
            t = self.eps + (self.sde.T - self.eps) * u
            return t.to(x0.dtype), torch.ones_like(t, dtype=x0.dtype)
        grid, cdf = self._grid.to(x0.device), self._cdf.to(x0.device)
        k = torch.searchsorted(cdf, u, right=True).clamp(1, len(grid) - 1) - 1
        dF, dt = cdf[k + 1] - cdf[k], grid[k + 1] - grid[k]
        t = grid[k] + (u - cdf[k]) / dF * dt
        q = dF / dt  # exact density of t under this piecewise-linear inverse CDF
        return t.to(x0.dtype), (1.0 / ((self.sde.T - self.eps) * q)).to(x0.dtype)

    # ----------------------------------------------------------------- loss
    def __call__(self, model, x0: torch.Tensor, generator: torch.Generator | None = None,
                 return_t: bool = False, **cond):
        t, is_factor = self.sample_t(x0, generator)
        err, t = _eps_error(self.sde, model, x0, t, generator, self.reduce, cond)
        loss = self.snr_weight(t).to(x0.dtype) * is_factor * err
        return (loss, t) if return_t else loss


class DDPMLoss:
    """DDPM's simple loss (Ho et al. 2020, Eq. 14 and Alg. 1):

        L_simple = E_{i ~ U{1..N}, x0, z} || z - eps_theta(sqrt(alpha_bar_i) x0 + sqrt(1 - alpha_bar_i) z, t_i) ||^2

    on the SDE's discrete grid t_i = ``sde.discrete_times(N)[i - 1]`` (so alpha_bar_i = alpha(t_i)^2).

    Args:
        sde: the forward process (VP for DDPM proper; any SDE works via its kernel).
        N: number of discrete steps (default ``sde.N``).
        reduce: "mean" (default) or "sum" over data dimensions per example.
    """

    def __init__(self, sde: SDE, N: int | None = None, reduce: str = "mean"):
        if N is not None:
            check_positive("N", N, integer=True)
        check_choice("reduce", reduce, _REDUCTIONS)
        self.sde = sde
        self.N = sde.N if N is None else int(N)
        self.reduce = reduce
        self._times = sde.discrete_times(self.N)

    def __call__(self, model, x0: torch.Tensor, generator: torch.Generator | None = None,
                 return_t: bool = False, **cond):
        i = torch.randint(0, self.N, (x0.shape[0],), generator=generator, device=x0.device)
        loss, t = _eps_error(self.sde, model, x0, self._times.to(x0.device)[i], generator, self.reduce, cond)
        return (loss, t) if return_t else loss


class NCSNLoss:
    """Noise-conditional denoising score matching over a geometric noise ladder (Song & Ermon 2019, Eq. 5-6):

        L = 1/L sum_i lambda(sigma_i) 1/2 E || s_theta(x~, sigma_i) + (x~ - x) / sigma_i^2 ||^2,
        lambda(sigma) = sigma^2,  sigma_1 > ... > sigma_L geometric,

    i.e. 1/2 || sigma_i s_theta + z ||^2 = 1/2 || eps_theta - z ||^2 with the level i drawn uniformly.
    Each level is mapped to the time t_i with noise-to-signal ratio sigma(t_i) / alpha(t_i) = sigma_i
    (``sde.t_from_noise_to_signal``), and x~ = alpha(t_i) x0 + sigma(t_i) z. For a VESDE (alpha = 1,
    sigma(t) geometric in t) the ladder is exactly sigma(t_i) with t_i evenly spaced on [0, 1]; the
    loss is meant for VE but works for any SDE.

    Args:
        sde: the forward process.
        num_scales: L, the number of noise levels.
        sigma_min, sigma_max: ends of the ladder; default to the SDE's noise-to-signal ratio at t = 0
            and t = T (at t = ``sde.default_eps`` when the ratio vanishes at t = 0, as for VP).
        reduce: "mean" (default) or "sum" over data dimensions per example.
    """

    def __init__(self, sde: SDE, num_scales: int = 10, sigma_min: float | None = None,
                 sigma_max: float | None = None, reduce: str = "mean"):
        check_positive("num_scales", num_scales, integer=True)
        check_choice("reduce", reduce, _REDUCTIONS)
        ratio = lambda t: float(sde.noise_to_signal(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
        if sigma_min is None:
            sigma_min = ratio(0.0)
            if sigma_min < 1e-5:
                sigma_min = ratio(sde.default_eps)
        if sigma_max is None:
            sigma_max = ratio(sde.T)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
        self.sde = sde
        self.num_scales = int(num_scales)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.reduce = reduce
        self.sigmas = torch.exp(torch.linspace(math.log(self.sigma_max), math.log(self.sigma_min),
                                               self.num_scales, dtype=torch.float64))
        self.times = sde.t_from_noise_to_signal(self.sigmas)
        lo, hi = ratio(0.0), ratio(sde.T)
        if not torch.allclose(sde.noise_to_signal(self.times), self.sigmas, rtol=1e-6, atol=0.0):
            raise ValueError(f"the ladder [sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}] leaves the range "
                             f"[{lo:g}, {hi:g}] of noise-to-signal ratios of {sde!r} on [0, T]; its levels outside "
                             "would be clipped to the ends: choose sigma_min and sigma_max in that range (or leave "
                             "them None), or an SDE that reaches them")

    def __call__(self, model, x0: torch.Tensor, generator: torch.Generator | None = None,
                 return_t: bool = False, **cond):
        i = torch.randint(0, self.num_scales, (x0.shape[0],), generator=generator, device=x0.device)
        err, t = _eps_error(self.sde, model, x0, self.times.to(x0.device)[i], generator, self.reduce, cond)
        loss = 0.5 * err
        return (loss, t) if return_t else loss


class EDMLoss:
    """EDM training objective (Karras et al. 2022, Eq. 2 and 8, Table 1 "Training"):

        L = E_{sigma, x0, z} [ lambda(sigma) || D_theta(x0 + sigma z; sigma) - x0 ||^2 ],
        ln sigma ~ N(P_mean, P_std^2),   lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    On a linear SDE sigma is the noise-to-signal ratio n(t) = sigma(t) / alpha(t), the EDM noise level
    of x~ = x_t / alpha(t) = x0 + n z (``sde.noise_to_signal``); each drawn level is mapped to
    t = ``sde.t_from_noise_to_signal(sigma)`` clamped to [eps, T] (the level actually used is n(t), so
    the rare draws outside the SDE's range are clipped to its ends) and D_theta = ``model.outputs(x_t, t).x0``.
    Since ||x0_hat - x0||^2 = n^2 ||eps_hat - z||^2 (Tweedie), the loss is computed in eps form,
    (n^2 + sigma_data^2) / sigma_data^2 ||eps_hat - z||^2. For the preconditioned ``prediction="edm"``
    network, lambda c_out^2 = 1: the raw network regresses a unit-variance target with unit weight
    (Karras et al. 2022, Eq. 8 and App. B.6).

    Args:
        sde: the forward process (VE with sigma_min 0.002, sigma_max 80 is EDM's own).
        P_mean, P_std: mean and std of ln sigma (-1.2, 1.2 in the paper).
        sigma_data: the data standard deviation (0.5); the same value as the ``ScoreModel``'s.
        eps: smallest time (default ``sde.default_eps``).
        reduce: "mean" (default) or "sum" over data dimensions per example.
    """

    def __init__(self, sde: SDE, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 eps: float | None = None, reduce: str = "mean"):
        check_positive("P_std", P_std)
        check_positive("sigma_data", sigma_data)
        for name, value in (("P_mean", P_mean), ("P_std", P_std), ("sigma_data", sigma_data)):
            if not math.isfinite(value):  # NaN would make every loss NaN
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        check_choice("reduce", reduce, _REDUCTIONS)
        self.sde = sde
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.eps = _check_eps(sde.default_eps if eps is None else eps, sde)
        self.reduce = reduce

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, Table 1)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_t(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """t (B,) float64 with ln n(t) ~ N(P_mean, P_std^2), clamped to [eps, T]."""
        ln_sigma = self.P_mean + self.P_std * torch.randn(x0.shape[0], generator=generator, device=x0.device,
                                                          dtype=torch.float64)
        return self.sde.t_from_noise_to_signal(torch.exp(ln_sigma)).clamp(self.eps, self.sde.T)

    def __call__(self, model, x0: torch.Tensor, generator: torch.Generator | None = None,
                 return_t: bool = False, **cond):
        t = self.sample_t(x0, generator)
        n = self.sde.noise_to_signal(t).to(x0.dtype)
        err, t = _eps_error(self.sde, model, x0, t, generator, self.reduce, cond)
        loss = self.weight(n) * n**2 * err  # = lambda(n) ||x0_hat - x0||^2
        return (loss, t) if return_t else loss


def dsm_grid_loss(sde: SDE, model, x0: torch.Tensor, times: torch.Tensor, generator: torch.Generator,
                  reduce: str = "mean", **cond) -> torch.Tensor:
    """|| eps_theta(x_t, t_k) - z ||^2 per time of a fixed grid and per example, shape (K, B).

    The denoising score-matching loss of ``DSMLoss(weighting="sigma2")`` (Song et al. 2021, Eq. 7),
    evaluated at every t_k of ``times`` (K,) instead of a random t, with noise z drawn from
    ``generator``: seeded identically, two evaluations of the same weights give the same numbers,
    which makes it a smooth validation curve comparable across runs and objectives.
    """
    check_choice("reduce", reduce, _REDUCTIONS)
    rows = []
    for t in times.tolist():
        t_b = torch.full((x0.shape[0],), t, dtype=torch.float64, device=x0.device)
        rows.append(_eps_error(sde, model, x0, t_b, generator, reduce, cond)[0])
    return torch.stack(rows)
