"""Dormand-Prince RK5(4) with the standard step-size controller (Hairer, Norsett & Wanner 1993,
"Solving ODEs I", Sec. II.4-II.5; the controller of scipy's ``RK45``).

Step: the 7-stage Dormand & Prince (1980) pair, first-same-as-last (6 new evaluations per step).
Error norm: err = RMS over all elements of (h sum_i E_i k_i) / (atol + rtol max(|y_n|, |y_{n+1}|)).
Accept when err <= 1; the next step is h * min(10, 0.9 err^(-1/5)) (never growing right after a
rejection); a rejected step shrinks by max(0.2, 0.9 err^(-1/5)).
First step (Hairer et al., Sec. II.4): h0 = 0.01 ||y0|| / ||f0||, one Euler probe y0 + h0 f0 gives
an estimate of the second derivative d2, and h = min(100 h0, (0.01 / max(||f0||, d2))^(1/5)), all
norms scaled by atol + rtol |y0|. NFE = 2 + 6 (accepted + rejected steps).
A step below 10 units of t's resolution in the state's dtype (``func`` sees t in that dtype) stops
the solver with ``StepSizeUnderflow``, as scipy does at 10 ulp of float64.
The state is advanced in float64 whatever ``func`` works in.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = ((),
      (1 / 5,),
      (3 / 40, 9 / 40),
      (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # b5 - b4
class StepSizeUnderflow(RuntimeError):
    """The controller needed a step below 10 ulp(t)."""


SAFETY, MIN_FACTOR, MAX_FACTOR, ORDER = 0.9, 0.2, 10.0, 4  # ORDER: of the embedded error estimate


def _rms(v: torch.Tensor) -> float:
    return float(v.pow(2).mean().sqrt())


def _initial_step(func, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float, rtol: float,
                  atol: float, span: float) -> float:
    scale = atol + y0.abs() * rtol
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    f1 = func(t0 + direction * h0, y0 + direction * h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1 / (ORDER + 1))
    return min(100 * h0, h1, span)


def dopri5(func: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, t0: float, t1: float,
           rtol: float, atol: float) -> torch.Tensor:
    """Integrate dy/dt = func(t, y) from t0 to t1 (either direction) to tolerance rtol / atol; returns y(t1)."""
    dtype = y0.dtype
    t_res = torch.finfo(dtype).eps  # func sees t in y0's dtype: finer steps in t are not resolved

    def f(t: float, y: torch.Tensor) -> torch.Tensor:
        return func(t, y.to(dtype)).to(torch.float64)

    y = y0.to(torch.float64)
    t, direction, span = float(t0), math.copysign(1.0, t1 - t0), abs(t1 - t0)
    k = f(t, y)
    h_abs = _initial_step(f, t, y, k, direction, rtol, atol, span)
    rejected = False
    while direction * (t1 - t) > 0:
        min_step = 10 * max(math.ulp(abs(t)), t_res * abs(t))
        at_min = h_abs <= min_step
        h_abs = max(h_abs, min_step)
        t_new = t + direction * h_abs
        if direction * (t_new - t1) > 0:
            t_new = t1
        h = t_new - t
        ks = [k]
        for c, a in zip(_C[1:], _A[1:]):
            ks.append(f(t + c * h, y + h * sum(ai * ki for ai, ki in zip(a, ks))))
        y_new = y + h * sum(b * ki for b, ki in zip(_B, ks) if b != 0.0)
        k_new = f(t_new, y_new)
        err_vec = h * sum(e * ki for e, ki in zip(_E, ks + [k_new]) if e != 0.0)
        err = _rms(err_vec / (atol + torch.maximum(y.abs(), y_new.abs()) * rtol))
        if err < 1:
            factor = MAX_FACTOR if err == 0 else min(MAX_FACTOR, SAFETY * err ** (-1 / (ORDER + 1)))
            if rejected:
                factor = min(1.0, factor)
            t, y, k, rejected = t_new, y_new, k_new, False
            h_abs = abs(h) * factor
        else:
            if at_min:
                raise StepSizeUnderflow(f"underflow in dt at t={t}")
            h_abs = abs(h) * max(MIN_FACTOR, SAFETY * err ** (-1 / (ORDER + 1)))
            rejected = True
    return y.to(dtype)
