"""Noise-free score matching: objectives for a score network s_theta(x) without a noise input.

Noise-free score matching (``SlicedScoreMatchingLoss``, ``ImplicitScoreMatchingLoss``,
``FDSMLoss``) takes a plain ``score_net(x) -> score`` (or a ``ScoreModel`` with ``prediction="score"``
whose network ignores t, e.g. ``nets.mlp.NoiseFreeMLP``) as ``(score_net, x, generator=None)``; with
``return_t=True`` they return ``(loss, None)`` (no noise level). They default to ``reduce="sum"``
because their closed forms (1/2 ||s||^2 + tr grad s) are sums over dimensions, and carry
``noise_free = True``.
"""

from __future__ import annotations

from typing import Callable

import torch

from sgm_lightning.likelihood import exact_divergence
from sgm_lightning.sde import SDE
from sgm_lightning.utils import batch_dim_sum, check_choice, check_positive, rademacher_like, randn_like

_REDUCTIONS = ("mean", "sum")


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
