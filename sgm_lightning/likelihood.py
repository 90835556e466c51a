"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, App. D.2, Eq. 39-40).

The probability-flow ODE dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 grad_x log p_t(x) (Eq. 13) is a
continuous normalizing flow, so by the instantaneous change of variables (Chen et al. 2018, Thm. 1)

    d log p_t(x(t)) / dt = -div f~(x(t), t),
    log p_eps(x) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt,                  (Eq. 39)

with x(eps) = x. ``log_likelihood`` integrates the pair [x(t), int div f~] from eps to T with
``torchdiffeq.odeint``. The divergence is exact (one autograd pass per data dimension; small D) or
Hutchinson's estimate E_v[v^T (d f~ / dx) v] with probes v drawn once per example before the solve
(Grathwohl et al. 2019, FFJORD), which keeps the estimate of the integral unbiased.

Image helpers: ``dequantize`` (uniform dequantization of n-bit data, Theis et al. 2016) and
``bits_per_dim`` (the change of variables from the continuous density of the scaled data to the
discrete n-bit data).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torchdiffeq import odeint

from sgm_lightning.samplers.common import CountingScore
from sgm_lightning.samplers.ode import FIXED_GRID_SOLVERS
from sgm_lightning.samplers.ode import TORCHDIFFEQ_SOLVERS as ODE_SOLVERS
from sgm_lightning.sde import SDE
from sgm_lightning.utils import check_choice, check_int, check_positive, rademacher_like, randn_like


# --------------------------------------------------------------------------- divergences
def exact_divergence(f: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """div_x f = tr(d f / d x) per example (B,), exactly: one autograd pass per data dimension.

    ``f`` (B, ...) must have been computed from ``x`` (B, ...) with examples independent of each
    other (no batch statistics), so that summing a coordinate over the batch gives each example's
    derivative.
    """
    B = x.shape[0]
    f_flat = f.reshape(B, -1)
    D = f_flat.shape[1]
    div = torch.zeros(B, dtype=f.dtype, device=f.device)
    for d in range(D):
        (grad,) = torch.autograd.grad(f_flat[:, d].sum(), x, retain_graph=True, create_graph=create_graph)
        div = div + grad.reshape(B, -1)[:, d]
    return div


def hutchinson_divergence(f: torch.Tensor, x: torch.Tensor, probes: torch.Tensor,
                          create_graph: bool = False) -> torch.Tensor:
    """Hutchinson's estimate (Hutchinson 1989) of div_x f, averaged over ``probes`` (P, B, ...) with
    E[v v^T] = I: mean_p v_p^T (d f / d x) v_p, one vector-Jacobian product per probe."""
    B = x.shape[0]
    est = torch.zeros(B, dtype=f.dtype, device=f.device)
    for v in probes:
        (jtv,) = torch.autograd.grad((f * v).sum(), x, retain_graph=True, create_graph=create_graph)
        est = est + (jtv * v).reshape(B, -1).sum(1)
    return est / probes.shape[0]


# --------------------------------------------------------------------------- log-likelihood
@dataclass
class LikelihoodResult:
    """Output of ``log_likelihood``.

    Attributes:
        nll: -log p_eps(x) in nats per example (B,) (= -log p_0(x) up to the O(eps) smoothing).
        nfe: number of score-function evaluations used by the ODE solver.
        prior_logp: log p_T(z) under the SDE's prior (B,).
        delta_logp: int_eps^T div f~ dt (B,), so that log p_eps(x) = prior_logp + delta_logp.
        z: the latent x(T) (shape of x).
    """

    nll: torch.Tensor
    nfe: int
    prior_logp: torch.Tensor
    delta_logp: torch.Tensor
    z: torch.Tensor


def log_likelihood(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sde: SDE, x: torch.Tensor,
                   trace: str = "hutchinson", generator: torch.Generator | None = None, eps: float | None = None,
                   probe: str = "rademacher", n_probes: int = 1, solver: str = "dopri5", rtol: float = 1e-5,
                   atol: float = 1e-5, steps: int | None = None, **solver_options) -> LikelihoodResult:
    """Negative log-likelihood of ``x`` under the probability-flow ODE of ``sde`` driven by ``score_fn``.

    Integrates [x(t), int div f~] from t = eps to T (Song et al. 2021, Eq. 39-40) and returns
    nll = -(log p_T(x(T)) + int_eps^T div f~ dt) per example.

    Args:
        score_fn: ``score_fn(x, t)`` -> grad_x log p_t(x), with t of shape (B,) in x's dtype; must be
            differentiable in x and treat examples independently.
        sde: the forward process (supplies the ODE drift via ``sde.reverse_drift`` and the prior).
        x: data (B, ...), floating point; everything runs on its device and in its dtype. Works under
            ``torch.inference_mode`` too (the solve leaves it, as the divergence needs autograd).
        trace: "exact" (autograd over every dimension) or "hutchinson".
        generator: source of the Hutchinson probes.
        eps: start time (default ``sde.default_eps``).
        probe: "rademacher" or "gaussian" Hutchinson probes.
        n_probes: probes per example (averaged).
        solver: a torchdiffeq method (``ODE_SOLVERS``); rtol, atol: its tolerances (adaptive methods).
        steps: fixed-grid methods (euler, rk4, ...): ``steps`` uniform steps from eps to T. A fixed-grid
            method needs ``steps`` or ``step_size=`` (or torchdiffeq's ``grid_constructor=``).
        **solver_options: passed to ``odeint`` as ``options`` (e.g. ``step_size=`` for fixed-step methods);
            ``method=`` (torchdiffeq's name) is accepted as an alias of ``solver``.
    """
    if torch.is_inference_mode_enabled():  # e.g. a Lightning test / predict step: autograd is off there
        with torch.inference_mode(False):
            return log_likelihood(score_fn, sde, x.clone(), trace, generator, eps, probe, n_probes, solver, rtol, atol,
                                  steps, **solver_options)
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating-point tensor of shape (B, ...), got "
                         f"{getattr(x, 'dtype', type(x).__name__)}; dequantize integer images first")
    if x.ndim < 1:
        raise ValueError("x must have shape (B, ...) (a batch of examples), got a 0-dim tensor")
    if x.numel() == 0:
        raise ValueError(f"x holds no values (shape {tuple(x.shape)}): pass at least one example")
    solver, eps, solver_options = _checked_options(sde, trace, eps, probe, n_probes, solver, rtol, atol, steps,
                                                   solver_options)

    x = x.detach()
    B = x.shape[0]
    probes = None
    if trace == "hutchinson":
        draw = rademacher_like if probe == "rademacher" else randn_like
        probes = torch.stack([draw(x, generator) for _ in range(int(n_probes))])
    counted_score = CountingScore(score_fn)  # counts the NFE, checks that the score is shaped like x

    def func(t, state):
        xt = state[0]
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            tt = t.to(x.dtype).expand(B)
            f = sde.reverse_drift(counted_score, xt, tt, probability_flow=True)
            if trace == "exact":
                div = exact_divergence(f, xt)
            else:
                div = hutchinson_divergence(f, xt, probes)
        return f.detach(), div.detach()

    ts = torch.tensor([eps, sde.T], dtype=x.dtype, device=x.device)
    y0 = (x, torch.zeros(B, dtype=x.dtype, device=x.device))
    xs, deltas = odeint(func, y0, ts, rtol=rtol, atol=atol, method=solver, options=solver_options or None)
    z, delta = xs[-1], deltas[-1]
    prior = sde.prior_logp(z)
    return LikelihoodResult(nll=-(prior + delta), nfe=counted_score.nfe, prior_logp=prior, delta_logp=delta, z=z)


def check_likelihood_options(**options) -> None:
    """Raise the ValueError that ``log_likelihood(..., **options)`` would raise for these keyword options
    (solver, steps, tolerances, trace, probes), without a model or data: callbacks check at construction."""
    known = ("trace", "eps", "probe", "n_probes", "solver", "rtol", "atol", "steps")
    kw = {k: options.pop(k) for k in known if k in options}
    kw.setdefault("solver", "dopri5")
    _checked_options(None, kw.get("trace", "hutchinson"), kw.get("eps"), kw.get("probe", "rademacher"),
                     kw.get("n_probes", 1), kw["solver"], kw.get("rtol", 1e-5), kw.get("atol", 1e-5), kw.get("steps"),
                     options)


def _solver_option_names(solver: str) -> set[str] | None:
    """The ``options`` torchdiffeq's ``solver`` takes: the arguments of its solver class (and bases); None
    when torchdiffeq's layout is not the one this reads."""
    import importlib
    import inspect
    try:
        cls = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS[solver]
    except (ImportError, AttributeError, KeyError):  # another torchdiffeq layout: no check
        return None
    names = {p for c in cls.__mro__ if "__init__" in c.__dict__
             for p, v in inspect.signature(c.__init__).parameters.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
    return names - {"self", "func", "y0", "rtol", "atol"}


def _checked_options(sde: SDE | None, trace, eps, probe, n_probes, solver, rtol, atol, steps,
                     solver_options: dict) -> tuple[str, float | None, dict]:
    """Validate ``log_likelihood``'s options; returns (solver, eps, odeint options). ``sde=None``: eps unchecked."""
    solver_options = dict(solver_options)
    if "method" in solver_options:
        solver = solver_options.pop("method")
    check_choice("trace", trace, ("exact", "hutchinson"))
    check_choice("probe", probe, ("rademacher", "gaussian"))
    check_choice("solver", solver, ODE_SOLVERS)
    check_int("n_probes", n_probes)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if sde is not None:
        eps = sde.default_eps if eps is None else float(eps)
        if not 0.0 <= eps < sde.T:
            raise ValueError(f"eps must lie in [0, T={sde.T}), got {eps!r}")
    takes = _solver_option_names(solver)
    unknown = [] if takes is None else sorted(set(solver_options) - takes)
    if unknown:  # torchdiffeq only warns ("Unexpected arguments") and integrates with its defaults
        hints = [f"{k!r}: did you mean {c[0]!r}?" for k in unknown
                 for c in [difflib.get_close_matches(k, ("rtol", "atol", "steps", *takes), 1)] if c]
        raise ValueError(f"unknown solver option(s) {unknown} for solver={solver!r}"
                         + (f" ({'; '.join(hints)})" if hints else "") + "; it takes rtol, atol, steps (fixed-grid "
                         f"solvers) and {', '.join(sorted(takes)) or 'no other options'}")
    grid_options = {"step_size", "grid_constructor"} & set(solver_options)
    if steps is not None:
        if solver not in FIXED_GRID_SOLVERS:
            raise ValueError(f"steps applies to the fixed-grid solvers ({', '.join(FIXED_GRID_SOLVERS)}); "
                             f"solver={solver!r} is adaptive: set rtol/atol instead, or pass solver='rk4'")
        n = check_int("steps", steps)
        if grid_options:
            raise ValueError(f"pass either steps or {' / '.join(sorted(grid_options))}, not both")
        solver_options["grid_constructor"] = lambda f, y0, t: torch.linspace(t[0], t[-1], n + 1, dtype=t.dtype,
                                                                             device=t.device)
    elif solver in FIXED_GRID_SOLVERS and not grid_options:
        raise ValueError(f"solver={solver!r} is a fixed-grid method and would take one step over [eps, T]: "
                         f"pass steps=N (N uniform steps) or step_size=...")
    return solver, eps, solver_options


# --------------------------------------------------------------------------- images
def _check_range(data_min: float, data_max: float, n_bits: int) -> None:
    check_int("n_bits", n_bits)
    if not data_max > data_min:
        raise ValueError(f"data_max must be > data_min, got data_min={data_min!r}, data_max={data_max!r}")


def bits_per_dim(nll: torch.Tensor, num_dims: int, *, n_bits: int = 8, data_min: float = -1.0,
                 data_max: float = 1.0, offset: float | None = None) -> torch.Tensor:
    """Bits per dimension of n-bit data from the NLL (nats) of its dequantized, rescaled version.

    Dequantized data y = k + u in [0, 2^n) (k the integer pixel, u ~ U(0, 1)^D) is rescaled to
    x = data_min + (data_max - data_min) y / 2^n, so p_y(y) = p_x(x) ((data_max - data_min) / 2^n)^D and

        bpd = -log2 p_y(y) / D = nll / (D ln 2) + n - log2(data_max - data_min),

    i.e. nll / (D ln 2) + 7 for 8-bit data in [-1, 1] (the offset of Song et al. 2021's code) and + 8
    for [0, 1]. Averaged over u this upper-bounds -log2 P(k) / D (Theis et al. 2016, Eq. 7; Jensen).

    Args:
        nll: nats per example (B,), e.g. ``log_likelihood(...).nll`` on ``dequantize(images)``.
        num_dims: D, the number of dimensions per example.
        n_bits: bits per dimension of the discrete data.
        data_min, data_max: the range the data was scaled to.
        offset: bits added per dimension; overrides n - log2(data_max - data_min) when given.
    """
    check_int("num_dims", num_dims)
    _check_range(data_min, data_max, n_bits)
    if offset is None:
        offset = n_bits - math.log2(data_max - data_min)
    return nll / (num_dims * math.log(2.0)) + offset


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None, *, n_bits: int = 8,
               n_draws: int | None = None, data_min: float = -1.0, data_max: float = 1.0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform dequantization (Theis et al. 2016): x = data_min + (data_max - data_min)(k + u) / 2^n.

    Args:
        images: integer pixels k in {0, ..., 2^n - 1} (e.g. uint8), or floats already scaled as
            data_min + (data_max - data_min) k / (2^n - 1) (the usual ``ToTensor`` then ``2x - 1``
            convention), from which k is recovered by rounding.
        generator: source of u ~ U(0, 1).
        n_bits: bits per dimension.
        n_draws: None -> one draw, shape of ``images``; an integer R -> R independent draws, shape (R, *images.shape).
        data_min, data_max: target range.
        dtype: floating dtype of the result.
    """
    _check_range(data_min, data_max, n_bits)
    if n_draws is not None:
        check_int("n_draws", n_draws)
    levels = 2**n_bits
    if torch.is_floating_point(images):
        k = torch.round((images.to(torch.float64) - data_min) / (data_max - data_min) * (levels - 1))
    elif images.dtype == torch.bool or torch.is_complex(images):
        raise ValueError(f"images must be integer pixels or scaled floats, got dtype {images.dtype}")
    else:
        k = images.to(torch.float64)
    if (k < 0).any() or (k > levels - 1).any():
        raise ValueError(f"images hold values outside the {n_bits}-bit range [0, {levels - 1}] "
                         f"(or outside [data_min, data_max] = [{data_min}, {data_max}] for floats)")
    shape = tuple(k.shape) if n_draws is None else (int(n_draws),) + tuple(k.shape)
    u = torch.rand(shape, generator=generator, device=k.device, dtype=torch.float64)
    x = data_min + (data_max - data_min) * (k + u) / levels
    return x.to(dtype)
