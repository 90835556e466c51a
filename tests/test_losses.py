"""Training objectives against closed forms: Gaussian data have exact scores, so the minimum of every
denoising objective (the irreducible part) and the expectation of every score-matching objective
for a linear score model are known exactly."""

import math

import pytest
import torch
from torch import nn
from conftest import SDES

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.losses import (DDPMLoss, DSMLoss, ImplicitScoreMatchingLoss, NCSNLoss,
                                  SlicedScoreMatchingLoss)
from sgm_lightning.parametrization import PREDICTIONS, ScoreModel
from sgm_lightning.sde import VESDE, VPSDE


MU, S, D = 0.3, 0.8, 2  # data N(MU, S^2 I_D)


def _gauss():
    return GaussianMixture([1.0], [[MU] * D], [S**2])


class OracleNet(nn.Module):
    """Network whose output is the exact regression target of the true score (times ``scale``).

    It reads t back from the "time" label (999 t / T) and, for EDM, undoes the input scaling c_in / alpha.
    """

    def __init__(self, gm, sde, prediction, scale=1.0, sigma_data=0.5):
        super().__init__()
        self.gm, self.sde, self.prediction, self.scale, self.sigma_data = gm, sde, prediction, scale, sigma_data
        self.to_raw = ScoreModel(nn.Identity(), sde, prediction, label="time", sigma_data=sigma_data).target
        self.seen_cond = None

    def forward(self, x_in, label, **cond):
        self.seen_cond = cond
        t = label.double() * (self.sde.T / 999.0)
        alpha, sigma = (c.reshape(-1, *[1] * (x_in.ndim - 1)) for c in self.sde.marginal_coeffs(t))
        x = x_in.double()
        if self.prediction == "edm":
            n = sigma / alpha
            x = x * alpha * torch.sqrt(n * n + self.sigma_data**2)
        s = self.gm.score(x, self.sde, t) * self.scale
        eps, x0 = -sigma * s, (x + sigma**2 * s) / alpha
        return self.to_raw(x0, eps, t).to(x_in.dtype)


def _oracle(sde, prediction="eps", scale=1.0):
    gm = _gauss()
    return ScoreModel(OracleNet(gm, sde, prediction, scale), sde, prediction, label="time"), gm


def _c(sde, t):
    """Irreducible per-dimension DSM error at t: E||sigma s* + z||^2 / D = alpha^2 S^2 / (alpha^2 S^2 + sigma^2)."""
    alpha, sigma = sde.marginal_coeffs(t)
    return alpha**2 * S**2 / (alpha**2 * S**2 + sigma**2)


def _quad(fn, a, b, m=200001):
    """Trapezoid rule on a geometric + uniform float64 grid (integrands grow like 1/t near 0)."""
    t = torch.unique(torch.cat([torch.linspace(a, b, m, dtype=torch.float64),
                                torch.exp(torch.linspace(math.log(a), math.log(b), m, dtype=torch.float64))]))
    return torch.trapezoid(fn(t), t).item()


def _weight(sde, t, weighting):
    if weighting == "sigma2":
        return torch.ones_like(t)
    _, g = sde.drift_coeff_and_diffusion(t)
    return g**2 / sde.sigma(t) ** 2


def _mc(loss_fn, model, gm, n, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    x0 = gm.sample(n, generator=g)
    return loss_fn(model, x0, generator=g, **kw)


def _close(samples, value, k=4.5):
    se = samples.std().item() / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - value) < k * se + 1e-9, (samples.mean().item(), value, se)


# --------------------------------------------------------------------------- DSM
@pytest.mark.parametrize("sde", list(SDES.values()), ids=list(SDES))
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_dsm_oracle_attains_closed_form_minimum(sde, weighting):
    n = 20000
    loss_fn = DSMLoss(sde, weighting=weighting, importance_sampling=(weighting == "likelihood"))
    model, gm = _oracle(sde)
    loss, t = _mc(loss_fn, model, gm, n, seed=0, return_t=True)
    assert loss.shape == (n,) and t.shape == (n,)
    eps = sde.default_eps
    assert t.min() >= eps and t.max() <= sde.T
    want = _quad(lambda u: _weight(sde, u, weighting) * _c(sde, u), eps, sde.T) / (sde.T - eps)
    _close(loss, want)
    # the true score beats perturbed ones (paired: same t, x0, z)
    for scale in (0.9, 1.1):
        worse, _ = _mc(loss_fn, _oracle(sde, scale=scale)[0], gm, n, seed=0, return_t=True)
        diff = worse - loss
        assert diff.mean() > 4 * diff.std() / math.sqrt(n)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_dsm_uniform_likelihood_weighting_closed_form(sde):
    n = 20000
    model, gm = _oracle(sde)
    loss = _mc(DSMLoss(sde, weighting="likelihood"), model, gm, n, seed=1)
    eps = sde.default_eps
    _close(loss, _quad(lambda u: _weight(sde, u, "likelihood") * _c(sde, u), eps, sde.T) / (sde.T - eps))


def test_dsm_loss_is_independent_of_parametrization():
    sde = VPSDE()
    gm = _gauss()
    for w in ("sigma2", "likelihood"):
        ref = _mc(DSMLoss(sde, weighting=w), _oracle(sde, "eps")[0], gm, 512, seed=2)
        for p in PREDICTIONS:
            loss = _mc(DSMLoss(sde, weighting=w), _oracle(sde, p)[0], gm, 512, seed=2)
            assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-8), p


def test_dsm_importance_sampling_unbiased_and_lower_variance():
    sde = VPSDE()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D + 1, 32), nn.SiLU(), nn.Linear(32, D)).double()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, label):
            return self.net(torch.cat([x, label[:, None] / 999.0], 1))

    model = ScoreModel(Wrap(), sde, "eps")
    gm = _gauss()
    n = 40000
    with torch.no_grad():
        plain = _mc(DSMLoss(sde, weighting="likelihood"), model, gm, n, seed=3)
        imp = _mc(DSMLoss(sde, weighting="likelihood", importance_sampling=True), model, gm, n, seed=4)
    se = math.sqrt(plain.var().item() / n + imp.var().item() / n)
    assert abs(plain.mean().item() - imp.mean().item()) < 4 * se
    assert imp.var() < 0.2 * plain.var()


def test_dsm_options_and_reproducibility():
    sde = VPSDE()
    model, gm = _oracle(sde)
    x0 = gm.sample(16, generator=torch.Generator().manual_seed(0))
    a = DSMLoss(sde)(model, x0, generator=torch.Generator().manual_seed(5))
    b = DSMLoss(sde)(model, x0, generator=torch.Generator().manual_seed(5))
    s = DSMLoss(sde, reduce="sum")(model, x0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.allclose(s, D * a)
    _, t = DSMLoss(sde, eps=0.5)(model, x0, generator=torch.Generator().manual_seed(5), return_t=True)
    assert t.min() >= 0.5
    # conditioning is forwarded to the network
    y = torch.arange(16)
    DSMLoss(sde)(model, x0, y=y)
    assert torch.equal(model.net.seen_cond["y"], y)
    with pytest.raises(ValueError, match="weighting"):
        DSMLoss(sde, weighting="sigma")
    with pytest.raises(ValueError, match="importance_sampling"):
        DSMLoss(sde, importance_sampling=True)
    with pytest.raises(ValueError, match="eps"):
        DSMLoss(sde, eps=0.0)
    with pytest.raises(ValueError, match="reduce"):
        DSMLoss(sde, reduce="max")


def test_dsm_trains_a_network():
    """A few Adam steps on the DSM loss lower it (the loss is differentiable end to end)."""
    sde = VPSDE()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D + 1, 32), nn.SiLU(), nn.Linear(32, D))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, label):
            return self.net(torch.cat([x, label[:, None] / 999.0], 1))

    model = ScoreModel(Wrap(), sde, "eps")
    x0 = _gauss().sample(512, generator=torch.Generator().manual_seed(1)).float()
    loss_fn = DSMLoss(sde)
    evalg = lambda: loss_fn(model, x0, generator=torch.Generator().manual_seed(9)).mean().item()  # noqa: E731
    before = evalg()
    for _ in range(60):  # plain gradient descent
        model.zero_grad()
        loss_fn(model, x0).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    assert evalg() < before - 0.05


# --------------------------------------------------------------------------- DDPM / NCSN
def test_ddpm_oracle_attains_closed_form_minimum():
    sde = VPSDE()
    N, n = 100, 20000
    model, gm = _oracle(sde)
    loss, t = _mc(DDPMLoss(sde, N=N), model, gm, n, seed=6, return_t=True)
    grid = sde.discrete_times(N)
    assert torch.isin(t, grid).all() and len(torch.unique(t)) > N // 2
    _close(loss, _c(sde, grid).mean().item())
    worse = _mc(DDPMLoss(sde, N=N), _oracle(sde, scale=1.2)[0], gm, n, seed=6)
    assert (worse - loss).mean() > 4 * (worse - loss).std() / math.sqrt(n)
    with pytest.raises(ValueError, match="N"):
        DDPMLoss(sde, N=0)


def test_ncsn_ladder_and_closed_form():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    L, n = 10, 20000
    loss_fn = NCSNLoss(sde, num_scales=L)
    ladder = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), L, dtype=torch.float64))
    assert torch.allclose(loss_fn.sigmas, ladder)
    assert torch.allclose(loss_fn.times, torch.linspace(1, 0, L, dtype=torch.float64), atol=1e-12)
    model, gm = _oracle(sde)
    loss, t = _mc(loss_fn, model, gm, n, seed=7, return_t=True)
    assert torch.allclose(sde.sigma(t.double()).unique(), ladder.sort().values, rtol=1e-5)
    _close(loss, 0.5 * (S**2 / (S**2 + ladder**2)).mean().item())
    # generic SDE: the ladder is the noise-to-signal ratio at the chosen times
    vp_loss = NCSNLoss(VPSDE(), num_scales=5, sigma_min=0.05, sigma_max=20.0)
    r = VPSDE().noise_to_signal(vp_loss.times)
    assert torch.allclose(r, vp_loss.sigmas, rtol=1e-6)
    with pytest.raises(ValueError, match="sigma_min"):
        NCSNLoss(sde, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="num_scales"):
        NCSNLoss(sde, num_scales=0)


# --------------------------------------------------------------------------- SSM / ISM
_A = torch.tensor([[1.5, 0.3, 0.0], [-0.2, 0.8, 0.4], [0.1, 0.0, 1.2]], dtype=torch.float64)
_C = torch.tensor([0.2, -0.1, 0.5], dtype=torch.float64)
_B = torch.tensor([0.0, 0.3, 0.1], dtype=torch.float64)
_SIG = torch.tensor([[1.0, 0.3, 0.1], [0.3, 0.7, 0.0], [0.1, 0.0, 0.5]], dtype=torch.float64)


def _linear_score(A, c):
    return lambda x: -(x - c) @ A.T  # s(x) = -A (x - c), grad s = -A


def _gauss_data(n, seed):
    return GaussianMixture([1.0], _B[None], _SIG[None]).sample(n, generator=torch.Generator().manual_seed(seed))


def _ism_expectation():
    d = (_B - _C)[:, None]
    return (0.5 * torch.trace(_A.T @ _A @ (_SIG + d @ d.T)) - torch.trace(_A)).item()


def test_ism_exact_per_example():
    x = _gauss_data(64, 0)
    s = _linear_score(_A, _C)
    loss = ImplicitScoreMatchingLoss()(s, x)
    want = 0.5 * (s(x) ** 2).sum(1) - torch.trace(_A)
    assert torch.allclose(loss, want)
    assert torch.allclose(ImplicitScoreMatchingLoss(reduce="mean")(s, x), want / 3)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_ssm_unbiased_for_ism_and_vr_reduces_variance(distribution):
    n = 20000
    x = _gauss_data(n, 1)
    s = _linear_score(_A, _C)
    want = _ism_expectation()
    ism = ImplicitScoreMatchingLoss()(s, x)
    _close(ism, want)
    g = torch.Generator().manual_seed(2)
    ssm = SlicedScoreMatchingLoss(variance_reduction=False, distribution=distribution)(s, x, g)
    vr = SlicedScoreMatchingLoss(variance_reduction=True, distribution=distribution)(s, x, g)
    # unbiased given x: compare the paired difference to ISM on the same points
    _close(ssm - ism, 0.0)
    _close(vr - ism, 0.0)
    assert (vr - ism).var() < 0.8 * (ssm - ism).var()  # observed ~0.1 (rademacher), ~0.65 (gaussian)
    many = SlicedScoreMatchingLoss(n_projections=8, distribution=distribution)(s, x, g)
    assert (many - ism).var() < 0.25 * (vr - ism).var()


def _fit(loss_fn, x, steps, seed):
    torch.manual_seed(seed)
    A = torch.eye(3, dtype=torch.float64).requires_grad_(True)
    c = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):  # plain gradient descent
        A.grad = c.grad = None
        loss_fn(_linear_score(A, c), x, g).mean().backward()
        with torch.no_grad():
            A -= 0.3 * A.grad
            c -= 0.3 * c.grad
    return A.detach(), c.detach()


@pytest.mark.parametrize("loss_fn", [ImplicitScoreMatchingLoss(), SlicedScoreMatchingLoss(n_projections=2)],
                         ids=["ism", "ssm_vr"])
def test_score_matching_recovers_precision(loss_fn):
    """The minimiser of 1/2 E||A(x - c)||^2 - tr A over the data is A = Cov^{-1}, c = mean."""
    x = _gauss_data(2000, 3)
    A, c = _fit(loss_fn, x, 300, 0)
    m = x.mean(0)
    prec = torch.linalg.inv(torch.cov(x.T, correction=0))
    rel = (torch.linalg.norm(A - prec) / torch.linalg.norm(prec)).item()
    # ISM is deterministic here (exact optimum); SSM-VR is stochastic (observed 0.3-0.7 %)
    assert rel < (1e-6 if isinstance(loss_fn, ImplicitScoreMatchingLoss) else 0.05), rel
    assert torch.allclose(c, m, atol=1e-3)
    # and the population precision, up to sampling error of 2000 points
    assert torch.linalg.norm(A - torch.linalg.inv(_SIG)) / torch.linalg.norm(torch.linalg.inv(_SIG)) < 0.15


def test_score_matching_validation():
    with pytest.raises(ValueError, match="distribution"):
        SlicedScoreMatchingLoss(distribution="uniform")
    with pytest.raises(ValueError, match="n_projections"):
        SlicedScoreMatchingLoss(n_projections=0)
    with pytest.raises(ValueError, match="floating"):
        ImplicitScoreMatchingLoss()(lambda x: x, torch.zeros(2, 3, dtype=torch.long))
