"""Closed-form test oracles: Gaussian mixtures diffused by any linear SDE.

If x_0 ~ sum_k w_k N(mu_k, Sigma_k) and p_0t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I), then

    p_t(x) = sum_k w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)

so the score and the log-density of every marginal p_t are exact. Tests, benchmarks and notebooks
use ``GaussianMixture.score_fn(sde)`` as a perfect score model. Data may have any event shape
(e.g. (D,) or (C, H, W)); it is flattened to D = prod(event_shape) internally. The parameters live on
the CPU in float64; x and t may be on any device (results come back on x's device, in x's dtype).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from sgm_lightning.sde import SDE


class GaussianMixture:
    """A mixture of K full-covariance Gaussians in D = prod(event_shape) dimensions (float64).

    Args:
        weights: (K,) mixture weights (normalised here).
        means: (K, D) component means.
        covs: (K, D, D) covariances, or (K,) / scalar isotropic variances.
        event_shape: shape of one example (default (D,)).
    """

    def __init__(self, weights, means, covs, event_shape: Sequence[int] | None = None):
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(mu.shape)}")
        K, D = mu.shape
        if w.shape != (K,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
        cov = torch.as_tensor(covs, dtype=torch.float64)
        isotropic = cov.ndim <= 1
        if isotropic:
            cov = cov.expand(K).reshape(K, 1, 1) * torch.eye(D, dtype=torch.float64)
        if cov.shape != (K, D, D):
            raise ValueError(f"covs must have shape (K, D, D) = ({K}, {D}, {D}), (K,) or be a scalar")
        for k in range(K if D else 0):  # cholesky reads only the lower triangle: no other matrix may pass
            tol = 1e-6 * float(cov[k].abs().max())  # float32 round-off (e.g. A A^T in float32) passes
            asym = float((cov[k] - cov[k].T).abs().max())
            if asym > tol:
                raise ValueError(f"covs[{k}] must be a symmetric matrix (a covariance), got one with "
                                 f"|C - C^T| up to {asym:g}")
            low = float(cov[k, 0, 0]) if isotropic else float(torch.linalg.eigvalsh(cov[k]).min())
            if low < -tol:
                raise ValueError(f"covs[{k}] must be positive semi-definite (variances >= 0), got smallest "
                                 f"eigenvalue {low:g}: pass a covariance matrix, or variances >= 0")
        self.weights = w / w.sum()
        self.means = mu
        self.covs = cov
        self.event_shape = tuple(event_shape) if event_shape is not None else (D,)
        if math.prod(self.event_shape) != D:
            raise ValueError(f"event_shape {self.event_shape} does not hold D={D} numbers")
        self.D = D
        self.K = K

    # ------------------------------------------------------------------ data distribution
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        m = self.mean()
        d = self.means - m
        return (self.weights[:, None, None] * (self.covs + d[:, :, None] * d[:, None, :])).sum(0)

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n samples of shape (n, *event_shape) in float64 (and the component labels)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        L, info = torch.linalg.cholesky_ex(self.covs)
        if bool((info != 0).any()):  # a singular (e.g. point-mass) component: a square root from its eigenvectors
            lam, V = torch.linalg.eigh(self.covs)
            L = torch.where((info != 0)[:, None, None], V * lam.clamp_min(0.0).sqrt()[:, None, :], L)
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("nij,nj->ni", L[k], z)
        x = x.reshape(n, *self.event_shape)
        return (x, k) if return_labels else x

    # ------------------------------------------------------------------ diffused marginals
    def _marginal(self, sde: SDE | None, t, batch: int):
        if sde is None:
            return self.means[None], self.covs[None]
        if t is None:
            raise ValueError("t is needed with sde (the marginal p_t at time t): pass t, a float or a (B,) tensor "
                             "(or sde=None for the data density)")
        t = torch.as_tensor(t, dtype=torch.float64, device="cpu")
        if t.numel() not in (1, batch):
            raise ValueError(f"t must be a float or hold one time per example, shape ({batch},), got {tuple(t.shape)}")
        alpha, sigma = sde.marginal_coeffs(t)
        alpha = alpha.reshape(-1, 1, 1, 1)
        sigma = sigma.reshape(-1, 1, 1, 1)
        eye = torch.eye(self.D, dtype=torch.float64)
        mu = alpha[:, :, :, 0] * self.means[None]  # (B, K, D)
        cov = alpha**2 * self.covs[None] + sigma**2 * eye  # (B, K, D, D)
        return mu, cov

    def _component_terms(self, x, sde, t):
        if x.ndim < 1 or x[0].numel() != self.D:
            raise ValueError(f"x must have shape (B, *event_shape) with event_shape {self.event_shape} ({self.D} "
                             f"numbers per example), got {tuple(x.shape)}")
        xf = x.reshape(x.shape[0], -1).to("cpu", torch.float64)
        mu, cov = self._marginal(sde, t, x.shape[0])
        L, info = torch.linalg.cholesky_ex(cov)
        if bool((info != 0).any()):
            raise ValueError("the covariance of p_t is singular here (a component with a singular covariance at t = 0, "
                             "or the data density of one): evaluate the diffused marginal, sde with t > 0")
        diff = xf[:, None, :] - mu  # (B, K, D)
        sol = torch.cholesky_solve(diff.unsqueeze(-1), L).squeeze(-1)  # cov^{-1} (x - mu)
        maha = (diff * sol).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        logn = -0.5 * (maha + logdet + self.D * math.log(2 * math.pi))
        logw = torch.log(self.weights)[None] + logn  # (B, K)
        return logw, sol

    def log_prob(self, x: torch.Tensor, sde: SDE | None = None, t=None) -> torch.Tensor:
        """log p_t(x) per example (B,); the data density when ``sde`` is None."""
        logw, _ = self._component_terms(x, sde, t)
        return torch.logsumexp(logw, dim=1).to(x.device)

    def score(self, x: torch.Tensor, sde: SDE | None = None, t=None) -> torch.Tensor:
        """grad_x log p_t(x), shaped and typed like x."""
        logw, sol = self._component_terms(x, sde, t)
        resp = torch.softmax(logw, dim=1)
        s = -(resp.unsqueeze(-1) * sol).sum(1)
        return s.reshape(x.shape).to(x.device, x.dtype)

    def responsibilities(self, x: torch.Tensor, sde: SDE | None = None, t=None) -> torch.Tensor:
        """Posterior component probabilities p(k | x_t) (B, K): used to assign samples to modes."""
        logw, _ = self._component_terms(x, sde, t)
        return torch.softmax(logw, dim=1).to(x.device)

    def score_fn(self, sde: SDE):
        """A ``score_fn(x, t)`` computing the exact score of p_t under ``sde``."""

        def fn(x, t):
            return self.score(x, sde, t)

        return fn
