"""Edge cases of the losses, parametrizations, networks and data modules found by a held-out-check
audit (each test failed before its fix)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sgm_lightning.nets import NoisyClassifier, UNet


# ------------------------------------------------------------------------------------------ networks
def test_group_norm_in_a_float64_or_bf16_network():
    """``net.double()`` normalizes in float64 (bitwise ``nn.GroupNorm``), ``net.to(bfloat16)`` in float32;
    both used to fail with "mixed dtype (CPU): expect parameter to have scalar type of Float"."""
    from sgm_lightning.nets.unet import GroupNorm
    torch.manual_seed(0)
    norm, reference = GroupNorm(4, 16, eps=1e-6), nn.GroupNorm(4, 16, eps=1e-6)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64) * 3 + 1
    assert torch.equal(norm.double()(x), reference.double()(x))
    xb = x.to(torch.bfloat16)
    out = norm.to(torch.bfloat16)(xb)
    want = nn.functional.group_norm(xb.float(), 4, norm.weight.float(), norm.bias.float(), 1e-6).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


def test_float64_unet_and_classifier_match_float32():
    kw = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(3,), dropout=0.0,
              num_groups=4)
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=6, num_classes=3, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, label, y = torch.randn(1, 1, 6, 6), torch.tensor([321.0]), torch.tensor([2])
    out32 = net(x, label, y=y)
    out64 = net.double()(x.double(), label.double(), y=y)
    assert out64.dtype == torch.float64 and out64.shape == (1, 1, 6, 6)
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-5)
    clf = NoisyClassifier(in_channels=1, image_size=6, num_classes=3, **kw).double()
    assert clf(x.double(), label.double()).dtype == torch.float64


# ---------------------------------------------------------------------------------- parametrization
class _Affine(nn.Module):
    def forward(self, x, label, **cond):
        return 0.7 * x + 1e-3 * label.reshape(-1, *[1] * (x.ndim - 1))


@pytest.mark.parametrize("prediction", ["eps", "score", "x0", "v", "edm"])
def test_python_number_and_integer_times_keep_float64_precision(prediction):
    """t given as a Python number or an integer tensor is taken in x's dtype: with float64 data the
    result is bitwise that of a float64 (B,) time (it was computed in float32: errors up to 4e-5)."""
    from sgm_lightning.parametrization import ScoreModel
    from sgm_lightning.sde import VESDE, VPSDE
    x = torch.randn(3, 2, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sde in (VPSDE(), VESDE()):
        model = ScoreModel(_Affine(), sde, prediction)
        for t, value in ((0.1, 0.1), (1, 1.0), (torch.tensor([1, 1, 1]), 1.0)):
            ref = model.outputs(x, torch.full((3,), value, dtype=torch.float64))
            got = model.outputs(x, t)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (type(sde).__name__, t)
        eps = torch.randn_like(x)
        assert torch.equal(model.target(x, eps, 0.1), model.target(x, eps, torch.full((3,), 0.1, dtype=torch.float64)))


# ------------------------------------------------------------------------------------------- losses
def test_ncsn_ladder_outside_the_sdes_range_is_refused():
    """A level the SDE cannot reach used to be clipped silently (``loss.sigmas`` said 100, the loss used 50)."""
    from sgm_lightning.losses import NCSNLoss
    from sgm_lightning.sde import VESDE, VPSDE
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    for sde, kw in ((ve, dict(sigma_max=100.0)), (ve, dict(sigma_min=1e-3)), (VPSDE(), dict(sigma_max=1e3))):
        with pytest.raises(ValueError, match=r"range .*choose sigma_min and sigma_max"):
            NCSNLoss(sde, **kw)
    loss = NCSNLoss(ve, sigma_min=0.05, sigma_max=50.0, num_scales=4)  # inside the range: exact levels
    torch.testing.assert_close(ve.noise_to_signal(loss.times), loss.sigmas, rtol=1e-12, atol=0.0)


def test_importance_sampling_grid_needs_two_points():
    """grid_size=1 made the tabulated normaliser 0 and the loss ~1e-16 whatever the network."""
    from sgm_lightning.losses import DSMLoss
    from sgm_lightning.sde import VPSDE
    with pytest.raises(ValueError, match="grid_size must be an integer >= 2"):
        DSMLoss(VPSDE(), weighting="likelihood", importance_sampling=True, grid_size=1)
