"""Reverse-time SDE solvers through torchsde (Li et al. 2020): Euler-Maruyama, Milstein and the
strong order-1.5 stochastic Runge-Kutta of Roessler (2010), fixed-step or adaptive.

The reverse-time SDE (Song et al. 2021, Eq. 6)

    dx = [f(x, t) - g(t)^2 grad_x log p_t(x)] dt + g(t) dw_bar,   t from T down to eps,

is written in the forward variable tau = T - t (torchsde integrates forward in time):
dx = -[f - g^2 s](x, T - tau) dtau + g(T - tau) dw. The drift and diffusion come from
``sde.reverse(score)``. The noise is diagonal and depends on t only, so the Milstein correction
g dg/dx vanishes and Milstein is Euler-Maruyama step for step (the tests check this on one
Brownian path); "srk" gains accuracy in the drift. NFE per step: 1 (euler, milstein), 4 (srk: its four stages;
torchsde recomputes earlier stages, which are remembered here so they count once), doubled plus
rejections when adaptive. Options: ``solver`` (euler | milstein | srk),
``adaptive`` (False; torchsde's step-doubling error control with ``rtol``, ``atol``), steps =
number of uniform steps (the initial step when adaptive). torchsde steps on its own uniform grid,
so these solvers take no ``grid`` option. Images are flattened to (B, D) for torchsde. With
``denoise=True`` the result is Tweedie's x0_hat at eps (one extra NFE). The Brownian path is drawn
from a seed taken from ``generator``. The callback / trajectory see every step's iterate (adaptive:
only the end point, as the steps are not known in advance).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from sgm_lightning.samplers.common import CountingScore, Recorder, batch_time, tweedie_x0
from sgm_lightning.sde import SDE
from sgm_lightning.utils import bcast, check_choice, check_flag, check_positive

SDE_SOLVERS = ("euler", "milstein", "srk")
MEMO_SIZE = 8  # > the number of SRK stages


class _TorchsdeReverse(torch.nn.Module):
    """The reverse-time SDE in tau = T - t as torchsde wants it (Ito, diagonal noise, (B, D) states)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde: SDE, score, shape, dtype):
        super().__init__()
        self.rsde, self.T, self.shape, self.dtype = sde.reverse(score), sde.T, shape, dtype
        # torchsde re-evaluates f on the same (tau, state) several times (its shape check, and SRK's
        # stage loops recompute every earlier stage): remember the last few so each counts once
        self._memo: OrderedDict = OrderedDict()

    def _t(self, tau, y):
        return batch_time(torch.as_tensor(self.T - tau, dtype=torch.float64), y)

    def f(self, tau, y):
        key = (float(tau), id(y))
        if key in self._memo:
            return self._memo[key][1]
        drift, _ = self.rsde.sde(y.reshape(self.shape), self._t(tau, y))
        out = -drift.reshape(y.shape)
        self._memo[key] = (y, out)  # holding y keeps id(y) unique while cached
        if len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)
        return out

    def g(self, tau, y):
        _, g = self.rsde.forward.sde(y, self._t(tau, y))
        return bcast(g, y).expand_as(y)


def _output_times(span: float, dt: float, steps: int, y0: torch.Tensor, every_step: bool) -> torch.Tensor:
    """torchsde's output times in tau: [0, span], or every step time when the callback / trajectory
    wants each iterate. torchsde steps t -> min(t + dt, span) and interpolates linearly at output times,
    so the step times are accumulated here exactly as it does: each output then falls on a step
    (the interpolation returns the iterate itself) and the steps, hence the samples, are unchanged."""
    ends = torch.tensor([0.0, span], dtype=y0.dtype, device=y0.device)
    if not every_step or steps == 1:
        return ends
    taus = [ends[0]]
    for _ in range(steps - 1):
        taus.append(taus[-1] + dt)
    ts = torch.stack(taus + [ends[1]])
    return ts if bool((ts[1:] > ts[:-1]).all()) else ends


def sde_solve(score: CountingScore, sde: SDE, x: torch.Tensor, *, steps: int, eps: float | None,
              generator: torch.Generator | None, denoise: bool, record: Recorder, solver: str = "srk",
              adaptive: bool = False, rtol: float = 1e-3, atol: float = 1e-3) -> torch.Tensor:
    """Integrate the reverse-time SDE from T to eps with torchsde; see module doc."""
    import torchsde

    check_choice("solver", solver, SDE_SOLVERS)
    adaptive = check_flag("adaptive", adaptive)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    eps = sde.default_eps if eps is None else eps
    shape = x.shape
    y0 = x.reshape(shape[0], -1)
    span = sde.T - eps
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    # dt a hair above span / steps: float rounding must not add an (n + 1)-th sliver step
    dt = span / steps * (1 + 1e-5)
    ts = _output_times(span, dt, steps, y0, every_step=record.active and not adaptive)
    bm = torchsde.BrownianInterval(t0=0.0, t1=float(ts[-1]), size=y0.shape, dtype=y0.dtype, device=y0.device,
                                   entropy=seed, levy_area_approximation="space-time" if solver == "srk" else "none")
    ys = torchsde.sdeint(_TorchsdeReverse(sde, score, shape, x.dtype), y0, ts, bm=bm, method=solver,
                         dt=dt, adaptive=adaptive, rtol=rtol, atol=atol)
    for i in range(1, len(ts)):
        record(i - 1, eps if i == len(ts) - 1 else sde.T - float(ts[i]), ys[i].reshape(shape))
    x = ys[-1].reshape(shape)
    if denoise:
        t_eps = batch_time(torch.tensor(eps, dtype=torch.float64), x)
        x = tweedie_x0(sde, x, t_eps, score(x, t_eps))
    return x
