"""Probability-flow ODE encoding, decoding and latent interpolation (Song et al. 2021, Sec. 4.3).

The probability-flow ODE (Eq. 13) is a deterministic bijection between p_eps and p_T:

    encode: x (data, t = eps) -> z (latent, t = T)   integrating the ODE forward in time,
    decode: z -> x                                    integrating it backward (the "ode" sampler
                                                      with denoise=False).

With the exact score, decode(encode(x)) = x up to the solver tolerance, and data drawn from p_eps
encodes to p_T (standard normal for VP). Latents are interpolated along great circles (spherical
linear interpolation, Shoemake 1985), which keeps the norm of Gaussian latents typical:

    slerp(z0, z1; w) = sin((1 - w) theta) / sin(theta) z0 + sin(w theta) / sin(theta) z1,
    cos(theta) = <z0, z1> / (|z0| |z1|)   (per example, over all non-batch dimensions).

Solver options as for ``sample(..., method="ode")``: ``solver`` ("rk45" or a torchdiffeq method),
``rtol``, ``atol`` (1e-5), ``steps`` / ``grid`` for fixed-grid solvers, ``eps`` (``sde.default_eps``).
"""

from __future__ import annotations

import torch

from sgm_lightning.samplers.common import CountingScore, SampleResult
from sgm_lightning.samplers.grids import make_grid
from sgm_lightning.samplers.ode import check_ode_options, is_fixed_grid, pf_ode_path
from sgm_lightning.sde import SDE
from sgm_lightning.utils import check_int


def _flow(score_fn, sde: SDE, x: torch.Tensor, forward: bool, eps: float | None, solver: str, rtol: float,
          atol: float, steps: int, grid: str) -> SampleResult:
    check_ode_options(solver, rtol, atol)
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim < 1:
        raise ValueError(f"the {'data' if forward else 'latents'} must be a floating-point tensor of shape (B, ...), "
                         f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if x.numel() == 0:  # the adaptive controller never accepts a step on an empty state
        raise ValueError(f"the {'data' if forward else 'latents'} hold no values (shape {tuple(x.shape)}): "
                         f"pass at least one example")
    eps = sde.default_eps if eps is None else eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < sde.T:
        raise ValueError(f"eps (the data end of the ODE, as for log_likelihood) must be a number with "
                         f"0 <= eps < T={sde.T}, got {eps!r}")
    n = check_int("steps (fixed-grid solvers)", steps) if is_fixed_grid(solver) else 1
    times = make_grid(grid, sde, eps, n + 1, device=x.device)
    if forward:
        times = times.flip(0)
    score = CountingScore(score_fn)
    with torch.no_grad():
        out = pf_ode_path(score, sde, x, times, solver, rtol, atol)[-1]
    return SampleResult(samples=out, nfe=score.nfe)


def encode(score_fn, sde: SDE, x: torch.Tensor, eps: float | None = None, solver: str = "rk45",
           rtol: float = 1e-5, atol: float = 1e-5, steps: int = 100, grid: str = "uniform") -> SampleResult:
    """Latents z = x(T) of data x = x(eps) under the probability-flow ODE; ``.samples`` holds z, ``.nfe`` the NFE."""
    return _flow(score_fn, sde, x, True, eps, solver, rtol, atol, steps, grid)


def decode(score_fn, sde: SDE, z: torch.Tensor, eps: float | None = None, solver: str = "rk45",
           rtol: float = 1e-5, atol: float = 1e-5, steps: int = 100, grid: str = "uniform") -> SampleResult:
    """Data x(eps) of latents z = x(T) under the probability-flow ODE (the inverse of ``encode``)."""
    return _flow(score_fn, sde, z, False, eps, solver, rtol, atol, steps, grid)


def slerp(z0: torch.Tensor, z1: torch.Tensor, w) -> torch.Tensor:
    """Spherical interpolation between z0 and z1 (both (B, ...)) at weight(s) w in [0, 1] (see module doc).

    ``w`` is a float or a (B,) tensor; parallel latents fall back to linear interpolation.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    a, b = z0.reshape(z0.shape[0], -1).double(), z1.reshape(z1.shape[0], -1).double()
    w = torch.as_tensor(w, dtype=torch.float64, device=z0.device).expand(z0.shape[0])
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    small = sin < 1e-8
    c0 = torch.where(small, 1 - w, torch.sin((1 - w) * theta) / torch.where(small, 1.0, sin))
    c1 = torch.where(small, w, torch.sin(w * theta) / torch.where(small, 1.0, sin))
    out = c0[:, None] * a + c1[:, None] * b
    return out.reshape(z0.shape).to(z0.dtype)


def interpolate(score_fn, sde: SDE, x0: torch.Tensor, x1: torch.Tensor, n: int = 8, **ode_options) -> SampleResult:
    """Interpolate between the pairs (x0[p], x1[p]) through their probability-flow latents.

    Encodes x0 and x1 (both (P, ...)), slerps the latents at n weights 0, 1 / (n - 1), ..., 1 and
    decodes them. Returns ``.samples`` of shape (P, n, ...) (row p runs from x0[p] to x1[p], the ends
    equal to the inputs up to the solver tolerance; a P x n image grid) and the total NFE.
    ``ode_options``: eps, solver, rtol, atol, steps, grid (as for ``encode``).
    """
    n = check_int("n", n, min=2)
    if x0.shape != x1.shape or x0.ndim < 1:
        raise ValueError(f"x0 and x1 must have the same shape (P, ...), got {tuple(x0.shape)} and {tuple(x1.shape)}")
    P, event = x0.shape[0], x0.shape[1:]
    enc = encode(score_fn, sde, torch.cat([x0, x1]), **ode_options)
    z0, z1 = (z.repeat_interleave(n, dim=0) for z in enc.samples.split(P))
    w = torch.linspace(0, 1, n, dtype=torch.float64, device=x0.device).repeat(P)
    dec = decode(score_fn, sde, slerp(z0, z1, w), **ode_options)
    return SampleResult(samples=dec.samples.reshape(P, n, *event), nfe=enc.nfe + dec.nfe)
