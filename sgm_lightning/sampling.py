"""``sample``: one entry point for every sampler (part of the public API).

    result = sample(score_fn, sde, shape, method, steps=None, generator=None, **options)
    result.samples  # tensor of ``shape``
    result.nfe      # number of score_fn evaluations (one per batched call)

``score_fn(x, t)`` is any callable returning grad_x log p_t(x); it receives t of shape (B,) in x's
dtype. Methods (see the modules of ``sgm_lightning.samplers`` for the equations):

    "pc"    predictor-corrector (Song et al. 2021, Alg. 1-3); options predictor, corrector, snr,
            corrector_steps, hmc_leapfrog, hmc_persistence. steps default sde.N.
    "ddpm"  ancestral sampling (Ho et al. 2020, Alg. 2 / Song et al. 2021, Eq. 47). steps default sde.N.
    "ddim"  DDIM (Song, Meng & Ermon 2021, Eq. 12); option eta (0). steps default 100.
    "ode"   probability-flow ODE (Song et al. 2021, Eq. 13); options solver ("rk45": Dormand-Prince
            with the standard controller, or any torchdiffeq method), rtol, atol (1e-5), grid.
            steps: fixed-grid solvers only (default 100).
    "heun"  EDM Heun sampler (Karras et al. 2022, Alg. 1); options rho (7), s_churn, s_tmin,
            s_tmax, s_noise. steps default 18 (NFE 35).
    "ald"   annealed Langevin dynamics (Song & Ermon 2019, Alg. 1); options steps_per_level (100),
            step_lr (0.2 sigma_L^2: 2e-5 for sigma_L = 0.01). steps = number of noise levels, default 10.
    "dpm2m", "dpm3m"  DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) / a third-order multistep exponential integrator
                      (exact kernel integrals; Lu et al.'s 3M code form is second order); options grid ("logsnr"), rho (7).
            steps default 10 (NFE = steps).
    "dpm_sde"  SDE-DPM-Solver++(2M); options grid, rho. steps default 20.
    "unipc" UniPC (Zhao et al. 2023); options order (2: UniP-2 + UniC, order 3), grid, rho.
            steps default 10 (NFE = steps).
    "sde"   reverse-time SDE with torchsde; options solver (euler | milstein | srk, default srk), adaptive (False),
            rtol, atol (1e-3). steps default 100.

Time grids (``grid`` = "uniform" | "logsnr" | "karras", ``sgm_lightning.samplers.grids``): every
method except "sde" takes one; the defaults keep each method's classic grid (uniform for pc, ddpm,
ddim, ode; karras for heun; logsnr for ald and the exponential integrators). The corrector of "pc"
may be "hmc" (options hmc_leapfrog, hmc_persistence). PF-ODE encoding: ``encode``, ``decode``,
``slerp``, ``interpolate`` (``sgm_lightning.samplers.encode``).

Options common to all methods: ``eps`` (end time, default ``sde.default_eps``), ``device``,
``dtype`` (float32, or x_T's floating dtype when x_T is given), ``x_T`` (start point instead of
``sde.prior_sampling``), ``callback(i, t, x)``
(after every step), ``return_trajectory`` (False), ``denoise`` (True: the last step returns the
noise-free mean / Tweedie's x0_hat, as in the literature).
Randomness comes only from ``generator``: the same seed gives the same samples.
"""

from __future__ import annotations

import difflib
import inspect

import torch

from sgm_lightning.samplers import METHODS, ald, ddim, ddpm, dpm2m, dpm3m, dpm_sde, heun, ode, pc, sde_solve, unipc
from sgm_lightning.samplers.common import CountingScore, Recorder, SampleResult
from sgm_lightning.samplers.encode import decode, encode, interpolate, slerp
from sgm_lightning.sde import SDE
from sgm_lightning.utils import check_choice, check_flag, check_int, check_number

__all__ = ["sample", "SampleResult", "METHODS", "default_steps", "encode", "decode", "slerp", "interpolate"]

_RUNNERS = {"pc": pc, "ddpm": ddpm, "ddim": ddim, "ode": ode, "heun": heun, "ald": ald, "dpm2m": dpm2m,
            "dpm3m": dpm3m, "dpm_sde": dpm_sde, "unipc": unipc, "sde": sde_solve}
_COMMON = ("eps", "device", "dtype", "x_T", "callback", "return_trajectory", "denoise")


def default_steps(method: str, sde: SDE) -> int | None:
    """Default ``steps`` per method (None for the adaptive ODE solver)."""
    return {"pc": sde.N, "ddpm": sde.N, "ddim": 100, "ode": None, "heun": 18, "ald": 10, "dpm2m": 10, "dpm3m": 10,
            "dpm_sde": 20, "unipc": 10, "sde": 100}[method]


def _method_options(method: str) -> tuple[str, ...]:
    params = inspect.signature(_RUNNERS[method]).parameters
    fixed = {"score", "sde", "x", "steps", "eps", "generator", "denoise", "record"}
    return tuple(p for p in params if p not in fixed)


def _hints(unknown: list[str], allowed: tuple[str, ...]) -> str:
    """' (did you mean ...?)' for misspelled options, the methods that take an option of another method."""
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name.lower(), ("steps", "generator", *allowed), n=1, cutoff=0.6)
        owners = [m for m in METHODS if name in _method_options(m)]
        if close:
            hints.append(f"{name!r}: did you mean {close[0]!r}?")
        elif owners:
            hints.append(f"{name!r} is an option of method={' / '.join(owners)}")
        elif name == "seed":
            hints.append("for a seed s pass generator=torch.Generator().manual_seed(s)")
    return f" ({'; '.join(hints)})" if hints else ""


def check_sampler_options(method: str, options) -> None:
    """The ValueError ``sample(..., method, **options)`` raises for an option ``method`` does not take (with a
    did-you-mean hint), without a model: callbacks check their sampler settings at construction."""
    check_choice("method", method, METHODS)
    allowed = _COMMON + _method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method={method!r}{_hints(unknown, allowed)}; "
                         f"allowed options: steps, generator, {', '.join(allowed)}")


def _check_shape(shape) -> tuple[int, ...]:
    ok = isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 1 and all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    if not ok:
        raise ValueError(f"shape must be a tuple of positive ints (B, ...), got {shape!r}")
    return tuple(shape)


def sample(score_fn, sde: SDE, shape, method: str, steps: int | None = None,
           generator: torch.Generator | None = None, **options) -> SampleResult:
    """Draw samples of ``shape`` from the reverse process of ``sde`` driven by ``score_fn``.

    Args:
        score_fn: callable ``score_fn(x, t) -> grad_x log p_t(x)`` (t of shape (B,), x's dtype).
        sde: the forward process (``sgm_lightning.sde.SDE``).
        shape: (B, ...) shape of the samples.
        method: one of METHODS.
        steps: number of steps (levels for "ald"); None = the method's default (``default_steps``).
        generator: torch.Generator on the sampling device (None = global RNG).
        **options: the common options (module doc) and the method's own options.
    Returns:
        SampleResult(samples, nfe, trajectory).
    """
    check_choice("method", method, METHODS)
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be an sgm_lightning.sde.SDE, got {type(sde).__name__}")
    shape = _check_shape(shape)
    check_sampler_options(method, options)
    if steps is None:
        steps = default_steps(method, sde)
    else:
        steps = check_int("steps (None: the method's default)", steps)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__} "
                         "(for a seed s pass generator=torch.Generator().manual_seed(s))")
    eps = options.pop("eps", None)
    if eps is not None:
        eps = check_number("eps", eps, 0.0, sde.T, open_ends=True, what=f" with 0 < eps < T={sde.T}")
    x_T = options.pop("x_T", None)
    if x_T is not None and (not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != shape):
        got = tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__
        raise ValueError(f"x_T must be a tensor of shape {shape}, got {got}")
    # default dtype: x_T's when it is a floating tensor (a float64 start point stays float64), else float32
    default_dtype = x_T.dtype if x_T is not None and x_T.is_floating_point() else torch.float32
    dtype = options.pop("dtype", default_dtype)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    device = options.pop("device", None)
    if device is None:
        device = x_T.device if x_T is not None else (generator.device if generator is not None else "cpu")
    device = torch.device(device)
    if x_T is None:
        x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    else:
        x = x_T.to(device=device, dtype=dtype)
    keep = check_flag("return_trajectory", options.pop("return_trajectory", False))
    record = Recorder(options.pop("callback", None), keep)
    denoise = check_flag("denoise", options.pop("denoise", True))
    score = CountingScore(score_fn)
    with torch.no_grad():
        x = _RUNNERS[method](score, sde, x, steps=steps, eps=eps, generator=generator, denoise=denoise,
                             record=record, **options)
    return SampleResult(samples=x, nfe=score.nfe, trajectory=record.trajectory)
