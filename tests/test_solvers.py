"""Time grids, exponential-integrator solvers (DDIM, DPM-Solver++, UniPC) and the adaptive rk45
ODE solver against closed forms: Gaussian data has an exact, linear probability-flow map, so
convergence orders are log-log slopes of the error against the exact solution."""

from __future__ import annotations

import math

import pytest
import torch

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.samplers import karras_sigmas, make_grid
from sgm_lightning.samplers.common import CountingScore, Recorder
from sgm_lightning.samplers.exponential import exp_multistep, lu_weights, node_weights
from sgm_lightning.sampling import sample
from sgm_lightning.sde import SubVPSDE, VESDE, VPSDE

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=10.0),
        "cosine": VPSDE(schedule="cosine")}
MU, C = torch.tensor([0.7, -0.7], dtype=torch.float64), 0.3
GAUSS = GaussianMixture([1.0], [MU.tolist()], C)
MIX = GaussianMixture([0.2, 0.8], [[-1.5, 0.5], [1.0, -0.5]],
                      [[[0.05, 0.0], [0.0, 0.05]], [[0.12, 0.03], [0.03, 0.08]]])


# ------------------------------------------------------------------ grids
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("grid", ["uniform", "logsnr", "karras"])
def test_grids_end_points_and_monotone(sde_name, grid):
    sde = SDES[sde_name]
    eps = sde.default_eps
    t = make_grid(grid, sde, eps, 12)
    assert t.dtype == torch.float64 and t.shape == (12,)
    assert t[0] == sde.T and t[-1] == eps and (t[1:] < t[:-1]).all()


@pytest.mark.parametrize("sde_name", ["vp", "cosine", "ve"])
def test_logsnr_and_karras_grids_are_what_they_say(sde_name):
    sde = SDES[sde_name]
    eps = sde.default_eps
    t = make_grid("logsnr", sde, eps, 9)
    a, s = sde.marginal_coeffs(t)
    lam = torch.log(a / s)
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(8), rtol=1e-6, atol=0.0)
    t = make_grid("karras", sde, eps, 9, rho=7.0)
    n = sde.noise_to_signal(t)
    torch.testing.assert_close(n, karras_sigmas(float(n[0]), float(n[-1]), 9, 7.0)[:-1], rtol=1e-6, atol=0.0)


def test_default_grids_keep_the_classic_samplers():
    """ddpm's default grid is the discrete DDPM grid; heun's default is Karras; ald's logsnr: the
    grid option with the per-method default gives the same samples as naming it."""
    sde = SDES["vp"]
    fn = MIX.score_fn(sde)
    calls = []
    sample(fn, sde, (4, 2), "ddpm", steps=10, callback=lambda i, t, x: calls.append(t))
    torch.testing.assert_close(torch.tensor(calls[:-1], dtype=torch.float64),
                               sde.discrete_times(10).flip(0)[1:], rtol=1e-12, atol=1e-12)
    for method, grid, kw in (("heun", "karras", {}), ("ald", "logsnr", {"steps_per_level": 2}),
                             ("pc", "uniform", {}), ("ddim", "uniform", {}), ("unipc", "logsnr", {})):
        a, b = (sample(fn, sde, (4, 2), method, steps=5, generator=torch.Generator().manual_seed(0), **kw, **g).samples
                for g in ({}, {"grid": grid}))
        assert torch.equal(a, b), method
        c = sample(fn, sde, (4, 2), method, steps=5, generator=torch.Generator().manual_seed(0), **kw,
                   grid="uniform" if grid != "uniform" else "karras").samples
        assert not torch.equal(a, c), method


# ------------------------------------------------------------------ exponential integrators
def test_node_weights_integrate_polynomials_exactly():
    """sum_j w_j P(r_j h) = int_0^h e^{-(h-u)} P(u) du for every polynomial of degree < #nodes."""
    h = 0.7
    w = node_weights([0.0, -0.6, -1.5], h)
    for k, exact in ((0, 1 - math.exp(-h)), (1, h - 1 + math.exp(-h)), (2, h * h - 2 * h + 2 - 2 * math.exp(-h))):
        got = sum(float(wj) * (r * h) ** k for wj, r in zip(w, [0.0, -0.6, -1.5]))
        assert abs(got - exact) < 1e-12, (k, got, exact)


def _exact_flow(sde, x_T, t_end):
    """The probability-flow map of N(MU, C I) data from T to t_end (linear, closed form)."""
    a0, s0 = (float(v) for v in sde.marginal_coeffs(torch.tensor(sde.T, dtype=torch.float64)))
    a1, s1 = (float(v) for v in sde.marginal_coeffs(torch.tensor(t_end, dtype=torch.float64)))
    return a1 * MU + math.sqrt((a1**2 * C + s1**2) / (a0**2 * C + s0**2)) * (x_T - a0 * MU)


ORDERS = [("ddim", {}, 1), ("dpm2m", {}, 2), ("dpm3m", {}, 3), ("unipc", {"order": 1}, 2), ("unipc", {}, 3)]


@pytest.mark.parametrize("sde_name", ["vp", "cosine", "subvp", "ve"])
@pytest.mark.parametrize("method,opts,order", ORDERS)
def test_convergence_order(sde_name, method, opts, order):
    """Error at eps against the exact PF-ODE solution: log2(e(n) / e(2n)) >= order - 0.3 (n = 32), and
    the same over 16 -> 64.

    On VE / sub-VP dpm3m's lower-order first steps (their data prediction already varies at t = T)
    flatten the error between 32 and 64 steps at ~1e-5, so there only the 16 -> 64 slope is held to
    its order."""
    warmup_floor = method == "dpm3m" and sde_name in ("ve", "subvp")
    sde = SDES[sde_name]
    fn = GAUSS.score_fn(sde)
    x_T = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _exact_flow(sde, x_T, sde.default_eps)
    errs = [(sample(fn, sde, (32, 2), method, steps=n, x_T=x_T, dtype=torch.float64, denoise=False,
                    **opts).samples - exact).abs().max().item() for n in (16, 32, 64)]
    slope = math.log2(errs[1] / errs[2])
    assert warmup_floor or slope >= order - 0.3, (errs, slope)
    assert math.log2(errs[0] / errs[2]) / 2 >= order - 0.3, errs


@pytest.mark.parametrize("method,order", [("dpm2m", 2), ("dpm3m", 3)])
@pytest.mark.parametrize("sde_name", ["vp", "cosine", "subvp", "ve"])
def test_convergence_order_on_the_mixture(sde_name, method, order):
    """Non-Gaussian data (the exact-score 2-D mixture): error at eps against a tight adaptive solve
    (rtol = atol = 1e-11), log2(e(64) / e(128)) >= order - 0.3 (measured 1.8-1.9 for 2M, 3.0-3.2 for 3M;
    Lu et al.'s code form of 3M gives ~2 here)."""
    sde = SDES[sde_name]
    fn = MIX.score_fn(sde)
    x_T = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(fn, sde, (32, 2), "ode", x_T=x_T, dtype=torch.float64, denoise=False, rtol=1e-11, atol=1e-11).samples
    e64, e128 = ((sample(fn, sde, (32, 2), method, steps=n, x_T=x_T, dtype=torch.float64, denoise=False).samples
                  - ref).abs().max().item() for n in (64, 128))
    assert math.log2(e64 / e128) >= order - 0.3, (e64, e128)


def _linear_x0(sde):
    """A score whose data prediction is x0_hat(x, t) = x / 2 + t (linear in x, varying in t)."""
    def score(x, t):
        a, s = (c.to(x.dtype)[:, None] for c in sde.marginal_coeffs(t.double()))
        return (a * (0.5 * x + t[:, None]) - x) / (s * s)
    return score


def _coeffs(sde, steps):
    times = make_grid("logsnr", sde, sde.default_eps, steps)
    a, s = sde.marginal_coeffs(times)
    return times.tolist(), a.tolist(), s.tolist(), torch.log(a / s).tolist()


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_dpm2m_step_is_lu_alg2(sde_name):
    """The second step of dpm2m (steps = 4: DDIM, 2M, then the lower-order final step) is Lu et al.
    2022b's Alg. 2 by hand: D = (1 + 1/(2r)) x0_1 - 1/(2r) x0_0, x_2 = (s_2/s_1) x_1 - a_2 (e^{-h} - 1) D;
    the exact-kernel step (weight J_1 = 1 - (1 - e^{-h}) / h on (x0_1 - x0_0) / r) differs."""
    sde = SDES[sde_name]
    t, a, s, lam = _coeffs(sde, 4)
    x0 = sde.prior_sampling((5, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = {}
    sample(_linear_x0(sde), sde, (5, 2), "dpm2m", steps=4, x_T=x0, denoise=False,
           callback=lambda i, tt, x: seen.setdefault(i, x.clone()))
    m0 = 0.5 * x0 + t[0]
    h1, h2 = lam[1] - lam[0], lam[2] - lam[1]
    x1 = s[1] / s[0] * x0 - a[1] * math.expm1(-h1) * m0
    torch.testing.assert_close(seen[0], x1, rtol=1e-10, atol=1e-10)  # DDIM
    m1 = 0.5 * x1 + t[1]
    r = h1 / h2
    D = (1 + 1 / (2 * r)) * m1 - 1 / (2 * r) * m0
    x2 = s[2] / s[1] * x1 - a[2] * math.expm1(-h2) * D
    torch.testing.assert_close(seen[1], x2, rtol=1e-10, atol=1e-10)
    kernel = s[2] / s[1] * x1 - a[2] * math.expm1(-h2) * m1 + a[2] * (1 + math.expm1(-h2) / h2) * (m1 - m0) / r
    assert (seen[1] - kernel).abs().max() > 1e-3
    # the weights themselves: Alg. 2's on two nodes, J_0 = 1 - e^{-h} on one
    w = lu_weights([-r, 0.0], h2).tolist()
    j0 = -math.expm1(-h2)
    assert w == pytest.approx([-j0 / (2 * r), j0 * (1 + 1 / (2 * r))], rel=1e-14)
    assert lu_weights([0.0], h2).tolist() == pytest.approx(node_weights([0.0], h2).tolist(), rel=1e-14)


def test_lu_third_order_weights_are_the_code_form():
    """lu_weights on three nodes = J_0 m_0 + phi_2 D1 - phi_3 D2 of Lu et al.'s multistep third-order
    update (kept for benchmarks/samplers.py --forms; dpm3m uses the exact-kernel weights)."""
    h, r0, r1 = 0.45, 0.8, 1.3
    m = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # m_2, m_1, m_0
    d0, d1 = (m[2] - m[1]) / r0, (m[1] - m[0]) / r1
    D1, D2 = d0 + r0 / (r0 + r1) * (d0 - d1), (d0 - d1) / (r0 + r1)
    phi2 = math.expm1(-h) / h + 1
    ref = -math.expm1(-h) * m[2] + phi2 * D1 - (phi2 / h - 0.5) * D2
    got = (lu_weights([-(r0 + r1), -r0, 0.0], h) * m).sum()
    assert abs(got - ref) < 1e-14
    assert not torch.allclose(lu_weights([-(r0 + r1), -r0, 0.0], h), node_weights([-(r0 + r1), -r0, 0.0], h))
    sde = SDES["vp"]
    with pytest.raises(ValueError, match="form"):  # UniC's extra node has no 'lu' weights
        exp_multistep(CountingScore(GAUSS.score_fn(sde)), sde, torch.zeros(2, 2), steps=5, eps=None, generator=None,
                      denoise=False, record=Recorder(), order=3, corrector=True, form="lu")


def test_dpm_sde_step_is_the_midpoint_form():
    """dpm_sde's second step (steps = 4) by hand: x_2 = (s_2/s_1) e^{-h} x_1 + a_2 (1 - e^{-2h})
    (x0_1 + (x0_1 - x0_0) / (2r)) + s_2 sqrt(1 - e^{-2h}) z_2, the noises drawn in step order."""
    sde = SDES["vp"]
    t, a, s, lam = _coeffs(sde, 4)
    x0 = sde.prior_sampling((5, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = {}
    sample(_linear_x0(sde), sde, (5, 2), "dpm_sde", steps=4, x_T=x0, denoise=False,
           generator=torch.Generator().manual_seed(7), callback=lambda i, tt, x: seen.setdefault(i, x.clone()))
    g = torch.Generator().manual_seed(7)
    z1, z2 = (torch.randn((5, 2), generator=g, dtype=torch.float64) for _ in range(2))
    h1, h2 = lam[1] - lam[0], lam[2] - lam[1]
    m0 = 0.5 * x0 + t[0]
    x1 = (s[1] / s[0] * math.exp(-h1) * x0 - a[1] * math.expm1(-2 * h1) * m0
          + s[1] * math.sqrt(-math.expm1(-2 * h1)) * z1)
    torch.testing.assert_close(seen[0], x1, rtol=1e-10, atol=1e-10)
    m1 = 0.5 * x1 + t[1]
    r = h1 / h2
    x2 = (s[2] / s[1] * math.exp(-h2) * x1 - a[2] * math.expm1(-2 * h2) * (m1 + (m1 - m0) / (2 * r))
          + s[2] * math.sqrt(-math.expm1(-2 * h2)) * z2)
    torch.testing.assert_close(seen[1], x2, rtol=1e-10, atol=1e-10)


def test_ddim_is_the_first_order_exponential_integrator():
    sde = SDES["vp"]
    fn = MIX.score_fn(sde)
    x_T = sde.prior_sampling((64, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = sample(fn, sde, (64, 2), "ddim", steps=12, x_T=x_T, dtype=torch.float64).samples
    b = exp_multistep(CountingScore(fn), sde, x_T, steps=12, eps=None, generator=None, denoise=True,
                      record=Recorder(), order=1, grid="uniform")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float64; 1/alpha_T ~ 150 amplifies round-off


def _energy(x, y):
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_ten_nfe_close_to_adaptive_ode(sde_name):
    """At 10 NFE the multistep solvers reproduce the mixture's mode weights, and their samples are
    close in distribution to the adaptive ODE's (~100 NFE) from the same x_T: energy distance to the
    ODE samples at most half of DDIM's at 10 NFE."""
    sde = SDES[sde_name]
    fn = MIX.score_fn(sde)
    x_T = sde.prior_sampling((1500, 2), generator=torch.Generator().manual_seed(3))
    run = lambda m, s: sample(fn, sde, (1500, 2), m, steps=s, x_T=x_T)
    ref = run("ode", None).samples
    e_ddim = _energy(run("ddim", 10).samples, ref)
    for method in ("dpm2m", "dpm3m", "unipc"):
        res = run(method, 10)
        assert res.nfe == 10
        w = MIX.responsibilities(res.samples).argmax(1).double().mean().item()
        assert abs(w - 0.8) < 0.035, (method, w)
        e = _energy(res.samples, ref)
        assert e < 0.5 * e_ddim, (method, e, e_ddim)


def test_dpm_sde_reproduces_the_mixture():
    sde = SDES["vp"]
    res = sample(MIX.score_fn(sde), sde, (1500, 2), "dpm_sde", steps=30, generator=torch.Generator().manual_seed(3))
    w = MIX.responsibilities(res.samples).argmax(1).double().mean().item()
    data = MIX.sample(1500, generator=torch.Generator().manual_seed(9)).float()
    assert abs(w - 0.8) < 0.04 and _energy(res.samples, data) < 0.01


class _ClassOracle:
    """Class-conditional exact scores: y = k -> component k of a well-separated mixture, y = 2 -> the mixture."""

    MEANS = [[-2.0, 0.0], [2.0, 1.0]]

    def __init__(self, sde):
        self.sde = sde
        self.mix = GaussianMixture([0.7, 0.3], self.MEANS, [0.25, 0.25])
        self.comps = [GaussianMixture([1.0], [m], [0.25]) for m in self.MEANS]

    def score(self, x, t, y):
        out = self.mix.score(x, self.sde, t)
        for k, comp in enumerate(self.comps):
            sel = y == k
            if sel.any():
                out[sel] = comp.score(x[sel], self.sde, t[sel])
        return out


@pytest.mark.parametrize("method", ["dpm2m", "unipc"])
def test_classifier_free_guidance_on_images(method):
    """CFG (scale 1 = the conditional score) with image-shaped data (B, 1, 1, 2): all samples land in mode k."""
    from sgm_lightning.guidance import cfg_score_fn

    sde = SDES["vp"]
    oracle = _ClassOracle(sde)
    guided = cfg_score_fn(oracle, 1, scale=3.0, null_label=2)

    def img_score(x, t):
        return guided(x.reshape(x.shape[0], 2), t).reshape(x.shape)

    res = sample(img_score, sde, (300, 1, 1, 2), method, steps=10, generator=torch.Generator().manual_seed(0))
    assert res.samples.shape == (300, 1, 1, 2) and torch.isfinite(res.samples).all()
    mode = oracle.mix.responsibilities(res.samples.reshape(300, 2)).argmax(1)
    assert (mode == 1).double().mean() >= 0.97


# ------------------------------------------------------------------ adaptive ODE (rk45)
def test_rk45_needs_no_more_nfe_than_scipy_and_is_accurate():
    """Same problem, same rtol = atol = 1e-5: NFE of "rk45" (+1 Tweedie step) <= scipy's RK45."""
    from scipy.integrate import solve_ivp

    sde = SDES["vp"]
    fn = MIX.score_fn(sde)
    x_T = sde.prior_sampling((300, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sample(fn, sde, (300, 2), "ode", x_T=x_T, dtype=torch.float64, denoise=False)
    rsde = sde.reverse(fn, probability_flow=True)

    def f(t, y):
        yt = torch.from_numpy(y).reshape(300, 2)
        return rsde.sde(yt, torch.full((300,), t, dtype=torch.float64))[0].reshape(-1).numpy()

    ref = solve_ivp(f, (sde.T, sde.default_eps), x_T.reshape(-1).numpy(), method="RK45", rtol=1e-5, atol=1e-5)
    assert ours.nfe <= ref.nfev, (ours.nfe, ref.nfev)
    ref_y = torch.from_numpy(ref.y[:, -1]).reshape(300, 2)
    assert (ours.samples - ref_y).abs().max() < 1e-3
    # Gaussian data: the exact flow
    fn = GAUSS.score_fn(sde)
    res = sample(fn, sde, (32, 2), "ode", x_T=x_T[:32], dtype=torch.float64, denoise=False, rtol=1e-8, atol=1e-8)
    assert (res.samples - _exact_flow(sde, x_T[:32], sde.default_eps)).abs().max() < 1e-5


def test_rk45_step_size_collapse_is_a_clear_error():
    """y' = y^2, y(0) = 1 blows up at t = 1 (and a singular drift): the controller shrinks the step to
    the time resolution and stops with an error instead of looping."""
    from sgm_lightning.samplers.dopri import StepSizeUnderflow, dopri5

    with pytest.raises(StepSizeUnderflow, match="underflow"):
        dopri5(lambda t, y: y * y, torch.ones(3, dtype=torch.float64), 0.0, 2.0, 1e-6, 1e-6)
    with pytest.raises(StepSizeUnderflow, match="underflow"):  # a non-integrable singularity at t = 0.5
        dopri5(lambda t, y: torch.full_like(y, 1.0 / (t - 0.5) ** 2), torch.zeros(3, dtype=torch.float64),
               0.0, 1.0, 1e-6, 1e-6)
    y = dopri5(lambda t, y: -y, torch.ones(3, dtype=torch.float64), 0.0, 2.0, 1e-8, 1e-8)  # and a smooth one
    torch.testing.assert_close(y, torch.full((3,), math.exp(-2.0), dtype=torch.float64), rtol=1e-7, atol=0.0)
