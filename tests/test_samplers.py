"""Samplers against exact scores: Gaussian mixtures diffused by VP / sub-VP / VE have closed-form scores
(``analytic.GaussianMixture``), so every sampler must reproduce the data distribution up to
discretization error and Monte-Carlo noise. Tolerances are stated in units of the Monte-Carlo
standard error of the sample size used."""

from __future__ import annotations


import pytest
import torch
from conftest import make_sdes

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.samplers import METHODS, karras_sigmas, langevin
from sgm_lightning.sampling import sample
from sgm_lightning.sde import VESDE


# VE with sigma_max = 10: the step counts below reach the tolerances within the time budget
SDES = make_sdes(ve_sigma_max=10.0)
# unequal weights, separated modes, one anisotropic component
MIX = GaussianMixture([0.2, 0.8], [[-1.5, 0.5], [1.0, -0.5]],
                      [[[0.05, 0.0], [0.0, 0.05]], [[0.12, 0.03], [0.03, 0.08]]])
# method -> (steps, options, mode-weight tolerance); step counts chosen for the 60 s budget
CONFIGS = {
    "pc": (60, {}, 0.05),
    "pc_ancestral": (60, {"predictor": "ancestral", "corrector": "none"}, 0.05),
    "ddpm": (60, {}, 0.05),
    "ddim": (40, {}, 0.05),
    "ode": (None, {"rtol": 1e-4, "atol": 1e-4}, 0.05),
    "heun": (18, {}, 0.05),
    # few-step exponential integrators at 10 NFE (DDIM at 10 NFE misses by ~0.04-0.06 on VP)
    "dpm2m": (10, {}, 0.04),
    "dpm3m": (10, {}, 0.04),
    "unipc": (10, {}, 0.04),
    # ALD is approximate (levels never fully equilibrate: measured weight bias 0.01-0.05, variance +10-20%)
    "ald": (30, {"steps_per_level": 20}, 0.07),
}
N = 1000
# sub-VP's log-SNR range is ~1.5x VP's (sigma ~ beta t near 0): at 10 NFE its steps are too long for the
# narrow mode (covariance +20-40 %), so the few-step solvers get 20 steps there
SUBVP_STEPS = {"dpm2m": 20, "dpm3m": 20, "unipc": 20}


def energy_distance_pvalue(x: torch.Tensor, y: torch.Tensor, n_perm: int = 100, seed: int = 0) -> float:
    """Permutation p-value of the energy distance (Szekely & Rizzo 2004) between two samples."""
    z = torch.cat([x, y]).double()
    d = torch.cdist(z, z)
    n = x.shape[0]

    def stat(idx):
        a, b = idx[:n], idx[n:]
        return 2 * d[a][:, b].mean() - d[a][:, a].mean() - d[b][:, b].mean()

    g = torch.Generator().manual_seed(seed)
    obs = stat(torch.arange(z.shape[0]))
    perms = [stat(torch.randperm(z.shape[0], generator=g)) for _ in range(n_perm)]
    return (1 + sum(float(p >= obs) for p in perms)) / (1 + n_perm)


def _check_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, z: float = 5.0):
    """Mean and covariance within z Monte-Carlo standard errors (Gaussian approximation of the SEs)."""
    n = x.shape[0]
    x = x.reshape(n, -1).double()
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean).abs() <= z * se_mean).all(), (x.mean(0), mean)
    var = cov.diagonal()
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    err = (torch.cov(x.T) - cov).abs()
    assert (err <= z * se_cov + 0.02 * var.max()).all(), (torch.cov(x.T), cov)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_mixture_reproduced(sde_name, config):
    sde = SDES[sde_name]
    steps, opts, w_tol = CONFIGS[config]
    method = config.split("_")[0]
    if sde_name == "subvp":
        steps = SUBVP_STEPS.get(method, steps)
    g = torch.Generator().manual_seed(1)
    res = sample(MIX.score_fn(sde), sde, (N, 2), method, steps=steps, generator=g, **opts)
    x = res.samples
    assert x.shape == (N, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # mode weights by responsibilities: binomial SE sqrt(0.16 / 1000) = 0.013 (tolerance ~4 SE)
    w = MIX.responsibilities(x).argmax(1).double().mean().item()
    assert abs(w - 0.8) < w_tol, w
    if method == "ald":
        assert (x.mean(0).double() - MIX.mean()).abs().max() < 0.2
        return
    _check_moments(x, MIX.mean(), MIX.covariance())
    # two-sample test against fresh data (500 vs 500): not rejected at the 1% level
    data = MIX.sample(500, generator=torch.Generator().manual_seed(2))
    assert energy_distance_pvalue(x[:500], data) > 0.01


def test_energy_distance_detects_wrong_weights():
    """The two-sample statistic used above has power: equal weights instead of 0.2 / 0.8 are rejected."""
    wrong = GaussianMixture([0.5, 0.5], MIX.means, MIX.covs)
    x = wrong.sample(500, generator=torch.Generator().manual_seed(3))
    data = MIX.sample(500, generator=torch.Generator().manual_seed(2))
    assert energy_distance_pvalue(x, data) < 0.01


IMG_MEAN = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64)
_A = torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.15
IMG_COV = _A @ _A.T + 0.05 * torch.eye(16, dtype=torch.float64)
IMG = GaussianMixture([1.0], IMG_MEAN[None], IMG_COV[None], event_shape=(1, 4, 4))


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("method,steps,opts", [("pc", 100, {}), ("ddpm", 100, {}), ("ddim", 50, {}),
                                               ("ode", None, {"rtol": 1e-4, "atol": 1e-4}), ("heun", 18, {}),
                                               ("ald", 30, {"steps_per_level": 20}), ("unipc", 20, {}),
                                               ("dpm3m", 20, {}), ("sde", 100, {"solver": "euler"})])
def test_image_shaped_gaussian(sde_name, method, steps, opts):
    sde = SDES[sde_name]
    res = sample(IMG.score_fn(sde), sde, (1000, 1, 4, 4), method, steps=steps,
                 generator=torch.Generator().manual_seed(4), **opts)
    assert res.samples.shape == (1000, 1, 4, 4)
    if method == "ald":  # approximate (unadjusted Langevin inflates variance; measured 20-30 %)
        x = res.samples.reshape(1000, -1).double()
        assert (x.mean(0) - IMG_MEAN).abs().max() < 0.1
        assert (torch.cov(x.T) - IMG_COV).abs().max() < 0.4 * IMG_COV.diagonal().max()
        return
    _check_moments(res.samples, IMG_MEAN, IMG_COV)


def _pf_ode_map(x_T, sde, t_end):
    """Exact probability-flow map for Gaussian data N(mu, S): x_t = alpha_t mu + C_t^{1/2} C_T^{-1/2} (x_T - alpha_T mu),
    C_t = alpha_t^2 S + sigma_t^2 I (all marginals share S's eigenvectors, the flow is this linear map)."""
    lam, U = torch.linalg.eigh(IMG_COV)

    def coeffs(t):
        a, s = (float(c) for c in sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64)))
        return a, (a * a * lam + s * s).sqrt()

    a_T, c_T = coeffs(sde.T)
    a_e, c_e = coeffs(t_end)
    z = (x_T.reshape(x_T.shape[0], -1).double() - a_T * IMG_MEAN) @ U / c_T
    x = a_e * IMG_MEAN + (z * c_e) @ U.T
    return x


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_deterministic_samplers_follow_exact_flow(sde_name):
    """ode / heun / ddim(eta=0) map x_T to the exact probability-flow solution (then Tweedie at eps)."""
    sde = SDES[sde_name]
    eps = sde.default_eps
    x_T = sde.prior_sampling((64, 1, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_eps = _pf_ode_map(x_T, sde, eps).reshape(x_T.shape)
    t = torch.full((64,), eps, dtype=torch.float64)
    alpha, sigma = (float(c) for c in sde.marginal_coeffs(torch.tensor(eps, dtype=torch.float64)))
    target = (x_eps + sigma**2 * IMG.score(x_eps, sde, t)) / alpha
    scale = IMG_COV.diagonal().sqrt().max()

    def err(method, steps, **opts):
        res = sample(IMG.score_fn(sde), sde, x_T.shape, method, steps=steps, x_T=x_T, dtype=torch.float64, **opts)
        return (res.samples - target).abs().max().item() / scale

    assert err("ode", None, rtol=1e-7, atol=1e-7) < 1e-4
    assert err("ode", 200, solver="rk4") < 1e-4
    assert err("ddim", 400) < 2e-2
    e40, e80 = err("heun", 40), err("heun", 80)
    assert e40 < 0.05 and e80 < 0.3 * e40, (e40, e80)  # second order: halving the step quarters the error


def test_nfe_counts():
    sde = SDES["vp"]
    calls = []

    def score(x, t):
        calls.append(1)
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        return MIX.score(x, sde, t)

    g = torch.Generator().manual_seed(0)
    cases = [("pc", 7, {"corrector_steps": 2}, 21), ("pc", 7, {"corrector": "none"}, 7),
             ("pc", 7, {"predictor": "none"}, 7), ("ddpm", 7, {}, 7), ("ddim", 7, {"eta": 0.5}, 7),
             ("heun", 5, {}, 9), ("heun", 5, {"denoise": False}, 8), ("ald", 3, {"steps_per_level": 4}, 13),
             ("ald", 3, {"steps_per_level": 4, "denoise": False}, 12), ("ode", 10, {"solver": "euler"}, 11),
             ("ode", 10, {"solver": "rk4"}, 41), ("ode", 10, {"solver": "midpoint", "denoise": False}, 20),
             ("dpm2m", 6, {}, 6), ("dpm3m", 6, {"denoise": False}, 5), ("unipc", 6, {}, 6), ("dpm_sde", 6, {}, 6),
             ("pc", 4, {"corrector": "hmc", "hmc_leapfrog": 2}, 16), ("sde", 10, {"solver": "euler"}, 11),
             ("sde", 5, {"solver": "srk"}, 21)]
    for method, steps, opts, nfe in cases:
        calls.clear()
        res = sample(score, sde, (8, 2), method, steps=steps, generator=g, **opts)
        assert res.nfe == nfe == len(calls), (method, opts, res.nfe, len(calls))
    calls.clear()
    res = sample(score, sde, (8, 2), "ode", generator=g)
    assert res.nfe == len(calls) > 10  # adaptive: every evaluation counted, incl. the Tweedie step


@pytest.mark.parametrize("method", METHODS)
def test_seeded_and_shapes(method):
    sde = SDES["ve"]
    fn = IMG.score_fn(sde)
    kw = {"steps": 5} if method != "ald" else {"steps": 3, "steps_per_level": 3}
    runs = [sample(fn, sde, (6, 1, 4, 4), method, generator=torch.Generator().manual_seed(s), **kw).samples
            for s in (7, 7, 8)]
    assert runs[0].shape == (6, 1, 4, 4)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_ddim_eta1_is_ddpm():
    """DDIM with eta = 1 is the DDPM posterior step (Song, Meng & Ermon 2021, Eq. 16): same noise, same samples."""
    sde = SDES["vp"]
    fn = MIX.score_fn(sde)
    a = sample(fn, sde, (64, 2), "ddpm", steps=20, eps=1e-3, generator=torch.Generator().manual_seed(3),
               dtype=torch.float64).samples
    b = sample(fn, sde, (64, 2), "ddim", steps=20, eps=1e-3, eta=1.0, generator=torch.Generator().manual_seed(3),
               dtype=torch.float64).samples
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # float64; 1/alpha_T ~ 150 amplifies round-off


def test_trajectory_and_callback():
    sde = SDES["vp"]
    seen = []
    res = sample(MIX.score_fn(sde), sde, (4, 2), "ddpm", steps=6, return_trajectory=True,
                 callback=lambda i, t, x: seen.append((i, t)), generator=torch.Generator().manual_seed(0))
    assert len(res.trajectory) == 6 and [i for i, _ in seen] == list(range(6))
    assert seen[-1][1] == 0.0 and all(a[1] > b[1] for a, b in zip(seen, seen[1:]))
    assert torch.equal(res.trajectory[-1], res.samples)
    assert sample(MIX.score_fn(sde), sde, (4, 2), "heun", steps=3).trajectory is None


def test_karras_grid():
    s = karras_sigmas(80.0, 0.002, 18, rho=7.0)
    assert s.shape == (19,) and s[-1] == 0
    torch.testing.assert_close(s[[0, 17]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    i = 5
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert abs(float(s[i]) - expect) < 1e-12 * expect
    assert (s[:-1][1:] < s[:-1][:-1]).all()


def test_classic_langevin_vs_annealed():
    """Song & Ermon 2019, Fig. 3: plain Langevin gets the weights of well-separated modes wrong
    (it keeps the initial split), annealed Langevin gets them right."""
    mix = GaussianMixture([0.2, 0.8], [[-5.0, -5.0], [5.0, 5.0]], 1.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1000, 2, generator=g) * 16 - 8  # uniform on [-8, 8]^2: half starts near each mode
    x = langevin(lambda v: mix.score(v), x0, step_size=0.1, n_steps=500, generator=g)
    w_plain = mix.responsibilities(x).argmax(1).double().mean().item()
    assert abs(w_plain - 0.8) > 0.2, w_plain  # stuck near 0.5
    # ... yet each chain is at equilibrium within its mode: within-mode spread ~ 1
    assert abs(x[x[:, 0] > 0].std(0).mean().item() - 1.0) < 0.15
    sde = VESDE(sigma_min=0.1, sigma_max=20.0)
    res = sample(mix.score_fn(sde), sde, (1000, 2), "ald", steps=10, steps_per_level=50, generator=g)
    w_ald = mix.responsibilities(res.samples).argmax(1).double().mean().item()
    assert abs(w_ald - 0.8) < 0.05, w_ald  # binomial SE 0.013
