"""Reverse-SDE solvers (torchsde) and the HMC corrector against exact mixture scores."""

from __future__ import annotations

import pytest
import torch

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.samplers.common import CountingScore
from sgm_lightning.samplers.pc import hmc_correct
from sgm_lightning.sampling import sample
from sgm_lightning.sde import VESDE, VPSDE
from tests.test_samplers import energy_distance_pvalue

SDES = {"vp": VPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=10.0)}
MIX = GaussianMixture([0.2, 0.8], [[-1.5, 0.5], [1.0, -0.5]],
                      [[[0.05, 0.0], [0.0, 0.05]], [[0.12, 0.03], [0.03, 0.08]]])


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("solver,steps,adaptive", [("euler", 100, False), ("srk", 40, False), ("srk", 20, True)])
def test_torchsde_solvers_reproduce_the_mixture(sde_name, solver, steps, adaptive):
    sde = SDES[sde_name]
    res = sample(MIX.score_fn(sde), sde, (800, 2), "sde", steps=steps, generator=torch.Generator().manual_seed(1),
                 solver=solver, adaptive=adaptive, rtol=1e-2, atol=1e-2)
    assert res.samples.shape == (800, 2) and torch.isfinite(res.samples).all()
    w = MIX.responsibilities(res.samples).argmax(1).double().mean().item()
    assert abs(w - 0.8) < 0.05, w  # binomial SE 0.014
    data = MIX.sample(800, generator=torch.Generator().manual_seed(2)).float()
    assert energy_distance_pvalue(res.samples, data) > 0.01


def test_milstein_equals_euler_for_state_independent_diffusion():
    """g depends on t only, so the Milstein correction g dg/dx is zero: same Brownian path, same samples."""
    sde = SDES["vp"]
    fn = MIX.score_fn(sde)
    a, b = (sample(fn, sde, (64, 1, 2), "sde", steps=50, solver=s, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(5)).samples for s in ("euler", "milstein"))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    c = sample(fn, sde, (64, 1, 2), "sde", steps=50, solver="euler", dtype=torch.float64,
               generator=torch.Generator().manual_seed(6)).samples
    assert (a - c).abs().max() > 0.1  # the Brownian path does depend on the generator


@pytest.mark.parametrize("sde_name", list(SDES))
def test_hmc_corrector_leaves_p_t_invariant(sde_name):
    """Samples drawn from the exact p_t stay p_t after 20 HMC corrector steps at t (two-sample test),
    while the chain really moves (it decorrelates from its start)."""
    sde = SDES[sde_name]
    t0 = 0.3
    t = torch.full((800,), t0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    alpha, sigma = (float(c) for c in sde.marginal_coeffs(torch.tensor(t0, dtype=torch.float64)))
    x = alpha * MIX.sample(800, generator=g) + sigma * torch.randn(800, 2, generator=g, dtype=torch.float64)
    fresh = alpha * MIX.sample(800, generator=g) + sigma * torch.randn(800, 2, generator=g, dtype=torch.float64)
    score = CountingScore(MIX.score_fn(sde))
    dt = torch.tensor(1e-3, dtype=torch.float64)
    y, v = x, torch.zeros_like(x)
    for _ in range(20):
        y, _, v = hmc_correct(sde, score, y, v, t, dt, 0.16, g, leapfrog=3, persistence=0.5)
    assert score.nfe == 20 * 4
    moved = (y - x).norm(dim=1).mean() / x.std(0).norm()
    assert moved > 0.3, moved
    assert energy_distance_pvalue(y, fresh) > 0.01


def test_pc_with_hmc_corrector_reproduces_the_mixture():
    sde = SDES["vp"]
    res = sample(MIX.score_fn(sde), sde, (800, 2), "pc", steps=40, corrector="hmc",
                 generator=torch.Generator().manual_seed(1))
    assert res.nfe == 40 * (1 + 3 + 1)
    w = MIX.responsibilities(res.samples).argmax(1).double().mean().item()
    assert abs(w - 0.8) < 0.05, w
    data = MIX.sample(800, generator=torch.Generator().manual_seed(2)).float()
    assert energy_distance_pvalue(res.samples, data) > 0.01
