"""Every formula against its source, computed independently here (float64, closed forms or the
papers' algorithms written out step by step) or checked through a statistical property with the
exact Gaussian / mixture score (``analytic.GaussianMixture``).

Sources: Song et al. 2021 ("Score-based generative modeling through SDEs", Eq. 30-34, 46-47, Alg. 2-5),
Song & Ermon 2019 (NCSN, Alg. 1), Ho et al. 2020 (DDPM, Eq. 6-7, Alg. 2), Nichol & Dhariwal 2021
(Eq. 17), Song, Meng & Ermon 2021 (DDIM, Eq. 12, 16), Karras et al. 2022 (EDM, Table 1, Alg. 2).
"""

import math

import pytest
import torch
from torch import nn

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.losses import DSMLoss, EDMLoss
from sgm_lightning.parametrization import ScoreModel
from sgm_lightning.samplers.ancestral import posterior_coeffs
from sgm_lightning.samplers.common import CountingScore
from sgm_lightning.samplers.pc import langevin_correct, predict
from sgm_lightning.sampling import sample
from sgm_lightning.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64
TIMES = (0.0, 1e-3, 0.3, 0.5, 1.0)
M0, V0 = 0.7, 0.3**2  # 1-D Gaussian data N(M0, V0)
GAUSS = GaussianMixture([1.0], [[M0]], V0)


def _t(*v):
    return torch.tensor(v, dtype=F64)


# --------------------------------------------------------------------------- forward processes
def test_marginals_and_diffusions_are_the_papers_closed_forms():
    """Song et al. 2021, Eq. 30-34 (App. B) and Nichol & Dhariwal 2021, Eq. 17, written out."""
    t = _t(*TIMES)
    bmin, bmax = 0.1, 20.0
    integral = 0.5 * t**2 * (bmax - bmin) + t * bmin  # int_0^t beta
    beta = bmin + t * (bmax - bmin)
    # VP (Eq. 32-33): mean e^{-int/2} x0, var 1 - e^{-int}, g = sqrt(beta)
    a, s = VPSDE().marginal_coeffs(t)
    f, g = VPSDE().drift_coeff_and_diffusion(t)
    torch.testing.assert_close(a, torch.exp(-0.5 * integral), rtol=1e-13, atol=0)
    torch.testing.assert_close(s[1:], torch.sqrt(1 - torch.exp(-integral))[1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(f, -0.5 * beta, rtol=1e-13, atol=0)
    torch.testing.assert_close(g, beta.sqrt(), rtol=1e-13, atol=0)
    # sub-VP (Eq. 34): std 1 - e^{-int}, g = sqrt(beta (1 - e^{-2 int}))
    a, s = SubVPSDE().marginal_coeffs(t)
    _, g = SubVPSDE().drift_coeff_and_diffusion(t)
    torch.testing.assert_close(a, torch.exp(-0.5 * integral), rtol=1e-13, atol=0)
    torch.testing.assert_close(s[1:], (1 - torch.exp(-integral))[1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(g, torch.sqrt(beta * (1 - torch.exp(-2 * integral))), rtol=1e-12, atol=0)
    # VE (Eq. 30-31): sigma_min (sigma_max / sigma_min)^t, g = sigma(t) sqrt(2 log(sigma_max / sigma_min))
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    a, s = ve.marginal_coeffs(t)
    f, g = ve.drift_coeff_and_diffusion(t)
    torch.testing.assert_close(a, torch.ones_like(t))
    torch.testing.assert_close(s, 0.01 * 5000.0**t, rtol=1e-13, atol=0)
    torch.testing.assert_close(f, torch.zeros_like(t))
    torch.testing.assert_close(g, 0.01 * 5000.0**t * math.sqrt(2 * math.log(5000.0)), rtol=1e-13, atol=0)
    # cosine (Nichol & Dhariwal, Eq. 17, on t' = 0.99 t): alpha_bar = f(t') / f(0), f = cos^2((t' + s)/(1 + s) pi/2)
    cos = VPSDE(schedule="cosine")
    fc = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    torch.testing.assert_close(cos.marginal_coeffs(t)[0] ** 2, fc(0.99 * t) / fc(torch.zeros(1, dtype=F64)),
                               rtol=1e-12, atol=1e-15)
    # beta(t) = -d log alpha_bar / dt = pi (1 - margin) / (1 + s) tan(phi(t))
    phi = (0.99 * t + 0.008) / 1.008 * math.pi / 2
    torch.testing.assert_close(cos.beta(t), math.pi * 0.99 / 1.008 * torch.tan(phi), rtol=1e-12, atol=0)
    # priors: N(0, I) for VP / sub-VP, N(0, sigma_max^2 I) for VE (Song et al. 2021, App. B)
    z = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for sde, std in ((VPSDE(), 1.0), (SubVPSDE(), 1.0), (ve, 50.0)):
        want = -0.5 * 4 * math.log(2 * math.pi * std**2) - (z**2).sum((1, 2)) / (2 * std**2)
        torch.testing.assert_close(sde.prior_logp(z), want, rtol=1e-13, atol=1e-12)


# --------------------------------------------------------------------------- one reverse step
def _marginal(sde, t):
    a, s = sde.marginal_coeffs(_t(t))
    return float(a * M0), float(a * a * V0 + s * s)


def _affine_step(kind, sde, t0, dt):
    """A predictor step on Gaussian data with the exact score is affine: y = A x + b + C z. Returns (A, b, C)."""
    score = CountingScore(GAUSS.score_fn(sde))
    x = torch.tensor([[0.0], [1.0]], dtype=F64)
    y, y_mean = predict(kind, sde, score, x, torch.full((2,), t0, dtype=F64), _t(dt), torch.Generator().manual_seed(0))
    z = torch.randn((2, 1), generator=torch.Generator().manual_seed(0), dtype=F64)
    b = y_mean[0, 0].item()
    return y_mean[1, 0].item() - b, b, ((y - y_mean) / z)[0, 0].item()


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("kind", ["reverse_diffusion", "euler_maruyama", "ancestral"])
def test_one_reverse_step_from_the_exact_marginal_has_local_error_dt_squared(sde, kind):
    """From x ~ p_t, one predictor step of size dt (Song et al. 2021, Eq. 46 / Eq. 6 / Eq. 47) gives
    the mean and variance of p_{t-dt} up to O(dt^2) (a consistent first-order scheme): halving dt divides
    the error by ~4 (a wrong drift or noise coefficient leaves an O(dt) error: ratio 2)."""
    for t0 in (0.05, 0.5, 1.0):
        errs = []
        for dt in (0.01, 0.005, 0.0025):
            mu, var = _marginal(sde, t0)
            mu1, var1 = _marginal(sde, t0 - dt)
            A, b, C = _affine_step(kind, sde, t0, dt)
            errs.append((abs(A * mu + b - mu1) / math.sqrt(var1), abs((A * A * var + C * C) / var1 - 1)))
        for j in range(2):  # mean, variance
            e = [err[j] for err in errs]
            if e[0] < 1e-10:  # exact (VE: the mean never moves; ancestral: E[x0 | x_t] is exact)
                assert max(e) < 1e-10
                continue
            assert e[0] < 0.2 and e[0] / e[1] > 3.0 and e[1] / e[2] > 3.0, (t0, j, e)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), VPSDE(schedule="cosine")],
                         ids=["vp", "subvp", "ve", "vp_cosine"])
def test_ancestral_step_misses_exactly_the_posterior_variance_of_x0(sde):
    """The exact reverse kernel is p(x_s | x_t) = int q(x_s | x_t, x0) p(x0 | x_t) dx0 = N(c_x x_t + c_x0 E[x0 | x_t],
    std^2 + c_x0^2 Var(x0 | x_t)); the ancestral step plugs in x0_hat = E[x0 | x_t] (Ho et al. 2020, Alg. 2), so on
    Gaussian data its output variance is that of p_s minus c_x0^2 Var(x0 | x_t), exactly, and its mean is exact."""
    for t0, s0 in ((0.5, 0.45), (0.9, 0.3), (0.02, 0.0)):
        A, b, C = _affine_step("ancestral", sde, t0, t0 - s0)
        mu, var = _marginal(sde, t0)
        mu1, var1 = _marginal(sde, s0)
        a_t, sig_t = (float(c) for c in sde.marginal_coeffs(_t(t0)))
        post_var_x0 = V0 * sig_t**2 / (a_t**2 * V0 + sig_t**2)  # Var(x0 | x_t) for Gaussian data
        _, c_x0, _ = posterior_coeffs(sde, _t(t0), _t(s0))
        assert abs(A * mu + b - mu1) < 1e-12
        assert abs(var1 - (A * A * var + C * C) - float(c_x0) ** 2 * post_var_x0) < 1e-12 * var1


def test_posterior_is_ho_eq7_and_smld_eq47():
    """q(x_{i-1} | x_i, x0): Ho et al. 2020, Eq. 7 on the discrete schedule (VP), Song et al. 2021, Eq. 47 (VE)."""
    sde, N = VPSDE(), 1000
    ab = sde.discrete_alphas_cumprod(N)
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    beta = 1 - ab / ab_prev
    t = sde.discrete_times(N)
    i = torch.tensor([1, 2, 10, 500, 999])  # t_i -> t_{i-1} (index 0 is t_1 -> t_0 = 0)
    c_x, c_x0, std = posterior_coeffs(sde, t[i], t[i] - 1.0 / N)
    torch.testing.assert_close(c_x0, ab_prev[i].sqrt() * beta[i] / (1 - ab[i]), rtol=1e-8, atol=0)
    torch.testing.assert_close(c_x, (1 - beta[i]).sqrt() * (1 - ab_prev[i]) / (1 - ab[i]), rtol=1e-8, atol=0)
    torch.testing.assert_close(std**2, (1 - ab_prev[i]) / (1 - ab[i]) * beta[i], rtol=1e-8, atol=0)  # beta_tilde
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    tt, ss = _t(0.2, 0.7, 1.0), _t(0.1, 0.6, 0.99)
    sig_t, sig_s = ve.sigma(tt), ve.sigma(ss)
    c_x, c_x0, std = posterior_coeffs(ve, tt, ss)
    # Eq. 47: x_{i-1} = x_i + (sig_i^2 - sig_{i-1}^2) s + sqrt(sig_{i-1}^2 (sig_i^2 - sig_{i-1}^2) / sig_i^2) z with
    # x0_hat = x_i + sig_i^2 s (Tweedie): c_x + c_x0 = 1 and c_x0 sig_i^2 = sig_i^2 - sig_{i-1}^2
    torch.testing.assert_close(c_x + c_x0, torch.ones_like(tt), rtol=1e-12, atol=0)
    torch.testing.assert_close(c_x0 * sig_t**2, sig_t**2 - sig_s**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(std**2, sig_s**2 * (sig_t**2 - sig_s**2) / sig_t**2, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- samplers vs the papers' algorithms
MIX = GaussianMixture([0.3, 0.7], [[0.7, -0.2], [-1.0, 0.5]], [0.09, 0.04])


def test_ddpm_sampler_is_ho_algorithm2():
    """Ho et al. 2020, Alg. 2 with sigma_t^2 = beta_tilde_t on the discrete schedule of ``steps`` steps,
    eps_theta = -sqrt(1 - alpha_bar) score, no noise at the last step; same noise draws."""
    sde, N, n = VPSDE(), 20, 5
    ab = sde.discrete_alphas_cumprod(N)
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    beta = 1 - ab / ab_prev
    ts = sde.discrete_times(N)
    x_T = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    g, x = torch.Generator().manual_seed(5), x_T.clone()
    for i in range(N - 1, -1, -1):
        eps = -math.sqrt(1 - ab[i]) * MIX.score(x, sde, ts[i].expand(n))
        z = torch.randn(x.shape, generator=g, dtype=F64) if i > 0 else torch.zeros_like(x)
        var = (1 - ab_prev[i]) / (1 - ab[i]) * beta[i]
        x = (x - beta[i] / math.sqrt(1 - ab[i]) * eps) / math.sqrt(1 - beta[i]) + math.sqrt(var) * z
    ours = sample(MIX.score_fn(sde), sde, (n, 2), "ddpm", steps=N, generator=torch.Generator().manual_seed(5),
                  x_T=x_T).samples
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_sampler_is_song_meng_ermon_eq12(eta):
    """DDIM, Eq. 12 with sigma_t(eta) of Eq. 16 on the grid linspace(T, eps, N) followed by t = 0 (alpha_bar = 1)."""
    sde, N, n, eps = VPSDE(), 15, 5, 1e-3
    grid = torch.linspace(1.0, eps, N, dtype=F64)
    ab = torch.cat([sde.marginal_coeffs(grid)[0] ** 2, torch.ones(1, dtype=F64)])
    x_T = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    g, x = torch.Generator().manual_seed(5), x_T.clone()
    for i in range(N):
        e = -math.sqrt(1 - ab[i]) * MIX.score(x, sde, grid[i].expand(n))
        x0 = (x - math.sqrt(1 - ab[i]) * e) / math.sqrt(ab[i])
        sig = 0.0 if i == N - 1 else eta * math.sqrt((1 - ab[i + 1]) / (1 - ab[i]) * (1 - ab[i] / ab[i + 1]))
        x = math.sqrt(ab[i + 1]) * x0 + math.sqrt(1 - ab[i + 1] - sig**2) * e
        if sig > 0:
            x = x + sig * torch.randn(x.shape, generator=g, dtype=F64)
    ours = sample(MIX.score_fn(sde), sde, (n, 2), "ddim", steps=N, generator=torch.Generator().manual_seed(5),
                  x_T=x_T, eta=eta).samples
    # the last step lands on t = 0, where the code's sigma(0) is the 1e-6 floor instead of 0
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


def test_heun_with_churn_is_karras_algorithm2():
    """Karras et al. 2022, Alg. 2 written out on EDM's VE (x~ = x, D(x; sigma) = x + sigma^2 score), with
    S_tmax below sigma_max so that the raised level never leaves the SDE's range."""
    sde, N, n = VESDE(sigma_min=0.002, sigma_max=80.0), 12, 6
    opts = dict(s_churn=30.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.007)

    def D(x, sig):
        t = sde.t_from_noise_to_signal(_t(sig))
        return x + sig**2 * MIX.score(x, sde, t.expand(n))

    smax, smin = 80.0, float(sde.sigma(_t(sde.default_eps)))
    i = torch.arange(N, dtype=F64)
    levels = ((smax ** (1 / 7) + i / (N - 1) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7).tolist() + [0.0]
    x_T = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    g, x = torch.Generator().manual_seed(5), x_T.clone()
    for k in range(N):
        t_i, t_next = levels[k], levels[k + 1]
        gamma = min(opts["s_churn"] / N, math.sqrt(2) - 1) if opts["s_tmin"] <= t_i <= opts["s_tmax"] else 0.0
        t_hat = t_i + gamma * t_i
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t_i**2) * opts["s_noise"] * torch.randn(x.shape, generator=g, dtype=F64)
        d = (x - D(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next != 0:
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * (x_next - D(x_next, t_next)) / t_next)
        x = x_next
    ours = sample(MIX.score_fn(sde), sde, (n, 2), "heun", steps=N, generator=torch.Generator().manual_seed(5),
                  x_T=x_T, **opts).samples
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- Langevin
@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_min=0.01, sigma_max=5.0)], ids=["vp", "ve"])
def test_ald_at_one_level_reaches_the_ula_stationary_variance(sde):
    """At one level (steps=1: sigma_1 = n(T)) annealed Langevin is x~ += alpha/2 s~ + sqrt(alpha) z on
    p~ = N(M0, V0 + n^2) (Song & Ermon 2019, Alg. 1, on x~ = x / alpha(T)). On a Gaussian of variance v,
    this chain's stationary law is N(M0, v / (1 - alpha / (4 v))) exactly; alpha = v makes it 4/3 v."""
    a, s = (float(c) for c in sde.marginal_coeffs(_t(sde.T)))
    v = V0 + (s / a) ** 2
    n = 16000
    res = sample(GAUSS.score_fn(sde), sde, (n, 1), "ald", steps=1, steps_per_level=30, step_lr=v, denoise=False,
                 generator=torch.Generator().manual_seed(0), dtype=F64)
    xt = res.samples / a
    assert res.nfe == 30
    want = v / (1 - v / (4 * v))
    assert abs(xt.mean().item() - M0) < 4.5 * math.sqrt(want / n)
    assert abs(xt.var().item() / want - 1) < 4.5 * math.sqrt(2 / n)


def test_ald_step_sizes_follow_the_geometric_ladder():
    """alpha_i = step_lr sigma_i^2 / sigma_L^2 with sigma_1 > ... > sigma_L geometric (Song & Ermon 2019, Alg. 1):
    with a huge constant score c the drift dominates, and each level moves x by K alpha_i c / 2."""
    sde, L, K, lr, c = VESDE(sigma_min=0.01, sigma_max=1.0), 4, 5, 1e-3, 1e9
    ends = []
    sample(lambda x, t: torch.full_like(x, c), sde, (3, 2), "ald", steps=L, steps_per_level=K, step_lr=lr,
           denoise=False, x_T=torch.zeros(3, 2, dtype=F64), callback=lambda i, t, x: ends.append(x.clone()),
           generator=torch.Generator().manual_seed(0))
    moves = torch.stack([ends[0]] + [b - a for a, b in zip(ends, ends[1:])]) / (K * c / 2)
    s_max, s_min = 1.0, float(sde.sigma(_t(sde.default_eps)))
    sig = s_max * (s_min / s_max) ** (torch.arange(L, dtype=F64) / (L - 1))
    want = lr * sig**2 / sig[-1] ** 2
    torch.testing.assert_close(moves, want[:, None, None].expand_as(moves), rtol=1e-4, atol=0)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
@pytest.mark.parametrize("snr_norm", ["batch", "example"])
def test_langevin_corrector_is_song_algorithm_4_and_5(sde, snr_norm):
    """x <- x + eps s + sqrt(2 eps) z with eps = 2 alpha_i (r ||z|| / ||s||)^2 (Song et al. 2021, Alg. 4 VE with
    alpha_i = 1, Alg. 5 VP with alpha_i = 1 - beta_i = alpha_bar(t) / alpha_bar(t - dt)); "batch" averages the norms
    over the batch as score_sde does."""
    t0, dt, r = 0.4, 0.01, 0.16
    x = MIX.sample(4, generator=torch.Generator().manual_seed(1)) * 3.0
    tt = torch.full((4,), t0, dtype=F64)
    out, _ = langevin_correct(sde, CountingScore(MIX.score_fn(sde)), x, tt, _t(dt), r,
                              torch.Generator().manual_seed(2), snr_norm)
    s = MIX.score(x, sde, tt)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    if isinstance(sde, VESDE):
        alpha_i = 1.0
    else:
        integral = lambda u: 0.5 * u**2 * 19.9 + 0.1 * u  # noqa: E731
        alpha_i = math.exp(-integral(t0)) / math.exp(-integral(t0 - dt))
    zn, sn = z.norm(dim=1), s.norm(dim=1)
    if snr_norm == "batch":
        zn, sn = zn.mean(), sn.mean()
    eps = (2 * alpha_i * (r * zn / sn) ** 2).reshape(-1, 1) * torch.ones(4, 1, dtype=F64)
    torch.testing.assert_close(out, x + eps * s + torch.sqrt(2 * eps) * z, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- EDM
class _Fixed(nn.Module):
    """Returns a fixed output F and remembers its inputs."""

    def __init__(self, F):
        super().__init__()
        self.F = F

    def forward(self, x, label):
        self.seen = (x, label)
        return self.F


@pytest.mark.parametrize("sde", [VESDE(sigma_min=0.002, sigma_max=80.0), VPSDE()], ids=["ve", "vp"])
def test_edm_preconditioning_is_karras_table1(sde):
    """D(x~; sigma) = c_skip x~ + c_out F(c_in x~; c_noise), c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4
    (Karras et al. 2022, Table 1), on x~ = x / alpha with sigma = sigma(t) / alpha(t)."""
    sd = 0.5
    g = torch.Generator().manual_seed(0)
    F, x = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t = _t(*TIMES)
    net = _Fixed(F)
    model = ScoreModel(net, sde, prediction="edm", sigma_data=sd)
    x0 = model.denoise(x, t)
    a, s = (c[:, None] for c in sde.marginal_coeffs(t))
    sig, xt = s / a, x / a
    c_skip, c_out, c_in = sd**2 / (sig**2 + sd**2), sig * sd / (sig**2 + sd**2).sqrt(), 1 / (sig**2 + sd**2).sqrt()
    torch.testing.assert_close(x0, c_skip * xt + c_out * F, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net.seen[0], c_in * xt, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(net.seen[1], 0.25 * torch.log(sig[:, 0]), rtol=1e-12, atol=1e-14)


def test_edm_noise_levels_are_log_normal():
    """ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1): the levels the loss uses, n(t), have the
    log-normal's mean and std (EDM's VE range [0.002, 80] clips < 1e-4 of the draws)."""
    sde = VESDE(sigma_min=0.002, sigma_max=80.0)
    loss = EDMLoss(sde, P_mean=-1.0, P_std=0.8)
    t = loss.sample_t(torch.zeros(40000, 1), torch.Generator().manual_seed(0))
    ln = torch.log(sde.noise_to_signal(t))
    assert abs(ln.mean().item() + 1.0) < 4.5 * 0.8 / 200
    assert abs(ln.std().item() / 0.8 - 1) < 4.5 / math.sqrt(2 * 40000)


# --------------------------------------------------------------------------- the test oracle itself
@pytest.mark.parametrize("sde", [None, VPSDE(), VESDE()], ids=["data", "vp", "ve"])
def test_gaussian_mixture_score_is_the_gradient_of_its_log_density(sde):
    """analytic.GaussianMixture: log p_t is the mixture of N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I) (torch's
    MultivariateNormal) and score = autograd gradient of log p_t, for full covariances and image event shapes."""
    A = torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.1, 0.4, 0.05, 0.0], [0.0, 0.05, 0.3, 0.1], [0.0, 0.0, 0.1, 0.45]],
                     dtype=F64)
    covs = torch.stack([A, 0.5 * A + 0.1 * torch.eye(4, dtype=F64)])
    means = torch.tensor([[0.5, -0.5, 0.2, 0.0], [-0.4, 0.3, -0.2, 0.6]], dtype=F64)
    gm = GaussianMixture([0.25, 0.75], means, covs, event_shape=(1, 2, 2))
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = _t(0.0, 0.01, 0.3, 0.8, 1.0)
    if sde is None:
        a, s = torch.ones(5, dtype=F64), torch.zeros(5, dtype=F64)
    else:
        a, s = sde.marginal_coeffs(t)
    want = []
    for b in range(5):
        comps = [torch.distributions.MultivariateNormal(a[b] * means[k], a[b] ** 2 * covs[k] + s[b] ** 2 * torch.eye(4,
                 dtype=F64)).log_prob(x[b].reshape(4)) for k in range(2)]
        want.append(torch.logsumexp(torch.stack(comps) + torch.log(_t(0.25, 0.75)), 0))
    x_req = x.clone().requires_grad_(True)
    logp = gm.log_prob(x_req, sde, t if sde is not None else None)
    torch.testing.assert_close(logp, torch.stack(want), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(logp.sum(), x_req)
    torch.testing.assert_close(gm.score(x, sde, t if sde is not None else None), grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- likelihood weighting
def test_likelihood_weighted_dsm_is_the_score_matching_term_of_the_nll_bound():
    """Song, Durkan, Murray & Ermon 2021, Thm. 1: KL(p_0 || p_theta^SDE) <= J_SM(theta; g^2) + KL(p_T || pi),
    J_SM = 1/2 int_0^T g^2 E_{p_t} ||s_theta - grad log p_t||^2 dt, and the likelihood-weighted DSM loss
    estimates 2 J_SM / (T - eps) up to a theta-free constant.

    All closed-form on VE with data N(0, v0 I) and the linear model s_theta(x, t) = -x / q(t), q = c + sigma(t)^2:
    p_t = N(0, P I) with P = v0 + sigma^2, E ||s_theta - grad log p_t||^2 = D (v0 - c)^2 / (P q^2), and the model's
    reverse SDE dx = -g^2 s_theta dt + g dw_bar from pi = N(0, sigma_max^2 I) keeps N(0, u I) with
    du/dt = 2 g^2 u / q - g^2, whose solution is u = q - c q^2 / q(T)^2."""
    sde, v0, c, D = VESDE(sigma_min=0.01, sigma_max=5.0), 0.25, 0.5, 4
    eps, T = sde.default_eps, sde.T

    class Linear(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x, label):  # label = 999 t / T
            return -x / (self.c + sde.sigma(label * (T / 999.0)) ** 2)[:, None]

    def quad(fn, a):
        u = torch.linspace(a, T, 100001, dtype=F64)
        return torch.trapezoid(fn(sde.sigma(u) ** 2, sde.drift_coeff_and_diffusion(u)[1] ** 2), u).item()

    def j_sm(a):
        return 0.5 * D * quad(lambda s2, g2: g2 * (v0 - c) ** 2 / ((v0 + s2) * (c + s2) ** 2), a)

    kl = lambda a, b: 0.5 * D * (a / b - 1 - math.log(a / b))  # noqa: E731  KL(N(0, a I) || N(0, b I))
    s_min2, s_max2 = 0.01**2, 25.0
    q0, qT = c + s_min2, c + s_max2
    assert kl(v0 + s_min2, q0 - c * q0**2 / qT**2) <= j_sm(0.0) + kl(v0 + s_max2, s_max2)  # the theorem
    # the loss: same t, x0, z for the model and the true score (c = v0), so the difference is J_SM
    n = 40000
    x0 = math.sqrt(v0) * torch.randn(n, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    loss = DSMLoss(sde, weighting="likelihood", reduce="sum")
    l_model, l_true = (loss(ScoreModel(Linear(cc), sde, prediction="score"), x0,
                            generator=torch.Generator().manual_seed(2)) for cc in (c, v0))
    diff = (l_model - l_true) * (T - eps) / 2
    assert abs(diff.mean().item() - j_sm(eps)) < 4.5 * diff.std().item() / math.sqrt(n)
    # ... and the model's loss itself: 2 J_SM plus the irreducible int g^2 (1 / sigma^2 - 1 / P) dt
    full = l_model * (T - eps)
    want = 2 * j_sm(eps) + D * quad(lambda s2, g2: g2 * (1 / s2 - 1 / (v0 + s2)), eps)
    assert abs(full.mean().item() - want) < 4.5 * full.std().item() / math.sqrt(n)


def test_gaussian_mixture_refuses_what_is_not_a_covariance_and_names_bad_arguments():
    """A non-symmetric matrix was read through its lower triangle (silently another mixture) and a negative
    variance failed only at the first score / sample; a missing t, a t of another length or data of another
    size failed deep in torch. Each is now a ValueError that names the argument and the fix."""
    with pytest.raises(ValueError, match=r"covs\[0\].*symmetric"):
        GaussianMixture([1.0], [[0.0, 1.0]], [[[1.0, 0.5], [0.0, 1.0]]])
    for covs in (-1.0, [[[1.0, 2.0], [2.0, 1.0]]]):
        with pytest.raises(ValueError, match=r"covs\[0\].*positive semi-definite"):
            GaussianMixture([1.0], [[0.0, 1.0]], covs)
    # a point mass is a valid data distribution: its diffused marginals are Gaussians, and it samples its mean
    dirac = GaussianMixture([1.0], [[0.5, -1.0]], 0.0)
    torch.testing.assert_close(dirac.sample(3), torch.tensor([[0.5, -1.0]] * 3, dtype=F64))
    x = torch.zeros(3, 2, dtype=F64)
    a, s = VPSDE().marginal_coeffs(_t(0.5))
    torch.testing.assert_close(dirac.score(x, VPSDE(), 0.5), -(x - a * _t(0.5, -1.0)) / s**2)
    with pytest.raises(ValueError, match="singular"):
        dirac.log_prob(x)  # the data density itself does not exist
    gm = GaussianMixture([1.0], [[0.0, 1.0]], 0.5)
    with pytest.raises(ValueError, match=r"t .*sde"):
        gm.score(x, VPSDE())
    with pytest.raises(ValueError, match=r"t must .*\(3,\)"):
        gm.score(x, VPSDE(), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"event_shape \(2,\)"):
        gm.log_prob(torch.zeros(3, 3), VPSDE(), 0.5)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_sde_methods_name_a_time_batch_of_another_length(sde):
    """sde(x, t), marginal_prob(x0, t), discretize(x, t) with t of another length than x's batch raised torch's
    'size of tensor a (3) must match ...'; now a ValueError naming t and the shape it needs. One time for the
    whole batch still works, and a Python number is a float64 time (it was float32: float64 data got
    coefficients 1e-7 off)."""
    x = torch.randn(4, 2, dtype=F64)
    for fn in (sde.sde, sde.marginal_prob, sde.discretize, lambda x, t: sde.reverse(lambda y, s: -y).sde(x, t)):
        with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(4,\).*got t of shape \(3,\)"):
            fn(x, torch.rand(3, dtype=F64))
        one, per = fn(x, 0.5), fn(x, torch.full((4,), 0.5, dtype=F64))
        torch.testing.assert_close(one[0], per[0], rtol=0, atol=0)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), VPSDE(schedule="cosine")],
                         ids=["vp", "subvp", "ve", "vp_cosine"])
def test_coefficients_of_a_python_number_time_are_float64(sde):
    """marginal_coeffs(0.3), sigma(0.3), beta(0.3), ... were computed in torch's default float32 (1e-7 off the
    closed form); a Python number is now a float64 time, like the samplers' float64 grids."""
    T03 = torch.tensor(0.3, dtype=F64)
    for fn in (sde.marginal_coeffs, sde.drift_coeff_and_diffusion, sde.noise_to_signal, sde.sigma, sde.alpha):
        out = fn(0.3)
        for got, want in zip(out if isinstance(out, tuple) else (out,),
                             (fn(T03) if isinstance(out, tuple) else (fn(T03),))):
            assert got.dtype == F64
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ddim_eta_above_one_is_refused():
    """DDIM's sigma_eta^2 = eta^2 sigma_{t|s}^2 sigma_s^2 / sigma_t^2 (Eq. 16) stays below sigma_s^2 for eta <= 1
    only; above, the eps_hat coefficient sqrt(sigma_s^2 - sigma_eta^2) was clamped to 0 and the samples came out
    with the wrong spread (Gaussian data of std 0.3, 100 steps: std 0.24 at eta = 1.5, 0.36 at eta = 3)."""
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        sample(GAUSS.score_fn(sde), sde, (4, 1), "ddim", steps=10, eta=1.5)
    # the bound is exact: at eta = 1 the noise fills the posterior variance, sigma_eta = std of q(x_s | x_t, x0)
    _, _, post = posterior_coeffs(sde, _t(0.5), _t(0.4))
    a_t, s_t = sde.marginal_coeffs(_t(0.5))
    a_s, s_s = sde.marginal_coeffs(_t(0.4))
    assert float(post) <= float(s_s) and float(post**2) == pytest.approx(float((1 - (a_t / a_s) ** 2) * s_s**2 / s_t**2))


def test_heun_churn_range_must_not_be_empty():
    """Karras et al. 2022, Alg. 2 churns at levels in [S_tmin, S_tmax]; with s_tmin > s_tmax (swapped) the
    churn was silently never applied. Now a ValueError naming both; without churn the range is unused."""
    sde = VESDE(sigma_min=0.002, sigma_max=80.0)
    with pytest.raises(ValueError, match=r"s_tmin=50.0 > s_tmax=0.05.*swap"):
        sample(MIX.score_fn(sde), sde, (3, 2), "heun", steps=4, s_churn=10.0, s_tmin=50.0, s_tmax=0.05)
    assert sample(MIX.score_fn(sde), sde, (3, 2), "heun", steps=4, s_tmin=50.0, s_tmax=0.05).nfe == 7
