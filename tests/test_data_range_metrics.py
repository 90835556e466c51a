"""Evaluation honours ``data_range``: a model trained on [0, 1] data gets the same Fréchet statistics
and bits/dim as the equivalent model on [-1, 1] data (the metrics map both to the same pixels)."""

from __future__ import annotations

import contextlib

import torch

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.evaluation.features import RandomProjectionFeatures
from sgm_lightning.evaluation.likelihood_callback import batch_bits_per_dim
from sgm_lightning.evaluation.reference import compute_features_statistics
from sgm_lightning.sde import VPSDE
from sgm_lightning.training.data.ranges import to_signed


def test_to_signed_maps_both_ranges_to_the_same_clipped_values():
    x = torch.linspace(-1.5, 1.5, 13)
    torch.testing.assert_close(to_signed(x, "[-1,1]"), x.clamp(-1, 1))
    torch.testing.assert_close(to_signed((x + 1) / 2, "[0,1]"), x.clamp(-1, 1))


def test_reference_statistics_do_not_depend_on_the_data_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    ext = RandomProjectionFeatures(in_shape=(1, 8, 8), dim=16, seed=0)
    mu_a, sig_a, n_a, _ = compute_features_statistics(ext, [x[:32], x[32:]], data_range="[-1,1]")
    mu_b, sig_b, n_b, _ = compute_features_statistics(ext, [(x[:32] + 1) / 2, (x[32:] + 1) / 2], data_range="[0,1]")
    assert n_a == n_b == 64
    torch.testing.assert_close(mu_b, mu_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sig_b, sig_a, rtol=1e-5, atol=1e-6)
    # without the mapping the [0, 1] images would give other statistics
    mu_c, _, _, _ = compute_features_statistics(ext, [(x + 1) / 2], data_range="[-1,1]")
    assert (mu_c - mu_a).abs().max() > 1e-2


class _ExactModule(torch.nn.Module):
    """The parts of ScoreLitModule that ``batch_bits_per_dim`` uses, with an exact mixture score."""

    def __init__(self, mix: GaussianMixture, sde, data_range: str):
        super().__init__()
        self.mix, self.sde, self.hparams = mix, sde, {"data_range": data_range}

    def score_fn(self):
        fn = self.mix.score_fn(self.sde)
        return lambda x, t: fn(x.double(), t.double()).to(x.dtype)

    def ema_scope(self, use_ema=True):
        return contextlib.nullcontext()


def test_bits_per_dim_is_the_same_for_the_same_pixels_in_either_range():
    sde = VPSDE()
    shape = (1, 2, 2)
    # pixel model: x in [-1, 1] ~ N(0, 0.3^2 I); the same pixels in [0, 1] are y = (x + 1) / 2 ~ N(0.5, 0.15^2 I)
    mix_a = GaussianMixture([1.0], [[0.0] * 4], 0.3 ** 2, event_shape=shape)
    mix_b = GaussianMixture([1.0], [[0.5] * 4], 0.15 ** 2, event_shape=shape)
    g = torch.Generator().manual_seed(1)
    k = (mix_a.sample(16, generator=g).float().clamp(-1, 1) * 127.5 + 127.5).round()  # 8-bit pixels
    x_a, x_b = k / 127.5 - 1, k / 255
    opts = dict(trace="exact", rtol=1e-5, atol=1e-5)
    bpd_a, _ = batch_bits_per_dim(_ExactModule(mix_a, sde, "[-1,1]"), x_a, torch.Generator().manual_seed(2), **opts)
    bpd_b, _ = batch_bits_per_dim(_ExactModule(mix_b, sde, "[0,1]"), x_b, torch.Generator().manual_seed(2), **opts)
    # same dequantized pixels, densities related by the Jacobian 2^D: equal bits/dim up to the
    # smoothing of p_eps (sigma(eps) ~ 0.01), which differs slightly between the two scales
    assert (bpd_a - bpd_b).abs().max() < 0.05, (bpd_a, bpd_b)
    # treating [0, 1] data as [-1, 1] (the old behaviour) is off by about one bit per dimension
    wrong, _ = batch_bits_per_dim(_ExactModule(mix_b, sde, "[-1,1]"), x_b, torch.Generator().manual_seed(2), **opts)
    assert (wrong - bpd_b).abs().mean() > 0.5
