"""Forward SDEs and parametrizations: closed forms, Monte-Carlo simulation and round trips."""

import math

import pytest
import torch
from torch import nn
from conftest import SDES as BASE_SDES

from sgm_lightning.parametrization import PREDICTIONS, ScoreModel
from sgm_lightning.sde import SubVPSDE, VESDE, VPSDE


SDES = {
    **BASE_SDES,
    "vp_cosine": VPSDE(schedule="cosine"),
    "subvp_cosine": SubVPSDE(schedule="cosine"),
}
IDS = list(SDES)


def _f64(*v):
    return torch.tensor(v, dtype=torch.float64)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "vp_cosine"])
def test_marginals_match_euler_maruyama(name):
    """Simulate dx = f x dt + g dw from a fixed x0 and compare mean / std with the closed forms."""
    sde = SDES[name]
    n, steps, t_end = 20000, 1000, 0.6
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 1), 1.5, dtype=torch.float64)
    x = x0.clone()
    dt = t_end / steps
    for i in range(steps):
        t = torch.full((n,), i * dt, dtype=torch.float64)
        drift, diff = sde.sde(x, t)
        x = x + drift * dt + diff[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    tt = torch.full((n,), t_end, dtype=torch.float64)
    mean, _ = sde.marginal_prob(x0, tt)
    # started from a point mass: the std is that of the transition kernel from time 0
    _, std = sde.transition_coeffs(tt, torch.zeros_like(tt))
    m, s = mean[0, 0].item(), std[0].item()
    emp_m, emp_s = x.mean().item(), x.std().item()
    # 5 standard errors + O(dt) Euler-Maruyama bias (relative 1 %)
    assert abs(emp_m - m) < 5 * s / math.sqrt(n) + 0.01 * abs(m)
    assert abs(emp_s - s) < 5 * s / math.sqrt(2 * n) + 0.01 * s
    if name != "ve":  # VP family: sigma(0) = 0, so the marginal std is the transition std
        assert abs(sde.marginal_prob(x0, tt)[1][0].item() - s) < 1e-6


@pytest.mark.parametrize("name", IDS)
def test_variance_ode_consistency(name):
    """For dx = f x dt + g dw: d log alpha / dt = f and d sigma^2 / dt = 2 f sigma^2 + g^2."""
    sde = SDES[name]
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    a_p, s_p = sde.marginal_coeffs(t + h)
    a_m, s_m = sde.marginal_coeffs(t - h)
    f, g = sde.drift_coeff_and_diffusion(t)
    _, s = sde.marginal_coeffs(t)
    dlog_a = (torch.log(a_p) - torch.log(a_m)) / (2 * h)
    dvar = (s_p**2 - s_m**2) / (2 * h)
    assert torch.allclose(dlog_a, f, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dvar, 2 * f * s**2 + g**2, rtol=1e-5, atol=1e-6)
    # transition kernels compose: alpha_{t|s} alpha_s = alpha_t, sigma_t^2 = alpha_{t|s}^2 sigma_s^2 + sigma_{t|s}^2
    u = t / 2
    a_ts, s_ts = sde.transition_coeffs(t, u)
    a_u, s_u = sde.marginal_coeffs(u)
    a_t, _ = sde.marginal_coeffs(t)
    assert torch.allclose(a_ts * a_u, a_t) and torch.allclose(a_ts**2 * s_u**2 + s_ts**2, s**2)


@pytest.mark.parametrize("name", IDS)
def test_prior_logp_and_sampling(name):
    sde = SDES[name]
    g = torch.Generator().manual_seed(1)
    z = sde.prior_sampling((4000, 2, 3), generator=g, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z).sum((1, 2))
    assert torch.allclose(sde.prior_logp(z), ref)
    assert abs(z.std().item() - sde.prior_std) < 5 * sde.prior_std / math.sqrt(2 * z.numel())
    # the prior is the marginal at T up to alpha(T) x0 (VP family: alpha(T) ~ 7e-3)
    _, sigma_T = sde.marginal_coeffs(_f64(sde.T))
    assert abs(sigma_T.item() / sde.prior_std - 1) < 1e-3


def test_discretize_ve_is_smld():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0, N=100)
    i = torch.arange(1, 101)
    t = i.double() / 100
    x = torch.randn(100, 3, dtype=torch.float64)
    f, G = sde.discretize(x, t)
    sig = lambda s: 0.01 * (50 / 0.01) ** s  # noqa: E731
    assert torch.equal(f, torch.zeros_like(x))
    assert torch.allclose(G, torch.sqrt(sig(t) ** 2 - sig(t - 0.01) ** 2))


def test_discretize_vp_is_ddpm():
    sde = VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    betas = sde.discrete_betas()
    i = torch.arange(1, 1001, dtype=torch.float64)
    # beta(t) is linear, so int over [t_{i-1}, t_i] is exactly beta(t_mid) / N
    assert torch.allclose(betas, 1 - torch.exp(-(0.1 + (i - 0.5) / 1000 * 19.9) / 1000), rtol=1e-10)
    # ... which is Ho et al. (2020)'s linspace(1e-4, 0.02, 1000) to first order: the differences are the
    # half-step shift of the midpoint (1e-5) and 1 - e^{-b} = b - b^2 / 2 (<= 2e-4)
    ho = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert (betas - ho).abs().max() < 2.2e-4
    assert torch.allclose(sde.discrete_alphas_cumprod(), torch.cumprod(1 - betas, 0), rtol=1e-10)
    t = sde.discrete_times()
    x = torch.randn(1000, 2, dtype=torch.float64)
    f, G = sde.discretize(x, t)
    assert torch.allclose(f, (torch.sqrt(1 - betas) - 1)[:, None] * x, atol=1e-12)
    assert torch.allclose(G, torch.sqrt(betas), rtol=1e-8)
    assert torch.allclose(t[:3], _f64(1e-3, 2e-3, 3e-3))


@pytest.mark.parametrize("name", IDS)
def test_finite_at_and_beyond_the_ends(name):
    sde = SDES[name]
    t = _f64(-1e-3, 0.0, 1e-9, 1e-3, 0.5, 1.0 - 1e-9, 1.0, 1.0 + 1e-3)
    for dtype in (torch.float64, torch.float32):
        tt = t.to(dtype)
        x = torch.ones(len(t), 4, dtype=dtype)
        vals = [*sde.marginal_coeffs(tt), *sde.drift_coeff_and_diffusion(tt), sde.noise_to_signal(tt),
                *sde.sde(x, tt), *sde.discretize(x, tt), *sde.marginal_prob(x, tt),
                sde.reverse_drift(lambda y, s: -y, x, tt), sde.reverse_drift(lambda y, s: -y, x, tt, True),
                *sde.reverse(lambda y, s: -y).discretize(x, tt), *sde.transition_coeffs(tt, tt / 2),
                sde.t_from_noise_to_signal(sde.noise_to_signal(tt))]
        for v in vals:
            assert torch.isfinite(v).all()
        assert (sde.sigma(tt) > 0).all()


@pytest.mark.parametrize("name", IDS)
def test_t_from_noise_to_signal_inverts(name):
    sde = SDES[name]
    t = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    r = sde.noise_to_signal(t)
    assert (r[1:] > r[:-1]).all()  # monotone
    assert torch.allclose(sde.t_from_noise_to_signal(r), t, atol=1e-7)


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_parametrization_round_trip(name, prediction):
    """A network that outputs ``model.target(x0, eps, t)`` yields exactly (score, eps, x0) = (-eps/sigma, eps, x0)."""
    sde = SDES[name]
    g = torch.Generator().manual_seed(2)
    B = 7
    x0 = torch.randn(B, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.linspace(0.02, 1.0, B, dtype=torch.float64)

    class Fixed(nn.Module):
        out = None

        def forward(self, x_in, label, **cond):
            return self.out

    net = Fixed()
    model = ScoreModel(net, sde, prediction)
    net.out = model.target(x0, eps, t)
    alpha, sigma = sde.marginal_coeffs(t)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    out = model.outputs(x_t, t)
    assert torch.allclose(out.eps, eps, rtol=1e-7, atol=1e-8)
    assert torch.allclose(out.x0, x0, rtol=1e-7, atol=1e-7 * (1 + sigma.max().item()))
    assert torch.allclose(out.score, -eps / sigma[:, None, None, None], rtol=1e-7, atol=1e-8)
    assert torch.equal(model(x_t, t), net.out)


def test_bad_arguments_raise():
    bad = [
        (lambda: VESDE(sigma_min=0.0), "sigma_min"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (lambda: VPSDE(beta_min=-0.1), "beta_min"),
        (lambda: SubVPSDE(beta_min=1.0, beta_max=0.5), "beta_max"),
        (lambda: VPSDE(schedule="quadratic"), "schedule"),
        (lambda: VPSDE(N=0), "N"),
        (lambda: VESDE(N=2.5), "N"),
        (lambda: VPSDE(schedule="cosine", cosine_s=0.0), "cosine_s"),
        (lambda: ScoreModel(nn.Identity(), VPSDE(), prediction="noise"), "prediction"),
        (lambda: ScoreModel(nn.Identity(), VPSDE(), label="step"), "label"),
        (lambda: ScoreModel(nn.Identity(), VPSDE(), prediction="edm", sigma_data=0.0), "sigma_data"),
    ]
    for make, name in bad:
        with pytest.raises(ValueError, match=name):
            make()
    model = ScoreModel(nn.Identity(), VPSDE())
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.zeros(3, 2), torch.zeros(2))
