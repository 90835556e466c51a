"""Probability-flow ODE likelihoods against the exact densities of diffused Gaussian mixtures."""

import math

import pytest
import torch
from conftest import make_sdes

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.likelihood import (LikelihoodResult, bits_per_dim, dequantize, exact_divergence,
                                      hutchinson_divergence, log_likelihood)
from sgm_lightning.sde import VPSDE


def _gm2d():
    return GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [0.25, 0.36])


def _gm_image():
    # (1, 2, 2) "images": two full-covariance components in D = 4
    A = torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.1, 0.4, 0.05, 0.0], [0.0, 0.05, 0.3, 0.1], [0.0, 0.0, 0.1, 0.45]],
                     dtype=torch.float64)
    covs = torch.stack([A, 0.5 * A + 0.1 * torch.eye(4, dtype=torch.float64)])
    means = [[0.5, -0.5, 0.2, 0.0], [-0.4, 0.3, -0.2, 0.6]]
    return GaussianMixture([0.5, 0.5], means, covs, event_shape=(1, 2, 2))


# VE with sigma_max = 100: its prior mismatch, O(|x| / sigma_max) nats, stays below the 1e-2 tolerances
SDES = make_sdes(ve_sigma_max=100.0)


def _t(v, n):
    return torch.full((n,), float(v), dtype=torch.float64)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("gm_fn", [_gm2d, _gm_image], ids=["2d", "image"])
def test_exact_trace_matches_closed_form(name, gm_fn):
    sde, gm = SDES[name], gm_fn()
    x = gm.sample(6, generator=torch.Generator().manual_seed(1))
    res = log_likelihood(gm.score_fn(sde), sde, x, trace="exact", rtol=1e-6, atol=1e-6)
    assert isinstance(res, LikelihoodResult) and res.nll.shape == (6,) and res.z.shape == x.shape
    assert res.nfe > 0
    eps = sde.default_eps
    logp_eps = gm.log_prob(x, sde, _t(eps, 6))
    # 1) the ODE integral is exact: log p_eps(x) = log p_T(z) + int div f~ with the *true* p_T
    logp_T = gm.log_prob(res.z, sde, _t(sde.T, 6))
    assert torch.allclose(res.delta_logp + logp_T, logp_eps, atol=1e-3)
    # 2) with the SDE's prior in place of p_T (the prior mismatch is O(alpha(T) |mu| |z|)), the NLL
    #    matches -log p_eps and -log p_0 (p_eps = p_0 smoothed by sigma(eps) <= 0.03) to ~0.01 nats
    assert torch.allclose(res.nll, -logp_eps, atol=1e-2)
    assert torch.allclose(res.nll, -gm.log_prob(x), atol=2e-2)
    assert torch.allclose(res.nll, -(res.prior_logp + res.delta_logp))


def test_hutchinson_is_unbiased():
    sde, gm = VPSDE(), _gm_image()
    x0 = gm.sample(1, generator=torch.Generator().manual_seed(2))
    exact = log_likelihood(gm.score_fn(sde), sde, x0, trace="exact", rtol=1e-5, atol=1e-5).nll
    n = 256  # copies of the same point, each with its own probe
    x = x0.expand(n, 1, 2, 2).contiguous()
    for probe in ("rademacher", "gaussian"):
        res = log_likelihood(gm.score_fn(sde), sde, x, trace="hutchinson", probe=probe,
                             generator=torch.Generator().manual_seed(3), rtol=1e-5, atol=1e-5)
        se = res.nll.std() / math.sqrt(n)
        assert res.nll.std() > 1e-3  # the probes really differ
        assert abs(res.nll.mean() - exact[0]) < 4 * se + 1e-3
    # more probes per example -> smaller spread
    res4 = log_likelihood(gm.score_fn(sde), sde, x[:64], trace="hutchinson", n_probes=4,
                          generator=torch.Generator().manual_seed(4), rtol=1e-5, atol=1e-5)
    res1 = log_likelihood(gm.score_fn(sde), sde, x[:64], trace="hutchinson", n_probes=1,
                          generator=torch.Generator().manual_seed(4), rtol=1e-5, atol=1e-5)
    assert res4.nll.std() < res1.nll.std()


def test_divergence_helpers_linear_map():
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    f = x @ A.T + x**2  # Jacobian A + diag(2x): divergence tr A + 2 sum x
    want = torch.trace(A) + 2 * x.detach().sum(1)
    assert torch.allclose(exact_divergence(f, x), want)
    # Rademacher probes: v^T J v = tr J + sum_{i<j} (A_ij + A_ji) v_i v_j, variance sum_{i<j} (A_ij + A_ji)^2
    n = 3000
    v = torch.randint(0, 2, (n, 5, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    est = hutchinson_divergence(f, x, v)
    S = A + A.T
    var = (S.triu(1) ** 2).sum()
    assert ((est - want).abs() < 5 * torch.sqrt(var / n)).all()
    # a single probe is not exact (the estimator really is random)
    assert not torch.allclose(hutchinson_divergence(f, x, v[:1]), want)


def test_fixed_step_solver_and_options():
    sde, gm = VPSDE(), _gm2d()
    x = gm.sample(4, generator=torch.Generator().manual_seed(5))
    res = log_likelihood(gm.score_fn(sde), sde, x, trace="exact", solver="rk4", step_size=0.01)
    assert res.nfe == 4 * math.ceil((1 - 1e-3) / 0.01)
    assert torch.allclose(res.nll, -gm.log_prob(x, sde, _t(1e-3, 4)), atol=2e-2)
    alias = log_likelihood(gm.score_fn(sde), sde, x, trace="exact", method="rk4", step_size=0.01)
    assert torch.equal(alias.nll, res.nll)


def test_float32_model_runs_in_x_dtype():
    sde, gm = VPSDE(), _gm2d()
    x = gm.sample(3, generator=torch.Generator().manual_seed(6)).float()
    seen = []

    def score(x, t):
        seen.append((x.dtype, t.dtype, t.shape))
        return gm.score(x, sde, t.double())

    res = log_likelihood(score, sde, x, trace="hutchinson", generator=torch.Generator().manual_seed(0))
    assert res.nll.dtype == torch.float32 and torch.isfinite(res.nll).all()
    assert all(s == (torch.float32, torch.float32, (3,)) for s in seen)


def test_argument_validation():
    sde, gm = VPSDE(), _gm2d()
    x = gm.sample(2)
    f = gm.score_fn(sde)
    with pytest.raises(ValueError, match="trace"):
        log_likelihood(f, sde, x, trace="skilling")
    with pytest.raises(ValueError, match="probe"):
        log_likelihood(f, sde, x, probe="uniform")
    with pytest.raises(ValueError, match="solver"):
        log_likelihood(f, sde, x, solver="rk45")
    with pytest.raises(ValueError, match="n_probes"):
        log_likelihood(f, sde, x, n_probes=0)
    with pytest.raises(ValueError, match="x must be a floating"):
        log_likelihood(f, sde, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        log_likelihood(f, sde, x, eps=1.5)
    with pytest.raises(ValueError, match="n_bits"):
        bits_per_dim(torch.zeros(2), 4, n_bits=0)
    with pytest.raises(ValueError, match="8-bit"):
        dequantize(torch.tensor([[256]]))
    with pytest.raises(ValueError, match="n_draws"):
        dequantize(torch.tensor([[3]], dtype=torch.uint8), n_draws=0)


def test_dequantize_ranges_and_roundtrip():
    g = torch.Generator().manual_seed(7)
    k = torch.randint(0, 256, (64, 3, 4, 4), generator=g).to(torch.uint8)
    x = dequantize(k, g)
    assert x.shape == k.shape and x.dtype == torch.float32
    # each value lies in its own bin [2k/256 - 1, 2(k+1)/256 - 1)
    lo = 2 * k.double() / 256 - 1
    assert ((x.double() >= lo - 1e-6) & (x.double() < lo + 2 / 256 + 1e-6)).all()
    scaled = 2 * k.float() / 255 - 1  # the ToTensor-then-2x-1 convention
    xs = dequantize(scaled, torch.Generator().manual_seed(0), n_draws=5, data_min=-1.0, data_max=1.0)
    assert xs.shape == (5,) + k.shape
    assert torch.equal(torch.floor((xs.double() + 1) * 128).to(torch.uint8), k.expand(5, *k.shape))
    # the offsets are uniform within the bin: mean 1/2, variance 1/12 (n = 5 * 3072 draws)
    u = (xs.double() + 1) * 128 - k.double()
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)


def test_bits_per_dim_of_discretized_gaussian():
    """Data: 8-bit pixels k from a discretized Gaussian; the dequantized bound matches -log2 P(k)."""
    mu, s, D = 0.1, 0.3, 4
    gm = GaussianMixture([1.0], [[mu] * D], [s**2])
    g = torch.Generator().manual_seed(8)
    k = torch.clamp(torch.floor((gm.sample(2000, generator=g) + 1) * 128), 0, 255).long()
    # exact discrete probability P(k) = prod_d int_bin N(x; mu, s^2) dx (bins far from the clip)
    normal = torch.distributions.Normal(torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    lo, hi = 2 * k.double() / 256 - 1, 2 * (k.double() + 1) / 256 - 1
    log_pk = torch.log(normal.cdf(hi) - normal.cdf(lo)).sum(1)
    exact_bpd = -log_pk / (D * math.log(2))
    x = dequantize(k, g, dtype=torch.float64)
    bpd = bits_per_dim(-gm.log_prob(x), D)
    assert torch.isfinite(bpd).all()
    # Jensen gap of a bin of width h = 2/256 under a Gaussian density: ~ h^2 / (24 s^2) nats per dim
    gap = (2 / 256) ** 2 / (24 * s**2) / math.log(2)
    assert abs((bpd - exact_bpd).mean().item()) < 10 * gap + 1e-4
    assert ((bpd - exact_bpd).abs() < 0.05).all()  # per example: bin-level density variation
    # [0, 1] data: offset 8 instead of 7 (the density is 2^D times larger, the bits the same)
    nll01 = -gm.log_prob(x) - D * math.log(2)
    assert torch.allclose(bits_per_dim(nll01, D, data_min=0.0, data_max=1.0), bpd)
    assert bits_per_dim(torch.zeros(1), D, offset=3.0).item() == 3.0
