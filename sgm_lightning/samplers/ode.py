"""Probability-flow ODE sampler (Song et al. 2021, Eq. 13) integrated with torchdiffeq.

    dx/dt = f(x, t) - 1/2 g(t)^2 grad_x log p_t(x),   integrated from t = T to t = eps.

The drift comes from ``sde.reverse(score, probability_flow=True)``. Adaptive solvers integrate
[T, eps] to tolerance rtol/atol: "rk45" (the default) is Dormand-Prince with the standard
controller (``dopri``; no more NFE than scipy's RK45 at equal tolerances), and every torchdiffeq
method is accepted too (dopri5, bosh3, ...). Fixed-grid solvers (euler, midpoint, rk4, ...) take
``steps`` steps on the time grid ``grid`` (default "uniform"; see ``grids``). Everything stays on the tensor's device.
With ``denoise=True`` the sampler returns Tweedie's x0_hat = (x + sigma^2 s) / alpha at t = eps
(one extra score evaluation). NFE is counted by the score wrapper (adaptive solvers also count
their initial step-size probe and rejected steps).
"""

from __future__ import annotations

import torch
import torchdiffeq

from sgm_lightning.samplers.dopri import StepSizeUnderflow, dopri5
from sgm_lightning.samplers.common import CountingScore, Recorder, batch_time, tweedie_x0
from sgm_lightning.samplers.grids import make_grid
from sgm_lightning.sde import SDE
from sgm_lightning.utils import check_choice, check_positive


# torchdiffeq's documented ``method=`` names (its README), split into fixed-grid and adaptive solvers;
# the one list of ODE solvers of the package (likelihood.py takes it from here).
FIXED_GRID_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams",
                      "fixed_adams")
ADAPTIVE_SOLVERS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")
TORCHDIFFEQ_SOLVERS = ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS


def solver_names() -> tuple[str, ...]:
    """Names accepted by ``solver=``: "rk45" and torchdiffeq's methods."""
    return ("rk45",) + TORCHDIFFEQ_SOLVERS


def is_fixed_grid(solver: str) -> bool:
    """True for torchdiffeq's fixed-grid solvers (euler, midpoint, rk4, ...)."""
    return solver in FIXED_GRID_SOLVERS


def check_ode_options(solver: str, rtol: float, atol: float) -> None:
    check_choice("solver", solver, solver_names())
    check_positive("rtol", rtol)
    check_positive("atol", atol)


def pf_ode_path(score, sde: SDE, x: torch.Tensor, times: torch.Tensor, solver: str, rtol: float,
                atol: float) -> list[torch.Tensor]:
    """Solve the probability-flow ODE (Song et al. 2021, Eq. 13) through the float64 ``times``
    (monotone, either direction; fixed-grid solvers step on exactly these times).

    Returns the states at times[1:] (only at times[-1] for "rk45").
    """
    rsde = sde.reverse(score, probability_flow=True)

    def func(t, y):
        return rsde.sde(y, batch_time(torch.as_tensor(t, dtype=torch.float64), y))[0]

    kwargs = {"rtol": rtol, "atol": atol} if not is_fixed_grid(solver) else {}
    try:
        if solver == "rk45":
            return [dopri5(func, x, float(times[0]), float(times[-1]), rtol, atol)]
        # torchdiffeq evaluates times in the state's dtype; keep the grid there.
        path = torchdiffeq.odeint(func, x, times.to(x.dtype), method=solver, **kwargs)
    except (AssertionError, StepSizeUnderflow) as e:  # adaptive step control: "underflow in dt ..."
        if "underflow" not in str(e):
            raise
        name = "'rk45' (Dormand-Prince, as dopri5)" if solver == "rk45" else repr(solver)
        raise RuntimeError(f"the adaptive ODE solver {name} could not keep its step size above zero ({e}): "
                           "the probability-flow drift is too stiff for rtol/atol (typical of a barely trained "
                           "model near t = eps); use a fixed-grid solver (solver='rk4', steps=...), a larger eps, "
                           "or looser rtol/atol") from e
    return list(path[1:])


def ode(score: CountingScore, sde: SDE, x: torch.Tensor, *, steps: int | None, eps: float | None,
        generator: torch.Generator | None, denoise: bool, record: Recorder, solver: str = "rk45",
        rtol: float = 1e-5, atol: float = 1e-5, grid: str = "uniform") -> torch.Tensor:
    """Integrate the probability-flow ODE (Song et al. 2021, Eq. 13) from T to eps; see module doc.

    ``steps`` is the number of steps for fixed-grid solvers (default 100); for torchdiffeq's adaptive
    solvers it is only the number of output times passed to the callback / trajectory (default 1);
    "rk45" reports only the end point.
    """
    check_ode_options(solver, rtol, atol)
    eps = sde.default_eps if eps is None else eps
    fixed = is_fixed_grid(solver)
    n = (steps if steps is not None else 100) if fixed else (steps if steps is not None else 1)
    times = make_grid(grid if fixed else "uniform", sde, eps, n + 1, device=x.device)
    path = pf_ode_path(score, sde, x, times, solver, rtol, atol)
    for i, xi in enumerate(path):
        record(i, times[len(times) - len(path) + i], xi)
    x = path[-1]
    if denoise:
        t_eps = batch_time(times[-1], x)
        x = tweedie_x0(sde, x, t_eps, score(x, t_eps))
    return x
