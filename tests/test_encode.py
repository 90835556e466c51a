"""Probability-flow ODE encode / decode / interpolate with exact scores."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.sampling import decode, encode, interpolate, slerp
from sgm_lightning.sde import VESDE, VPSDE

MIX = GaussianMixture([0.2, 0.8], [[-1.5, 0.5], [1.0, -0.5]],
                      [[[0.05, 0.0], [0.0, 0.05]], [[0.12, 0.03], [0.03, 0.08]]])


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_min=0.01, sigma_max=10.0)], ids=["vp", "ve"])
def test_encode_decode_round_trip(sde):
    fn = MIX.score_fn(sde)
    x = MIX.sample(200, generator=torch.Generator().manual_seed(0))
    z = encode(fn, sde, x)
    back = decode(fn, sde, z.samples)
    rel = ((back.samples - x).norm(dim=1) / x.norm(dim=1)).max()
    assert rel < 1e-3, rel
    assert z.nfe > 0 and back.nfe > 0
    assert (z.samples - x).norm(dim=1).mean() > 0.5  # the latent is not the input


def test_gaussian_data_encodes_to_a_standard_normal():
    """VP: p_T = N(alpha_T mu, alpha_T^2 S + sigma_T^2 I) ~ N(0, I) (alpha_T = 0.007); KS per coordinate,
    and the latents are uncorrelated although the data are correlated."""
    sde = VPSDE()
    g = GaussianMixture([1.0], [[1.0, -2.0, 0.5]], [[[0.5, 0.3, 0.0], [0.3, 0.3, 0.0], [0.0, 0.0, 1.0]]])
    x = g.sample(2000, generator=torch.Generator().manual_seed(3)).float()
    z = encode(g.score_fn(sde), sde, x).samples.double()
    for i in range(3):
        assert stats.kstest(z[:, i].numpy(), "norm").pvalue > 0.01
    assert (torch.corrcoef(z.T) - torch.eye(3, dtype=torch.float64)).abs().max() < 0.1
    assert stats.kstest(x[:, 0].double().numpy(), "norm").pvalue < 1e-6  # the test can tell data from N(0, 1)


def test_slerp():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    unit = lambda v: v / v.reshape(4, -1).norm(dim=1).reshape(4, 1, 1, 1)
    u0, u1 = unit(z0), unit(z1)
    cos = lambda u, v: (u.reshape(4, -1) * v.reshape(4, -1)).sum(1)
    theta = torch.arccos(cos(u0, u1))
    for w in (0.25, 0.5, 0.8):  # on the great circle through unit latents, at angle w theta from u0
        m = slerp(u0, u1, w)
        torch.testing.assert_close(m.reshape(4, -1).norm(dim=1), torch.ones(4), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.arccos(cos(m, u0).clamp(-1, 1)), w * theta, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(torch.arccos(cos(m, u1).clamp(-1, 1)), (1 - w) * theta, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(slerp(z0, z0, 0.4), z0)  # parallel latents


def test_interpolate_ends_at_the_inputs():
    sde = VPSDE()
    fn = MIX.score_fn(sde)
    x = MIX.sample(6, generator=torch.Generator().manual_seed(4))
    res = interpolate(fn, sde, x[:3], x[3:], n=5)
    assert res.samples.shape == (3, 5, 2) and res.nfe > 0
    torch.testing.assert_close(res.samples[:, 0], x[:3], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(res.samples[:, -1], x[3:], rtol=1e-3, atol=1e-3)
    # the middle of each row is the decoded slerp midpoint of that pair's latents
    z = encode(fn, sde, x).samples
    mid = decode(fn, sde, slerp(z[:3], z[3:], 0.5)).samples
    torch.testing.assert_close(res.samples[:, 2], mid, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="n must"):
        interpolate(fn, sde, x[:1], x[1:2], n=1)
