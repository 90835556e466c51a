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

Noise-free score matching (``SlicedScoreMatchingLoss``, ``ImplicitScoreMatchingLoss``,
``FDSMLoss``) takes a plain ``score_net(x) -> score`` (or a ``ScoreModel`` with ``prediction="score"``
whose network ignores t, e.g. ``nets.mlp.NoiseFreeMLP``) as ``(score_net, x, generator=None)``; with
``return_t=True`` they return ``(loss, None)`` (no noise level). They default to ``reduce="sum"``
because their closed forms (1/2 ||s||^2 + tr grad s) are sums over dimensions, and carry
``noise_free = True``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from sgm_lightning.likelihood import exact_divergence
from sgm_lightning.sde import SDE
from sgm_lightning.utils import (batch_dim_mean, batch_dim_sum, bcast, check_choice, check_positive,
                                 rademacher_like, rand_like_batch, randn_like)

_REDUCTIONS = ("mean", "sum")


def _reduce(err: torch.Tensor, reduce: str) -> torch.Tensor:
    return batch_dim_mean(err) if reduce == "mean" else batch_dim_sum(err)


def _eps_error(sde: SDE, model, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None,
               reduce: str, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturb x_t = alpha(t) x0 + sigma(t) z with fresh z and return (|| eps_theta(x_t, t) - z ||^2 reduced
    per example, t in x0's dtype). Coefficients are taken at ``t`` as given (float64 grids stay exact)."""
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
        check_positive("grid_size", grid_size, integer=True)
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


# --------------------------------------------------------------------------- noise-free score matching
def _prepare(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    return x.detach().requires_grad_(True)


def _score_of(score_net) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> s(x)``: ``score_net`` itself, or the score of a ``ScoreModel`` whose raw output is the
    score (``prediction="score"``) of a network that ignores the time label (``NoiseFreeMLP``)."""
    if not hasattr(score_net, "outputs"):
        return score_net
    if getattr(score_net, "prediction", None) != "score":
        raise ValueError("noise-free score matching trains a network that outputs the score: use "
                         f"model.prediction=score (got prediction={score_net.prediction!r})")
    return lambda x: score_net(x, score_net.sde.T)


def _noise_free_result(loss: torch.Tensor, x: torch.Tensor, reduce: str, return_t: bool):
    loss = loss / x[0].numel() if reduce == "mean" else loss
    return (loss, None) if return_t else loss


class _Sliced:
    """Settings shared by the sliced objectives: ``n_projections`` projections v per example with
    E[v v^T] = I (Rademacher or standard Gaussian), and the reduction over data dimensions."""

    noise_free = True

    def __init__(self, n_projections: int, distribution: str, reduce: str):
        check_positive("n_projections", n_projections, integer=True)
        check_choice("distribution", distribution, ("rademacher", "gaussian"))
        check_choice("reduce", reduce, _REDUCTIONS)
        self.n_projections = int(n_projections)
        self.distribution = distribution
        self.reduce = reduce

    def projections(self, x: torch.Tensor, generator: torch.Generator | None) -> list[torch.Tensor]:
        draw = rademacher_like if self.distribution == "rademacher" else randn_like
        return [draw(x, generator) for _ in range(self.n_projections)]


class SlicedScoreMatchingLoss(_Sliced):
    """Sliced score matching (Song, Garg, Shi & Ermon 2019, Eq. 7-8) for a noise-free ``score_net(x)``:

        SSM:     J = E_v [ v^T grad_x s(x) v + 1/2 (v^T s(x))^2 ]
        SSM-VR:  J = E_v [ v^T grad_x s(x) v ] + 1/2 || s(x) ||^2

    with E[v v^T] = I (Rademacher or standard Gaussian projections), so both are unbiased for the
    implicit score-matching objective 1/2 ||s||^2 + tr grad_x s (Hyvärinen 2005); SSM-VR replaces
    the projected second term by its closed-form expectation. v^T grad_x s v is a vector-Jacobian
    product (``torch.autograd.grad`` with ``create_graph=True``, so the loss trains).

    Args:
        n_projections: number of projections v per example (averaged).
        variance_reduction: use SSM-VR.
        distribution: "rademacher" or "gaussian" projections.
        reduce: "sum" (default; the objective as written) or "mean" (divided by D).
        sde: ignored (the entry points pass one to every loss).
    """

    def __init__(self, n_projections: int = 1, variance_reduction: bool = True,
                 distribution: str = "rademacher", reduce: str = "sum", sde: SDE | None = None):
        super().__init__(n_projections, distribution, reduce)
        self.variance_reduction = bool(variance_reduction)

    def __call__(self, score_net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 generator: torch.Generator | None = None, return_t: bool = False, **cond):
        score_net, x = _score_of(score_net), _prepare(x)
        vs = self.projections(x, generator)
        with torch.enable_grad():
            s = score_net(x)
            total = 0.0
            for v in vs:
                (jtv,) = torch.autograd.grad((s * v).sum(), x, create_graph=True)
                term = batch_dim_sum(jtv * v)  # v^T grad s v
                if not self.variance_reduction:
                    term = term + 0.5 * batch_dim_sum(s * v) ** 2
                total = total + term
            loss = total / self.n_projections
            if self.variance_reduction:
                loss = loss + 0.5 * batch_dim_sum(s * s)
        return _noise_free_result(loss, x, self.reduce, return_t)


class ImplicitScoreMatchingLoss:
    """Implicit score matching (Hyvärinen 2005, Thm. 1): J = 1/2 || s(x) ||^2 + tr grad_x s(x).

    The Jacobian trace is exact: one ``torch.autograd.grad`` per data dimension (small D only),
    with ``create_graph=True`` so the loss trains.

    Args:
        reduce: "sum" (default; the objective as written) or "mean" (divided by D).
        sde: ignored (the entry points pass one to every loss).
    """

    noise_free = True

    def __init__(self, reduce: str = "sum", sde: SDE | None = None):
        check_choice("reduce", reduce, _REDUCTIONS)
        self.reduce = reduce

    def __call__(self, score_net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 generator: torch.Generator | None = None, return_t: bool = False, **cond):
        score_net, x = _score_of(score_net), _prepare(x)
        with torch.enable_grad():
            s = score_net(x)
            loss = 0.5 * batch_dim_sum(s * s) + exact_divergence(s, x, create_graph=True)
        return _noise_free_result(loss, x, self.reduce, return_t)


class FDSMLoss(_Sliced):
    """Finite-difference sliced score matching, FD-SSM (Pang et al. 2020, "Efficient Learning of
    Generative Models via Finite-Difference Score Matching", Sec. 3-4) for a noise-free ``score_net(x)``.

    SSM's projected terms (Song et al. 2019, Eq. 7) are replaced by central differences along v,
    with s_+ = v^T s(x + eps v) and s_- = v^T s(x - eps v):

        v^T grad_x s(x) v  ~  (s_+ - s_-) / (2 eps),      v^T s(x)  ~  (s_+ + s_-) / 2,
        J_FD = E_v [ (s_+ - s_-) / (2 eps) + 1/8 (s_+ + s_-)^2 ],

    both exact for a linear score (a Gaussian model) and O(eps^2) otherwise. No Jacobian-vector
    product is needed: one forward pass on the 2B points x +- eps v and ordinary backpropagation,
    instead of SSM's forward, gradient and double-backward (the cost per example is in
    ``benchmarks/score_matching_cost.py``).

    Args:
        eps: finite-difference step along v (E[v v^T] = I, so the displacement has norm eps sqrt(D)).
        n_projections: number of projections v per example (averaged).
        distribution: "rademacher" or "gaussian" projections.
        reduce: "sum" (default; the objective as written) or "mean" (divided by D).
        sde: ignored (the entry points pass one to every loss).
    """

    def __init__(self, eps: float = 0.01, n_projections: int = 1, distribution: str = "rademacher",
                 reduce: str = "sum", sde: SDE | None = None):
        super().__init__(n_projections, distribution, reduce)
        check_positive("eps", eps)
        self.eps = float(eps)

    def __call__(self, score_net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 generator: torch.Generator | None = None, return_t: bool = False, **cond):
        if not torch.is_floating_point(x):
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        score_net, x = _score_of(score_net), x.detach()
        v = torch.cat(self.projections(x, generator))  # (P B, ...)
        xs = x.repeat(self.n_projections, *([1] * (x.ndim - 1)))
        with torch.enable_grad():
            s = score_net(torch.cat([xs + self.eps * v, xs - self.eps * v]))
            s_plus, s_minus = (batch_dim_sum(part * v) for part in s.chunk(2))
            j = (s_plus - s_minus) / (2 * self.eps) + 0.125 * (s_plus + s_minus) ** 2
            loss = j.reshape(self.n_projections, x.shape[0]).mean(0)
        return _noise_free_result(loss, x, self.reduce, return_t)
