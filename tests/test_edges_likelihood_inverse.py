"""Edge cases of the likelihood, PF-ODE encode / decode, guidance and inverse-problem APIs that the
per-module tests do not reach: scalar data (B,), fixed-grid solvers, argument boundaries, operator
shapes. Every check is against a closed form (diffused Gaussians) or an exact identity."""

import math

import pytest
import torch
from conftest import make_sdes

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.likelihood import log_likelihood
from sgm_lightning.sde import VPSDE

SDES = make_sdes(ve_sigma_max=100.0)
GM1 = GaussianMixture([1.0], [[0.3]], [0.5], event_shape=())  # scalar data: examples of shape ()
GM2 = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [0.25, 0.36])


def _logp_eps(gm, sde, x):
    return gm.log_prob(x, sde, torch.full((x.shape[0],), sde.default_eps, dtype=torch.float64))


# ----------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("name", list(SDES))
def test_likelihood_of_scalar_data(name):
    """x of shape (B,) (as sample(..., shape=(B,)) returns): the NLL of N(0.3, 0.5) diffused to t = eps;
    in one dimension a Rademacher probe (v^2 = 1) makes Hutchinson's estimate exact."""
    sde = SDES[name]
    x = GM1.sample(3, generator=torch.Generator().manual_seed(0))
    exact = log_likelihood(GM1.score_fn(sde), sde, x, trace="exact")
    assert exact.nll.shape == (3,) and exact.z.shape == (3,)
    assert torch.allclose(exact.nll, -_logp_eps(GM1, sde, x), atol=1e-2)
    hutch = log_likelihood(GM1.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(hutch.nll, exact.nll, rtol=0, atol=1e-9)

