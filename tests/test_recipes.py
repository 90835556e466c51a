"""Training recipes against closed forms: the EDM loss (Karras et al. 2022) and finite-difference
score matching (Pang et al. 2020) on Gaussian data / Gaussian models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sgm_lightning.losses import EDMLoss, FDSMLoss, ImplicitScoreMatchingLoss, SlicedScoreMatchingLoss
from sgm_lightning.nets.mlp import NoiseFreeMLP
from sgm_lightning.parametrization import ModelOutput, ScoreModel
from sgm_lightning.sde import VESDE, VPSDE
from sgm_lightning.utils import bcast


class GaussianDenoiser:
    """The exact denoiser of N(mu, v I) data under ``sde``, plus ``delta`` times a perturbation."""

    def __init__(self, sde, mu: float, v: float, delta: float = 0.0):
        self.sde, self.mu, self.v, self.delta = sde, mu, v, delta

    def outputs(self, x, t):
        a, s = (bcast(c.to(x.dtype), x) for c in self.sde.marginal_coeffs(t))
        n2 = (s / a) ** 2
        x_tilde = x / a
        x0 = self.mu + self.v / (self.v + n2) * (x_tilde - self.mu) + self.delta * x_tilde
        eps = (x - a * x0) / s
        return ModelOutput(score=-eps / s, eps=eps, x0=x0)


@pytest.mark.parametrize("sde", [VESDE(0.002, 80.0), VPSDE()], ids=["ve", "vp"])
def test_edm_loss_is_minimised_by_the_exact_gaussian_denoiser(sde):
    mu, v = 0.3, 0.5**2
    x0 = mu + math.sqrt(v) * torch.randn(20000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = EDMLoss(sde)

    def expected(delta):  # the same sigmas and noise for every delta
        return loss(GaussianDenoiser(sde, mu, v, delta), x0, generator=torch.Generator().manual_seed(1)).mean().item()

    l0, lp, lm = expected(0.0), expected(0.05), expected(-0.05)
    assert l0 < lp and l0 < lm
    curvature = lp + lm - 2 * l0
    assert abs(lp - lm) < 0.1 * curvature  # no linear term: delta = 0 is the minimiser


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5, 2.0, 20.0])
def test_edm_weighting_gives_unit_variance_effective_targets(sigma):
    """lambda(sigma) c_out(sigma)^2 = 1, and for data of std sigma_data the raw network's target
    (x0 - c_skip x~) / c_out has unit variance: a zero network has EDM loss 1 at every sigma."""
    sde, sd = VESDE(0.002, 80.0), 0.5
    loss = EDMLoss(sde, P_mean=math.log(sigma), P_std=1e-9, sigma_data=sd)
    c_out = sigma * sd / math.sqrt(sigma**2 + sd**2)
    assert loss.weight(torch.tensor(sigma, dtype=torch.float64)).item() * c_out**2 == pytest.approx(1.0, rel=1e-12)

    class Zero(nn.Module):
        def forward(self, x, label):
            return torch.zeros_like(x)

    model = ScoreModel(Zero(), sde, prediction="edm", sigma_data=sd)
    x0 = sd * torch.randn(4096, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    losses, t = loss(model, x0, generator=g, return_t=True)
    assert float(sde.noise_to_signal(t[0])) == pytest.approx(sigma, rel=1e-6)
    assert losses.mean().item() == pytest.approx(1.0, abs=0.03)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    target = model.target(x0, z, t)
    assert target.var().item() == pytest.approx(1.0, abs=0.03)


def test_edm_loss_validates_its_arguments():
    with pytest.raises(ValueError, match="P_std"):
        EDMLoss(VESDE(), P_std=0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMLoss(VESDE(), sigma_data=-1.0)


class LinearScore(nn.Module):
    """Score of the Gaussian model N(mu, P^-1): s(x) = -P (x - mu)."""

    def __init__(self, P: torch.Tensor, mu: torch.Tensor):
        super().__init__()
        self.P, self.mu = P, mu

    def forward(self, x):
        return -(x - self.mu) @ self.P.T


def test_fdsm_agrees_with_ssm_and_ism_on_a_gaussian_model():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    P = A @ A.T + 0.5 * torch.eye(3, dtype=torch.float64)
    model = LinearScore(P, torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64))
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    fd = FDSMLoss(eps=0.1)(model, x, generator=torch.Generator().manual_seed(1))
    ssm = SlicedScoreMatchingLoss(variance_reduction=False)(model, x, generator=torch.Generator().manual_seed(1))
    ism = ImplicitScoreMatchingLoss()(model, x)
    # central differences are exact for a linear score: FD-SSM = SSM for the same projections v
    torch.testing.assert_close(fd, ssm, rtol=1e-9, atol=1e-9)
    # and SSM / FD-SSM are unbiased for ISM = 1/2 ||s||^2 - tr P
    diff = fd - ism
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(len(x))


def test_fdsm_is_second_order_accurate_on_a_nonlinear_network():
    torch.manual_seed(0)
    net = NoiseFreeMLP(dim=2, hidden_dim=32, num_layers=2).double()
    x = torch.randn(256, 2, dtype=torch.float64)
    ssm = SlicedScoreMatchingLoss(variance_reduction=False)(net, x, generator=torch.Generator().manual_seed(2))
    errs = []
    for eps in (1e-2, 5e-3):
        fd = FDSMLoss(eps=eps)(net, x, generator=torch.Generator().manual_seed(2))
        errs.append((fd - ssm).abs().max().item())
    assert errs[0] < 1e-3 and errs[1] < errs[0] / 3  # O(eps^2)


def test_noise_free_losses_train_a_score_model_and_need_the_score_prediction():
    net = NoiseFreeMLP(dim=2)
    x = torch.randn(64, 2)
    model = ScoreModel(net, VPSDE(), prediction="score")
    for loss in (FDSMLoss(), SlicedScoreMatchingLoss(), ImplicitScoreMatchingLoss()):
        values, t = loss(model, x, generator=torch.Generator().manual_seed(0), return_t=True)
        assert values.shape == (64,) and t is None and loss.noise_free
        values.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="prediction=score"):
        FDSMLoss()(ScoreModel(net, VPSDE(), prediction="eps"), x)


@pytest.mark.parametrize("overrides", [
    ["experiment=edm_cifar10"], ["experiment=sr3_digits"], ["experiment=ssm_toy"],
    ["experiment=ssm_toy", "loss=fdsm"], ["experiment=ssm_toy", "loss=ism"],
])
def test_recipe_configs_compose_and_build(overrides):
    import os

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with initialize_config_dir(config_dir=os.path.join(root, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides + ["run_dir=/tmp/unused"])
    sde = instantiate(cfg.sde)
    loss = instantiate(cfg.loss, sde=sde)
    assert callable(loss)
    if overrides == ["experiment=edm_cifar10"]:
        assert isinstance(loss, EDMLoss) and (loss.P_mean, loss.P_std, loss.sigma_data) == (-1.2, 1.2, 0.5)
        assert (cfg.data.batch_size, cfg.optim.lr, cfg.model.prediction) == (512, 1e-3, "edm")
        assert (cfg.model.ema_halflife_img, cfg.model.ema_rampup_ratio) == (500000, 0.05)
        assert cfg.lr_schedule.warmup_steps == 19531 and cfg.trainer.gradient_clip_val is None
        assert cfg.callbacks.samples.samplers.heun.steps == 18 and (sde.sigma_min, sde.sigma_max) == (0.002, 80.0)
        active = sorted(k for k, v in cfg.callbacks.samples.samplers.items() if v is not None)
        assert active == ["heun", "heun_churn"]  # the paper's samplers replace the default grids
    if overrides == ["experiment=sr3_digits"]:
        dm = instantiate(cfg.data)
        assert dm.factor == 2 and dm.cond_shape == (1, 8, 8) and cfg.callbacks.samples is None
    if "experiment=ssm_toy" in overrides:
        assert loss.noise_free and cfg.model.prediction == "score"
