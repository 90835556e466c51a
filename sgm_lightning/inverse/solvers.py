"""Posterior samplers for linear inverse problems y = A x_0 + sigma_y n with an unconditional score model.

- ``dps_sample``: diffusion posterior sampling (Chung et al. 2023, Alg. 1 / Eq. 16),
- ``replacement_sample``: the predictor-corrector "replacement" method for inpainting and
  colorization (Song et al. 2021, App. I.2),
- ``repaint_sample``: RePaint's masked ancestral steps with resampling (Lugmayr et al. 2022, Alg. 1).

All work with any linear SDE through its methods (``marginal_coeffs``, ``transition_coeffs``,
``reverse(...).discretize``) and any ``score_fn(x, t)``; randomness comes from ``generator`` and is
drawn in a fixed order. Each returns a ``SampleResult`` (``.samples``, ``.nfe``).

Reverse steps between two grid times t > s are the ancestral steps of the Gaussian posterior
q(x_s | x_t, x_0 = x0_hat) with x0_hat = E[x_0 | x_t] from Tweedie's formula (Ho et al. 2020, Eq. 6-7,
written with alpha_{t|s}, sigma_{t|s} so that it covers VE, VP and sub-VP alike; Kingma et al. 2021,
Eq. 29-30), except in the replacement method, which uses Song et al.'s reverse-diffusion predictor.
"""

from __future__ import annotations

import torch

from sgm_lightning.inverse.operators import LinearOperator
from sgm_lightning.samplers.ancestral import posterior_coeffs
from sgm_lightning.samplers.common import CountingScore, SampleResult, batch_time, per_example_norm, tweedie_x0
from sgm_lightning.samplers.grids import time_grid
from sgm_lightning.samplers.pc import langevin_correct, predict
from sgm_lightning.sde import SDE
from sgm_lightning.utils import bcast, check_choice, check_int, check_positive, randn_like

GUIDANCE = ("normalized", "likelihood")


# ----------------------------------------------------------------------------- shared steps
def ancestral_step(sde: SDE, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, x0_hat: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw x_s ~ q(x_s | x_t, x_0 = x0_hat) for s < t (Ho et al. 2020, Eq. 6-7 for any linear SDE;
    coefficients from ``samplers.ancestral.posterior_coeffs``). Takes x0_hat rather than a score
    so that DPS can hand in a guided estimate."""
    c_x, c_0, std = (bcast(c.to(x.dtype), x) for c in posterior_coeffs(sde, t, s))
    return c_x * x + c_0 * x0_hat + std * randn_like(x, generator)


def diffused_known(sde: SDE, operator: LinearOperator, known0: torch.Tensor, s: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The observed part forward-diffused to time s: alpha_s A^+ y + sigma_s P z, z ~ N(0, I)
    (Song et al. 2021, App. I.2; Lugmayr et al. 2022, Eq. 8). ``known0`` = A^+ y."""
    a_s, sig_s = (bcast(c.to(known0.dtype), known0) for c in sde.marginal_coeffs(s))
    return a_s * known0 + sig_s * operator.project(randn_like(known0, generator))


def _start(sde, operator, y, shape, x_T, generator):
    if x_T is not None:
        x = x_T.clone()
    else:
        if shape is None:
            shape = operator.transpose(y).shape
        x = sde.prior_sampling(shape, generator=generator, device=y.device, dtype=y.dtype)
    Ax = operator.forward(x)
    try:
        fits = torch.broadcast_shapes(tuple(y.shape), tuple(Ax.shape)) == tuple(Ax.shape)
    except RuntimeError:
        fits = False
    if not fits:  # else a broadcast error deep inside the first step
        raise ValueError(f"y has shape {tuple(y.shape)}, but {operator!r} maps samples of shape {tuple(x.shape)} to "
                         f"{tuple(Ax.shape)}: pass y = operator.measure(x0) of data x0 shaped like the samples "
                         f"(shape= / x_T)")
    return x


def _check_common(steps, eps, operator, sde):
    check_int("steps", steps)
    if eps is not None and not 0 < eps < sde.T:
        raise ValueError(f"eps (last sampling time) must satisfy 0 < eps < T={sde.T}, got {eps!r}")
    if not isinstance(operator, LinearOperator):
        raise ValueError(f"operator must be a sgm_lightning.inverse.operators.LinearOperator, got {type(operator).__name__}")


def _needs_pinv(operator, method):
    if not operator.has_pinv:
        raise ValueError(f"method {method!r} needs an operator with a pseudo-inverse (masks, Grayscale, "
                         f"AvgPoolDownsample); {type(operator).__name__} has none, use dps_sample")


def _final(score, sde, operator, x, eps, denoise, known0=None):
    if denoise:
        x = tweedie_x0(sde, x, batch_time(eps, x), score(x, eps))
    if known0 is not None:
        x = operator.replace(x, known0)
    return x


# ----------------------------------------------------------------------------- DPS
def dps_sample(score_fn, sde: SDE, operator: LinearOperator, y: torch.Tensor, *, steps: int = 1000,
               zeta: float = 1.0, guidance: str = "normalized", eps: float | None = None,
               shape: tuple[int, ...] | None = None, x_T: torch.Tensor | None = None,
               generator: torch.Generator | None = None, denoise: bool = True) -> SampleResult:
    """Diffusion posterior sampling (Chung et al. 2023, Alg. 1).

    At every step, x0_hat(x_t) = (x_t + sigma_t^2 s(x_t, t)) / alpha_t (Tweedie) and the measurement
    likelihood is approximated by p(y | x_t) ~= p(y | x_0 = x0_hat(x_t)) (Chung et al. 2023, Eq. 16),
    whose gradient is taken through ``score_fn`` by autograd (``score_fn`` must be differentiable in x).

    ``guidance="normalized"`` (the paper's Alg. 1 with zeta_i = zeta / ||y - A x0_hat||):
        x_s = ancestral_step(x_t, x0_hat) - zeta grad_{x_t} ||y - A x0_hat(x_t)||.
    ``guidance="likelihood"`` (Eq. 16 in score form, needs sigma_y > 0): the guided score
        s + grad_{x_t} [-||y - A x0_hat||^2 / (2 sigma_y^2)] drives the ancestral step (zeta unused).
    The approximation ignores Cov[x_0 | x_t], so even with the exact prior score DPS samples an
    approximation of p(x_0 | y) (exact as t -> 0, over-confident at large t). Under ``torch.inference_mode``
    the sampler leaves it (the guidance needs autograd).
    """
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return dps_sample(score_fn, sde, operator, y.clone(), steps=steps, zeta=zeta, guidance=guidance, eps=eps,
                              shape=shape, x_T=None if x_T is None else x_T.clone(), generator=generator,
                              denoise=denoise)
    _check_common(steps, eps, operator, sde)
    check_choice("guidance", guidance, GUIDANCE)
    check_positive("zeta", zeta)
    if guidance == "likelihood" and operator.sigma_y <= 0:
        raise ValueError("guidance='likelihood' needs an operator with sigma_y > 0; use guidance='normalized'")
    score = CountingScore(score_fn)
    eps = sde.default_eps if eps is None else float(eps)
    x = _start(sde, operator, y, shape, x_T, generator)
    ts = time_grid(sde.T, eps, steps + 1, device=x.device)
    for i in range(steps):
        t, s = batch_time(ts[i], x), batch_time(ts[i + 1], x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = tweedie_x0(sde, xg, t, score(xg, t))
            r2 = per_example_norm(y - operator.forward(x0)) ** 2
            if guidance == "normalized":
                obj = r2.clamp_min(1e-30).sqrt().sum()
            else:
                obj = -r2.sum() / (2 * operator.sigma_y**2)
            (grad,) = torch.autograd.grad(obj, xg)
        x0 = x0.detach()
        if guidance == "likelihood":
            alpha, sigma = (bcast(c.to(x.dtype), x) for c in sde.marginal_coeffs(t))
            x0 = x0 + sigma * sigma / alpha * grad  # Tweedie with the guided score s + grad log p(y|x_t)
            x = ancestral_step(sde, x, t, s, x0, generator)
        else:
            x = ancestral_step(sde, x, t, s, x0, generator) - zeta * grad
    with torch.no_grad():
        x = _final(score, sde, operator, x, eps, denoise)
    return SampleResult(samples=x.detach(), nfe=score.nfe)


# ----------------------------------------------------------------------------- replacement (Song et al.)
@torch.no_grad()
def replacement_sample(score_fn, sde: SDE, operator: LinearOperator, y: torch.Tensor, *, steps: int = 1000,
                       snr: float = 0.16, corrector_steps: int = 1, eps: float | None = None,
                       shape: tuple[int, ...] | None = None, x_T: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, denoise: bool = True) -> SampleResult:
    """Predictor-corrector sampling with replacement (Song et al. 2021, App. I.2; Alg. 4 for the corrector).

    After each reverse-diffusion predictor step t -> s (Eq. 46) and each Langevin corrector step at
    s (``samplers.pc``: step 2 a (snr ||z|| / ||s||)^2 with per-example norms; in very few
    dimensions those norms fluctuate and the corrector can overshoot, use corrector_steps=0), the observed component is replaced by the
    forward-diffused measurement: x_s <- (I - P) x_s + alpha_s A^+ y + sigma_s P z with P = A^+ A.
    For masks P keeps the known pixels; for ``Grayscale`` it is the gray coordinate of the
    decoupled orthogonal colour basis (Song et al.'s colorization). At the end x0_hat replaces its
    observed part by A^+ y, so for noise-free masks the known pixels equal y exactly.
    """
    _check_common(steps, eps, operator, sde)
    _needs_pinv(operator, "replacement")
    check_positive("snr", snr)
    check_int("corrector_steps", corrector_steps, min=0)
    score = CountingScore(score_fn)
    eps = sde.default_eps if eps is None else float(eps)
    x = _start(sde, operator, y, shape, x_T, generator)
    known0 = operator.pinv(y).expand(x.shape)  # a measurement broadcast over the samples: noise per sample
    ts = time_grid(sde.T, eps, steps + 1, device=x.device)
    for i in range(steps):
        t, s = batch_time(ts[i], x), batch_time(ts[i + 1], x)
        dt = ts[i] - ts[i + 1]
        x, _ = predict("reverse_diffusion", sde, score, x, t, dt, generator)
        x = operator.replace(x, diffused_known(sde, operator, known0, s, generator))
        for _ in range(int(corrector_steps)):
            x, _ = langevin_correct(sde, score, x, s, dt, snr, generator)
            x = operator.replace(x, diffused_known(sde, operator, known0, s, generator))
    x = _final(score, sde, operator, x, eps, denoise, known0)
    return SampleResult(samples=x, nfe=score.nfe)


# ----------------------------------------------------------------------------- RePaint
def repaint_schedule(steps: int, jump_length: int, resamplings: int) -> list[int]:
    """Levels k (k = steps is t = T, k = 0 is t = eps) visited by RePaint (Lugmayr et al. 2022, Sec. 4.2).

    Going down one level at a time; on reaching a multiple k of ``jump_length`` (below
    steps - jump_length) for the first ``resamplings - 1`` times, jump back up ``jump_length`` levels.
    """
    check_int("steps", steps)
    check_int("jump_length", jump_length)
    check_int("resamplings", resamplings)
    left = {k: resamplings - 1 for k in range(0, steps - jump_length, jump_length)}
    k, seq = steps, [steps]
    while k > 0:
        k -= 1
        seq.append(k)
        if left.get(k, 0) > 0:
            left[k] -= 1
            for _ in range(jump_length):
                k += 1
                seq.append(k)
    return seq


@torch.no_grad()
def repaint_sample(score_fn, sde: SDE, operator: LinearOperator, y: torch.Tensor, *, steps: int = 250,
                   jump_length: int = 10, resamplings: int = 10, eps: float | None = None,
                   shape: tuple[int, ...] | None = None, x_T: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, denoise: bool = True) -> SampleResult:
    """RePaint (Lugmayr et al. 2022, Alg. 1): masked ancestral steps with resampling.

    Reverse step t -> s: x_s^unknown ~ q(x_s | x_t, x0_hat(x_t)) (ancestral), x_s^known =
    alpha_s A^+ y + sigma_s P z (Eq. 8), combined as (I - P) x^unknown + x^known (Eq. 9). Every
    ``jump_length`` levels the chain is diffused back ``jump_length`` levels with the exact forward
    transition q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I) and denoised again, ``resamplings``
    times in all (``resamplings=1`` is plain masked ancestral sampling). At the end the observed
    part is set to A^+ y exactly.
    """
    _check_common(steps, eps, operator, sde)
    _needs_pinv(operator, "repaint")
    if jump_length > steps:
        raise ValueError(f"jump_length must be <= steps={steps}, got {jump_length!r}")
    score = CountingScore(score_fn)
    eps = sde.default_eps if eps is None else float(eps)
    x = _start(sde, operator, y, shape, x_T, generator)
    known0 = operator.pinv(y).expand(x.shape)  # a measurement broadcast over the samples: noise per sample
    ts = time_grid(sde.T, eps, steps + 1, device=x.device)  # ts[steps - k] is the time of level k
    levels = repaint_schedule(steps, jump_length, resamplings)
    for k_from, k_to in zip(levels[:-1], levels[1:]):
        t, s = batch_time(ts[steps - k_from], x), batch_time(ts[steps - k_to], x)
        if k_to < k_from:
            x0 = tweedie_x0(sde, x, t, score(x, t))
            x = ancestral_step(sde, x, t, s, x0, generator)
            x = operator.replace(x, diffused_known(sde, operator, known0, s, generator))
        else:
            a, sg = (bcast(c.to(x.dtype), x) for c in sde.transition_coeffs(s, t))
            x = a * x + sg * randn_like(x, generator)
    x = _final(score, sde, operator, x, eps, denoise, known0)
    return SampleResult(samples=x, nfe=score.nfe)
