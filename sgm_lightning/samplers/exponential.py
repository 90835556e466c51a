"""Exponential-integrator solvers written once for any linear SDE: DDIM, DPM-Solver++ (2M, 3M),
SDE-DPM-Solver++(2M) and UniPC.

With x_t = alpha_t x_0 + sigma_t eps and the half log-SNR lambda_t = log(alpha_t / sigma_t), the
probability-flow ODE in data prediction x0_hat(x, t) (Tweedie, ``tweedie_x0``) has the exact
solution between s > t, h = lambda_t - lambda_s > 0 (Lu et al. 2022b, DPM-Solver++, Eq. 9):

    x_t = (sigma_t / sigma_s) x_s + alpha_t int_0^h e^{-(h - u)} x0_hat(lambda_s + u) du,

and the reverse SDE (variation of constants in lambda; the form behind SDE-DPM-Solver++) gives

    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t int_0^h 2 e^{-2(h - u)} x0_hat(lambda_s + u) du
          + sigma_t sqrt(1 - e^{-2h}) z.

A multistep solver of order p replaces x0_hat by the last p data predictions m_0 (at lambda_s),
m_1, m_2 (earlier) with weights w_j: x_t = (sigma_t / sigma_s) x_s + alpha_t sum_j w_j m_j for the
ODE, and (sigma_t / sigma_s) e^{-h} x_s + alpha_t sum_j w_j m_j + sigma_t sqrt(1 - e^{-2h}) z for
the SDE (kernel c e^{-c(h - u)}, c = 1 ODE, c = 2 SDE). Two weightings (``form``):

  "kernel"  the polynomial through the p predictions (in lambda), integrated exactly against the
            kernel: with nodes r_j = (lambda_j - lambda_s) / h, sum_j w_j r_j^k = J_k = int_0^h
            c e^{-c(h - u)} (u / h)^k du, J_0 = 1 - e^{-ch}, J_k = 1 - k / (c h) J_{k-1}
            (``node_weights``).
  "lu"      Lu et al.'s step forms (``lu_weights``). With r = (lambda_s - lambda_1) / h: order 2 is
            DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), sum_j w_j m_j = (1 - e^{-h}) D,
            D = (1 + 1/(2r)) m_0 - 1/(2r) m_1; with c = 2, (1 - e^{-2h}) D is the SDE-DPM-Solver++(2M)
            step of their code (solver_type "midpoint"). Order 3 is multistep_dpm_solver_third_update
            of their code, (1 - e^{-h}) m_0 + phi_2 D1 - phi_3 D2: its D2 ~ h^2 x0_hat'' / 2 carries the
            weight -phi_3 that h^2 x0_hat'' needs (half the second-derivative term is lost), so it
            converges at order 2 only; kept for the comparison below, no method uses it.

Both forms are DDIM at order 1 and second order at order 2 (with different error constants).
Methods:

    order 1 = DDIM (Song et al. 2021a, Eq. 12 with eta = 0; eta = 1 for the SDE kernel: DDPM),
    "dpm2m" = DPM-Solver++(2M): form "lu" (Alg. 2),
    "dpm_sde" = SDE-DPM-Solver++(2M): form "lu" with c = 2 (midpoint),
    "dpm3m" = DPM-Solver++(3M) as the third-order "kernel" form (an Adams-type exponential integrator
        through three predictions), not the coefficient form of Lu et al.'s code,
    "unipc" = UniPC (Zhao et al. 2023, Alg. 2-3): the order-p predictor (UniP-p), then the corrector
        UniC-p, which adds the data prediction at the new point x_t as one more node (order p + 1)
        and reuses that evaluation for the next step: no extra NFE. The coefficients here are the
        exact kernel integrals of the interpolating polynomial (the varying-coefficient form), not
        the paper's B(h) fits.

``python benchmarks/samplers.py --forms`` compares the two (PF-ODE endpoint error against the exact
or a tight adaptive solve, Gaussian and 2-D mixture data, VP / VE): at 10-50 steps 2M's "lu" error is
1.4-4.4x smaller on the Gaussian and 1.4-1.6x smaller on the mixture by the median over points (the
worst point, near the boundary between the modes, is 1.0-2.9x better with "kernel"; at 5 steps
"kernel" is ahead); on the Gaussian the SDE step's output mean and std are 1.8-17x closer. 3M's
"kernel" form is third order where the code's form is second.

Grid: ``steps`` times from T to eps on ``grid`` (default "logsnr", Lu et al.'s recommendation for
few steps; "uniform", "karras" in ``grids``). The first steps warm up at lower order; with fewer
than 15 steps the last ones also drop order (Lu et al. 2022b's lower_order_final). Every grid time is
one score evaluation: NFE = steps. With ``denoise=True`` the result is the data prediction x0_hat at
t = eps (as DDIM's final step to t = 0); otherwise x at eps (the last evaluation is skipped).
"""

from __future__ import annotations

import math

import torch

from sgm_lightning.samplers.common import CountingScore, Recorder, batch_time, tweedie_x0
from sgm_lightning.samplers.grids import make_grid
from sgm_lightning.sde import SDE
from sgm_lightning.utils import randn_like

LOWER_ORDER_FINAL_BELOW = 15  # steps below which the final steps drop order (DPM-Solver++ default)


def kernel_moments(h: float, k: int, c: float = 1.0) -> torch.Tensor:
    """J_0..J_{k-1} with J_j = int_0^h c e^{-c(h - u)} (u / h)^j du (float64, shape (k,))."""
    ch = c * h
    out = [-math.expm1(-ch)]
    for j in range(1, k):
        out.append(1.0 - j / ch * out[-1])
    return torch.tensor(out, dtype=torch.float64)


def node_weights(nodes: list[float], h: float, c: float = 1.0) -> torch.Tensor:
    """Weights w_j of the data predictions at lambda_s + r_j h (r_j = ``nodes``), so that
    sum_j w_j m_j = int_0^h c e^{-c(h - u)} P(u) du for the interpolating polynomial P."""
    r = torch.tensor(nodes, dtype=torch.float64)
    V = r[None, :] ** torch.arange(len(nodes), dtype=torch.float64)[:, None]
    return torch.linalg.solve(V, kernel_moments(h, len(nodes), c))


def lu_weights(nodes: list[float], h: float, c: float = 1.0) -> torch.Tensor:
    """Weights of Lu et al.'s DPM-Solver++ step forms for the predictions at lambda_s + r_j h, oldest
    first, the last at r = 0 (module doc): 1 node J_0; 2 nodes Alg. 2; 3 nodes their code's 3M."""
    j0 = -math.expm1(-c * h)
    if len(nodes) == 1:
        return torch.tensor([j0], dtype=torch.float64)
    r0 = -nodes[-2]  # (lambda_s - lambda_1) / h
    if len(nodes) == 2:
        return torch.tensor([-j0 / (2 * r0), j0 * (1 + 1 / (2 * r0))], dtype=torch.float64)
    if len(nodes) != 3 or c != 1.0:
        raise ValueError("the 'lu' form has 1-3 nodes, and 3 for the ODE (c = 1) only")
    r1 = nodes[-2] - nodes[-3]  # (lambda_1 - lambda_2) / h
    phi2 = math.expm1(-h) / h + 1.0
    phi3 = phi2 / h - 0.5
    # x0 terms: J_0 m_0 + phi2 D1 - phi3 D2 with d0 = (m_0 - m_1) / r0, d1 = (m_1 - m_2) / r1,
    # D1 = d0 + r0 / (r0 + r1) (d0 - d1), D2 = (d0 - d1) / (r0 + r1)
    a = phi2 * (1 + r0 / (r0 + r1)) - phi3 / (r0 + r1)  # weight of d0
    b = phi2 * r0 / (r0 + r1) - phi3 / (r0 + r1)  # minus the weight of d1
    return torch.tensor([b / r1, -a / r0 - b / r1, j0 + a / r0], dtype=torch.float64)


FORMS = {"kernel": node_weights, "lu": lu_weights}


def _check_order(order, allowed=(1, 2, 3)) -> int:
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(f"order must be one of {allowed}, got {order!r}")
    return int(order)


def exp_multistep(score: CountingScore, sde: SDE, x: torch.Tensor, *, steps: int, eps: float | None,
                  generator: torch.Generator | None, denoise: bool, record: Recorder, order: int = 2,
                  corrector: bool = False, stochastic: bool = False, grid: str = "logsnr",
                  rho: float = 7.0, form: str = "kernel") -> torch.Tensor:
    """Multistep exponential integrator in data prediction (see module doc); ``form`` = "kernel" | "lu"."""
    order = _check_order(order)
    if form not in FORMS or (form == "lu" and corrector):
        raise ValueError(f"form must be one of {tuple(FORMS)} ('kernel' with the UniC corrector), got {form!r}")
    weights = FORMS[form]
    eps = sde.default_eps if eps is None else eps
    times = make_grid(grid, sde, eps, steps, rho, device=x.device)
    alphas, sigmas = sde.marginal_coeffs(times)
    lams = (torch.log(alphas) - torch.log(sigmas)).tolist()
    alphas, sigmas = alphas.tolist(), sigmas.tolist()
    c = 2.0 if stochastic else 1.0

    def data_pred(y: torch.Tensor, i: int) -> torch.Tensor:
        t = batch_time(times[i], y)
        return tweedie_x0(sde, y, t, score(y, t))

    def step(y: torch.Tensor, i: int, hist: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
        """x at times[i + 1] from x = y at times[i] with the polynomial through ``hist``."""
        h = lams[i + 1] - lams[i]
        w = weights([(lam - lams[i]) / h for lam, _ in hist], h, c).tolist()
        ratio = sigmas[i + 1] / sigmas[i]
        out = (ratio * (math.exp(-h) if stochastic else 1.0)) * y
        out = out + alphas[i + 1] * sum(wj * m for wj, (_, m) in zip(w, hist))
        return out

    n = steps - 1  # solver steps between the grid times
    hist = [(lams[0], data_pred(x, 0))]
    for i in range(n):
        p = min(order, i + 1, n - i) if steps < LOWER_ORDER_FINAL_BELOW else min(order, i + 1)
        x_new = step(x, i, hist[-p:])
        if stochastic:
            std = sigmas[i + 1] * math.sqrt(-math.expm1(-2.0 * (lams[i + 1] - lams[i])))
            x_new = x_new + std * randn_like(x, generator)
        last = i == n - 1
        if last and not denoise:
            x = x_new
            record(i, times[i + 1], x)
            break
        m_new = data_pred(x_new, i + 1)
        if corrector and not last:
            x_new = step(x, i, hist[-p:] + [(lams[i + 1], m_new)])  # UniC: one more node, no new NFE
        x = x_new
        hist.append((lams[i + 1], m_new))
        hist = hist[-order:]
        record(i, times[i + 1], x)
    if denoise:
        return hist[-1][1]
    return x


def dpm2m(score, sde, x, *, steps, eps, generator, denoise, record, grid: str = "logsnr", rho: float = 7.0):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2; the "lu" form)."""
    return exp_multistep(score, sde, x, steps=steps, eps=eps, generator=generator, denoise=denoise,
                         record=record, order=2, grid=grid, rho=rho, form="lu")


def dpm3m(score, sde, x, *, steps, eps, generator, denoise, record, grid: str = "logsnr", rho: float = 7.0):
    """DPM-Solver++(3M) as the third-order exact-kernel multistep step (module doc: not the code's form)."""
    return exp_multistep(score, sde, x, steps=steps, eps=eps, generator=generator, denoise=denoise,
                         record=record, order=3, grid=grid, rho=rho)


def dpm_sde(score, sde, x, *, steps, eps, generator, denoise, record, grid: str = "logsnr", rho: float = 7.0):
    """SDE-DPM-Solver++(2M): the reverse-SDE step of Lu et al.'s code (midpoint, the "lu" form with c = 2)."""
    return exp_multistep(score, sde, x, steps=steps, eps=eps, generator=generator, denoise=denoise,
                         record=record, order=2, stochastic=True, grid=grid, rho=rho, form="lu")


def unipc(score, sde, x, *, steps, eps, generator, denoise, record, order: int = 2, grid: str = "logsnr",
          rho: float = 7.0):
    """UniPC (Zhao et al. 2023): UniP-``order`` predictor + UniC corrector (order + 1), NFE = steps."""
    return exp_multistep(score, sde, x, steps=steps, eps=eps, generator=generator, denoise=denoise,
                         record=record, order=order, corrector=True, grid=grid, rho=rho)
