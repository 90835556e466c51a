"""Forward diffusion processes (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

Every forward process is a linear Itô SDE

    dx = f(t) x dt + g(t) dw,                                      (Song et al. 2021, Eq. 5)

whose perturbation kernel is Gaussian, p_0t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I).
All formulas of a process live here and only here: a subclass gives ``marginal_coeffs`` (alpha,
sigma), ``sde`` (f(t) x, g(t)) and its prior; everything else (transition kernels between two
times, the reverse-time SDE, the probability-flow ODE, the reverse-diffusion discretization, the
discrete DDPM view, the noise-to-signal ratio and its inverse) is derived once in the base class.
Samplers, losses and likelihoods ask the SDE for quantities and never branch on its type.

Data may have any shape (B, ...); ``t`` has shape (B,). Coefficients are computed in ``t``'s dtype
(samplers use float64 time grids) and cast to the data's dtype at the end. Times are clamped to
[0, T] inside the coefficient functions, so adaptive ODE solvers that probe slightly outside
[eps, T] never see NaN/Inf.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Callable

import torch

from sgm_lightning.utils import bcast, check_choice, check_int, check_positive

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_SIGMA2_FLOOR = 1e-12  # smallest sigma(t)^2 handed out: keeps 1/sigma finite at t -> 0


def _as_time(t) -> torch.Tensor:
    """t as a floating tensor; Python numbers and integer tensors become float64 (not torch's float32)."""
    return t if isinstance(t, torch.Tensor) and t.is_floating_point() else torch.as_tensor(t, dtype=torch.float64)


class SDE(ABC):
    """A linear forward SDE on [0, T] with a Gaussian perturbation kernel.

    Attributes:
        T: end time (1.0).
        N: number of discretization steps of the discrete view (DDPM steps, reverse-diffusion steps).
        default_eps: smallest time samplers and losses use unless told otherwise.
    """

    T: float = 1.0
    default_eps: float = 1e-3

    def __init__(self, N: int = 1000):
        self.N = check_int("N (number of discretization steps)", N)

    # ----------------------------------------------------------------- per-process formulas
    @abstractmethod
    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)) of p_0t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I), same shape as t."""

    @abstractmethod
    def drift_coeff_and_diffusion(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(t), g(t)) of dx = f(t) x dt + g(t) dw, same shape as t."""

    @property
    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior p_T = N(0, prior_std^2 I)."""

    def hparams(self) -> dict:
        """Constructor keyword arguments (for logging and checkpoints)."""
        return {"N": self.N}

    # ----------------------------------------------------------------- derived quantities
    def _clamp(self, t: torch.Tensor) -> torch.Tensor:
        return t.clamp(0.0, self.T)

    @staticmethod
    def _time(x: torch.Tensor, t) -> torch.Tensor:
        """t as a tensor: one time per example of x, (B,), or one time for all (a number or a 0-d / (1,)
        tensor). Numbers and integer tensors become float64 (not float32: float64 data keep their precision)."""
        t = _as_time(t).to(x.device)
        B = x.shape[0] if x.ndim else 1
        if t.ndim > 0 and t.shape[0] not in (1, B):
            raise ValueError(f"t must have shape (B,) = ({B},), one time per example of x "
                             f"{tuple(x.shape)}, or be a single time, got t of shape {tuple(t.shape)}")
        return t

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) (shape of x) and diffusion g(t) (shape (B,)) of the forward SDE (Eq. 5)."""
        t = self._time(x, t)
        f, g = self.drift_coeff_and_diffusion(t)
        return bcast(f.to(x.dtype), x) * x, g.to(x.dtype)

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (shape of x0) and std (shape (B,)) of p_0t(x_t | x_0)."""
        t = self._time(x0, t)
        alpha, sigma = self.marginal_coeffs(t)
        return bcast(alpha.to(x0.dtype), x0) * x0, sigma.to(x0.dtype)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Std sigma(t) of the perturbation kernel."""
        return self.marginal_coeffs(t)[1]

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Mean scale alpha(t) of the perturbation kernel."""
        return self.marginal_coeffs(t)[0]

    def noise_to_signal(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) / alpha(t): the EDM noise level of the scaled variable x_t / alpha(t) (Karras et al. 2022, Eq. 4)."""
        alpha, sigma = self.marginal_coeffs(t)
        return sigma / alpha

    def t_from_noise_to_signal(self, ratio: torch.Tensor, iters: int = 100) -> torch.Tensor:
        """Inverse of ``noise_to_signal`` (monotone increasing in t), by bisection in float64.

        Subclasses with a closed form override it. Ratios outside the range of [0, T] are clamped
        to the end points.
        """
        r = torch.as_tensor(ratio, dtype=torch.float64)
        lo = torch.zeros_like(r)
        hi = torch.full_like(r, self.T)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = self.noise_to_signal(mid) < r
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def transition_coeffs(self, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_{t|s}, sigma_{t|s}) of p(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I) for s <= t.

        For a linear SDE, alpha_{t|s} = alpha(t) / alpha(s) and
        sigma_{t|s}^2 = sigma(t)^2 - alpha_{t|s}^2 sigma(s)^2 (Kingma et al. 2021, Eq. 4-5).
        """
        a_t, s_t = self.marginal_coeffs(t)
        a_s, s_s = self.marginal_coeffs(s)
        a_ts = a_t / a_s
        var = (s_t**2 - a_ts**2 * s_s**2).clamp_min(0.0)
        return a_ts, var.sqrt()

    def prior_sampling(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32):
        """Draw x_T ~ p_T = N(0, prior_std^2 I) of the given shape (B, ...)."""
        if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 1
                and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise ValueError(f"shape must be a tuple of ints (B, ...), e.g. (16, 2), got {shape!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__} "
                             "(for a seed s pass generator=torch.Generator().manual_seed(s))")
        if device is None and generator is not None:
            device = generator.device
        z = torch.randn(tuple(int(s) for s in shape), generator=generator, device=device, dtype=dtype)
        return z * self.prior_std

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log p_T(z) per example, shape (B,)."""
        if not isinstance(z, torch.Tensor) or z.ndim < 1:
            got = f"a {z.ndim}-d tensor" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"prior_logp takes a batch z of shape (B, ...) (one example: z[None]), got {got}")
        D = z[0].numel()
        s = self.prior_std
        sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * D * math.log(2 * math.pi * s * s) - sq / (2 * s * s)

    def discretize(self, x: torch.Tensor, t: torch.Tensor, dt: float | torch.Tensor | None = None):
        """Forward discretization x_t = x_{t-dt} + f + G z (Song et al. 2021, App. E).

        Derived from the exact transition kernel between t - dt and t (dt = T / N by default):
        f = (alpha_{t|t-dt} - 1) x and G = sigma_{t|t-dt}. For VE this is f = 0,
        G = sqrt(sigma_i^2 - sigma_{i-1}^2) (SMLD); for VP, f = (sqrt(1 - beta_i) - 1) x,
        G = sqrt(beta_i) (DDPM). Returns (f, G) with G of shape (B,).
        """
        t = self._time(x, t)
        if dt is None:
            dt = self.T / self.N
        s = t - dt
        a_ts, s_ts = self.transition_coeffs(t, s)
        return bcast((a_ts - 1).to(x.dtype), x) * x, s_ts.to(x.dtype)

    def reverse_drift(self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, probability_flow: bool = False):
        """Drift of the reverse-time SDE f - g^2 score (Eq. 6), or of the probability-flow ODE
        f - g^2 score / 2 (Eq. 13) when ``probability_flow``."""
        drift, g = self.sde(x, t)
        coef = 0.5 if probability_flow else 1.0
        return drift - coef * bcast(g * g, x) * score_fn(x, t)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (Eq. 6) or probability-flow ODE (Eq. 13) driven by ``score_fn``."""
        return ReverseSDE(self, score_fn, probability_flow)

    # ----------------------------------------------------------------- discrete (DDPM) view
    def discrete_times(self, N: int | None = None, dtype=torch.float64, device=None) -> torch.Tensor:
        """The discrete DDPM time grid t_i = i T / N, i = 1..N (shape (N,)).

        With N = 1000 and T = 1 the first step is t_1 = 1e-3 = the VP samplers' eps.
        """
        N = self.N if N is None else int(N)
        return torch.arange(1, N + 1, dtype=dtype, device=device) * (self.T / N)

    def discrete_alphas_cumprod(self, N: int | None = None) -> torch.Tensor:
        """alpha_bar_i = alpha(t_i)^2 on the discrete grid (Ho et al. 2020's cumulative product).

        The discrete schedule *is* the continuous process sampled at t_i, so DDPM training and
        ancestral sampling use the same object as the continuous samplers.
        """
        return self.marginal_coeffs(self.discrete_times(N))[0] ** 2

    def discrete_betas(self, N: int | None = None) -> torch.Tensor:
        """beta_i = 1 - alpha_bar_i / alpha_bar_{i-1} (alpha_bar_0 = alpha(0)^2) on the discrete grid."""
        ab = self.discrete_alphas_cumprod(N)
        a0 = self.marginal_coeffs(torch.zeros(1, dtype=torch.float64))[0] ** 2
        prev = torch.cat([a0, ab[:-1]])
        return 1.0 - ab / prev

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class ReverseSDE:
    """Reverse-time SDE / probability-flow ODE of a forward ``SDE`` driven by a score function."""

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.T = forward.T
        self.N = forward.N

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(drift, diffusion) of the reverse process; diffusion is 0 for the probability-flow ODE."""
        drift = self.forward.reverse_drift(self.score_fn, x, t, self.probability_flow)
        _, g = self.forward.sde(x, t)
        return drift, torch.zeros_like(g) if self.probability_flow else g

    def discretize(self, x: torch.Tensor, t: torch.Tensor, dt=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse-diffusion discretization (Song et al. 2021, Eq. 46): rev_f = f - G^2 s, rev_G = G
        (rev_f = f - G^2 s / 2, rev_G = 0 for the probability flow)."""
        f, G = self.forward.discretize(x, t, dt)
        coef = 0.5 if self.probability_flow else 1.0
        rev_f = f - coef * bcast(G * G, x) * self.score_fn(x, t)
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


class VESDE(SDE):
    """Variance-exploding SDE (SMLD / NCSN in continuous time; Song et al. 2021, Eq. 30).

    sigma(t) = sigma_min (sigma_max / sigma_min)^t, f = 0, g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)),
    alpha(t) = 1, prior N(0, sigma_max^2 I). As in the paper, the kernel std is sigma(t) (the small
    sigma_min^2 offset at t = 0 is absorbed into the data).
    """

    default_eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        check_positive("sigma_min", sigma_min)
        check_positive("sigma_max", sigma_max)
        if not sigma_max > sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min={sigma_min!r}, got {sigma_max!r}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def hparams(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "N": self.N}

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def marginal_coeffs(self, t):
        t = _as_time(t)
        sigma = self.sigma_min * torch.exp(self._log_ratio * self._clamp(t))
        return torch.ones_like(sigma), sigma

    def drift_coeff_and_diffusion(self, t):
        t = _as_time(t)
        g = self.sigma(t) * math.sqrt(2 * self._log_ratio)
        return torch.zeros_like(g), g

    def t_from_noise_to_signal(self, ratio, iters: int = 0):
        r = torch.as_tensor(ratio, dtype=torch.float64)
        return (torch.log(r / self.sigma_min) / self._log_ratio).clamp(0.0, self.T)


class _VPFamily(SDE):
    """Shared part of VP and sub-VP: beta(t) schedule, alpha(t) = exp(-1/2 int_0^t beta(s) ds), prior N(0, I).

    ``schedule="linear"``: beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, Eq. 32).
    ``schedule="cosine"``: alpha(t)^2 = cos^2(phi(t)) / cos^2(phi(0)), phi(t) = (t' + s) / (1 + s) pi / 2
    with t' = t (1 - cosine_tmax_margin) (Nichol & Dhariwal 2021, Eq. 17); the margin keeps beta(T)
    finite, as the paper's clipping of beta at 0.999 does for the discrete schedule.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000,
                 schedule: str = "linear", cosine_s: float = 0.008, cosine_tmax_margin: float = 0.01):
        super().__init__(N)
        check_choice("schedule", schedule, ("linear", "cosine"))
        for name, v in (("beta_min", beta_min), ("beta_max", beta_max), ("cosine_s", cosine_s),
                        ("cosine_tmax_margin", cosine_tmax_margin)):
            check_positive(name, v)
        if not beta_max > beta_min:
            raise ValueError(f"beta_max must be > beta_min={beta_min!r}, got {beta_max!r}")
        if not cosine_s > 0 or not 0 < cosine_tmax_margin < 1:
            raise ValueError("cosine_s must be > 0 and cosine_tmax_margin in (0, 1)")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.schedule = schedule
        self.cosine_s = float(cosine_s)
        self.cosine_tmax_margin = float(cosine_tmax_margin)

    def hparams(self) -> dict:
        h = {"beta_min": self.beta_min, "beta_max": self.beta_max, "N": self.N, "schedule": self.schedule}
        if self.schedule == "cosine":
            h.update(cosine_s=self.cosine_s, cosine_tmax_margin=self.cosine_tmax_margin)
        return h

    @property
    def prior_std(self) -> float:
        return 1.0

    def _cosine_phi(self, t):
        scale = 1.0 - self.cosine_tmax_margin
        return (t * scale + self.cosine_s) / (1 + self.cosine_s) * (math.pi / 2), scale

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t) = -1/2 int_0^t beta(s) ds."""
        t = self._clamp(_as_time(t))
        if self.schedule == "linear":
            return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        # cos(phi0 + d) / cos(phi0) = 1 - 2 sin^2(d / 2) - tan(phi0) sin(d) with d = phi(t) - phi(0): no
        # cancellation at small t (log cos(phi) - log cos(phi0) loses all digits of float32 t near 0)
        phi0 = self.cosine_s / (1 + self.cosine_s) * (math.pi / 2)
        d = t * ((1.0 - self.cosine_tmax_margin) / (1 + self.cosine_s) * (math.pi / 2))
        return torch.log1p(-(2 * torch.sin(0.5 * d) ** 2 + math.tan(phi0) * torch.sin(d)))

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = -2 d log alpha(t) / dt."""
        t = self._clamp(_as_time(t))
        if self.schedule == "linear":
            return self.beta_min + t * (self.beta_max - self.beta_min)
        phi, scale = self._cosine_phi(t)
        return 2 * torch.tan(phi) * scale * (math.pi / 2) / (1 + self.cosine_s)

    def t_from_noise_to_signal(self, ratio, iters: int = 100):
        if self.schedule != "linear":
            return super().t_from_noise_to_signal(ratio, iters)
        r = torch.as_tensor(ratio, dtype=torch.float64)
        target = -self._log_alpha_from_ratio(r)  # = 0.25 d t^2 + 0.5 beta_min t
        d = self.beta_max - self.beta_min
        t = (-0.5 * self.beta_min + torch.sqrt(0.25 * self.beta_min**2 + d * target)) / (0.5 * d)
        return t.clamp(0.0, self.T)

    def _log_alpha_from_ratio(self, r):
        raise NotImplementedError


class VPSDE(_VPFamily):
    """Variance-preserving SDE (DDPM in continuous time; Song et al. 2021, Eq. 32).

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, alpha(t) = exp(-1/2 int beta), sigma(t)^2 = 1 - alpha(t)^2.
    Its discrete view (``discrete_betas``) is DDPM's schedule: with the linear schedule,
    beta_min=0.1, beta_max=20, N=1000 it is beta_i = 1 - exp(-beta(t_mid,i) / N) with t_mid,i = (i - 1/2) / N: Ho et
    al.'s linear 1e-4 ... 0.02 to within 2.2e-4 (the exact discretization of the continuous process).
    """

    def marginal_coeffs(self, t):
        log_a = self.log_alpha(t)
        var = (-torch.expm1(2 * log_a)).clamp_min(_SIGMA2_FLOOR)
        return torch.exp(log_a), var.sqrt()

    def drift_coeff_and_diffusion(self, t):
        b = self.beta(t)
        return -0.5 * b, b.sqrt()

    def _log_alpha_from_ratio(self, r):
        # alpha^2 = 1 / (1 + r^2)
        return -0.5 * torch.log1p(r * r)


class SubVPSDE(_VPFamily):
    """Sub-VP SDE (Song et al. 2021, Eq. 34): dx = -1/2 beta x dt + sqrt(beta (1 - alpha^4)) dw.

    alpha(t) as for VP, sigma(t) = 1 - alpha(t)^2, prior N(0, I).
    """

    def marginal_coeffs(self, t):
        log_a = self.log_alpha(t)
        sigma = (-torch.expm1(2 * log_a)).clamp_min(math.sqrt(_SIGMA2_FLOOR))
        return torch.exp(log_a), sigma

    def drift_coeff_and_diffusion(self, t):
        b = self.beta(t)
        discount = (-torch.expm1(4 * self.log_alpha(t))).clamp_min(0.0)
        return -0.5 * b, (b * discount).sqrt()

    def _log_alpha_from_ratio(self, r):
        # r = (1 - a^2) / a  ->  a^2 + r a - 1 = 0  ->  a = (-r + sqrt(r^2 + 4)) / 2
        return torch.log((-r + torch.sqrt(r * r + 4)) / 2)
