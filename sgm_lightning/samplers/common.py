"""Shared sampler plumbing: result type, NFE counting, time grids, Tweedie denoising, Langevin step, option checks.

Every sampler family (``pc``, ``ancestral``, ``ode``, ``heun``, ``ald``) is a function

    run(score, sde, x, *, steps, eps, generator, denoise, record, **options) -> x_final

that receives a :class:`CountingScore` (so NFE is counted in one place), the start point x_T and a
:class:`Recorder` (per-step callback and optional trajectory). ``sgm_lightning.sampling.sample``
validates the common options and dispatches.

Time grids (``grids``) are float64; coefficients are computed in float64 and ``t`` is cast
to the data's dtype only when ``score_fn`` is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sgm_lightning.sde import SDE
from sgm_lightning.utils import bcast

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    """Output of ``sampling.sample``.

    Attributes:
        samples: the samples, a tensor of the requested shape (B, ...).
        nfe: number of score-function evaluations used (one per batched call).
        trajectory: the iterates x_i after every step (when ``return_trajectory=True``), else None.
    """

    samples: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] | None = None


class CountingScore:
    """Wrap ``score_fn(x, t)``: count calls (NFE), give ``t`` shape (B,) in x's dtype, check the output shape.

    Samplers pass float64 times (scalars or (B,)); the wrapped function always sees a (B,) tensor
    with x's dtype and device. The first call checks that the output is shaped like ``x``; the
    output is returned in x's dtype.
    """

    def __init__(self, score_fn: ScoreFn):
        if not callable(score_fn):
            raise ValueError(f"score_fn must be a callable score_fn(x, t), got {type(score_fn).__name__}")
        self.score_fn = score_fn
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t = batch_time(t, x).to(x.dtype)
        out = self.score_fn(x, t)
        if self.nfe == 0:
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"score_fn must return a tensor shaped like x {tuple(x.shape)}, got {got}")
        self.nfe += 1
        # in x's dtype: a float64 score must not promote float32 samples (the next call would see float64 x)
        return out.to(x.dtype)


class Recorder:
    """Per-step hook: calls ``callback(i, t, x)`` and keeps the trajectory when asked."""

    def __init__(self, callback: Callable | None = None, keep: bool = False):
        if callback is not None and not callable(callback):
            raise ValueError("callback must be a callable callback(i, t, x) or None")
        self.callback = callback
        self.trajectory: list[torch.Tensor] | None = [] if keep else None

    @property
    def active(self) -> bool:
        """True when something is recorded (samplers may then skip collecting intermediate iterates)."""
        return self.callback is not None or self.trajectory is not None

    def __call__(self, i: int, t, x: torch.Tensor) -> None:
        if self.trajectory is not None:
            self.trajectory.append(x.detach().clone())
        if self.callback is not None:
            self.callback(i, float(t), x)


def batch_time(t, x: torch.Tensor) -> torch.Tensor:
    """A time (python float, 0-d or (B,) tensor) as a (B,) tensor on x's device (dtype kept, float64 for floats)."""
    t = torch.as_tensor(t, device=x.device)
    if not torch.is_floating_point(t):
        t = t.to(torch.float64)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


def tweedie_x0(sde: SDE, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Tweedie's denoiser x0_hat = E[x_0 | x_t] = (x_t + sigma(t)^2 score) / alpha(t) (Efron 2011; Song et al. 2021, Eq. 7)."""
    alpha, sigma = (bcast(c.to(x.dtype), x) for c in sde.marginal_coeffs(batch_time(t, x)))
    return (x + sigma * sigma * score) / alpha


def per_example_norm(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every example over all non-batch dims, shape (B,)."""
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)


def langevin_step(x: torch.Tensor, score: torch.Tensor, step: torch.Tensor | float, z: torch.Tensor):
    """One unadjusted Langevin step x' = x + eps s + sqrt(2 eps) z (Song et al. 2021, Alg. 4; with
    eps = alpha / 2 this is Song & Ermon 2019, Eq. 4). ``step`` is a float or (B,). Returns (x', x_mean)."""
    step = torch.as_tensor(step, dtype=x.dtype, device=x.device)
    if step.ndim == 1:
        step = bcast(step, x)
    x_mean = x + step * score
    return x_mean + torch.sqrt(2 * step) * z, x_mean
