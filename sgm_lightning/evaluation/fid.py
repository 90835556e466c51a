"""FID / KID / IS on torchmetrics with plugged-in feature extractors and cached reference statistics.

The Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017, Eq. 6),

    d^2 = ||mu_r - mu_g||^2 + tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^{1/2}),

is computed by ``torchmetrics.image.FrechetInceptionDistance`` (float64 states, summed across ranks
by torchmetrics' own sync); this module only adapts it:

* ``make_fid_metric(extractor)``: the metric on a custom extractor (``num_features`` read from it),
  keeping real statistics across ``reset()``; non-finite features (a diverged sampler's NaN samples)
  give a NaN distance instead of reaching ``torch.linalg.eigvals`` (which crashes the process on CPU).
* ``load_reference_statistics(metric, mu, sigma, n, rank)`` writes cached (mu, Sigma, n) into the
  metric's documented states ``real_features_sum`` = n mu, ``real_features_cov_sum`` =
  (n - 1) Sigma + n mu mu^T, ``real_features_num_samples`` = n, the inverse of what
  ``FrechetInceptionDistance.compute`` does. Only rank 0 holds them (other ranks zeros) so the
  cross-rank *sum* is exact.
* ``metric_key``: ``fid`` / ``kid`` / ``is`` only for the Inception network; ``fd_<name>`` /
  ``kd_<name>`` / ``is_<name>`` for any other feature space.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.data import dim_zero_cat

from sgm_lightning.evaluation.features import extractor_name, is_inception
from sgm_lightning.utils import check_int

log = logging.getLogger(__name__)

_PREFIXES = {"fid": ("fid", "fd"), "kid": ("kid", "kd"), "is": ("is", "is")}


def metric_key(extractor: nn.Module, kind: str = "fid") -> str:
    """Logged name of a metric: ``fid``/``kid``/``is`` for Inception, ``fd_<name>`` etc. otherwise."""
    if kind not in _PREFIXES:
        raise ValueError(f"kind={kind!r} is not supported; allowed values: {', '.join(map(repr, _PREFIXES))}")
    inc, other = _PREFIXES[kind]
    return inc if is_inception(extractor) else f"{other}_{extractor_name(extractor)}"


def _num_features(extractor: nn.Module) -> int:
    n = getattr(extractor, "num_features", None)
    if n is None:
        raise ValueError(f"extractor {type(extractor).__name__} must have an int attribute `num_features` "
                         "(the size of its output features)")
    return int(n)


class _FiniteFrechetDistance(FrechetInceptionDistance):
    """``FrechetInceptionDistance`` returning NaN when a (synced) state is not finite.

    With NaN / Inf features, ``torch.linalg.eigvals`` of the covariance product aborts the whole
    process on CPU (MKL segfault), so one evaluation of a diverged model killed the training run.
    """

    def compute(self) -> torch.Tensor:
        states = (self.real_features_sum, self.real_features_cov_sum, self.fake_features_sum, self.fake_features_cov_sum)
        if all(bool(torch.isfinite(s).all()) for s in states):
            return super().compute()
        log.warning("Frechet distance: the %s features are not finite (NaN / Inf samples?); returning NaN",
                    "real" if not all(bool(torch.isfinite(s).all()) for s in states[:2]) else "generated")
        return torch.tensor(float("nan"), dtype=getattr(self, "orig_dtype", torch.float32), device=self.device)


def make_fid_metric(extractor: nn.Module, **kwargs: Any) -> FrechetInceptionDistance:
    """``FrechetInceptionDistance(feature=extractor)`` with real statistics kept across ``reset()``;
    NaN (not a crash) when the features are not finite.

    The extractor receives images exactly as passed to ``update`` (data range [-1, 1]).
    """
    _num_features(extractor)
    kwargs.setdefault("reset_real_features", False)
    return _FiniteFrechetDistance(feature=extractor, **kwargs)


def _canonical_order(features: torch.Tensor) -> torch.Tensor:
    """The rows of ``features`` in an order that does not depend on the order they came in (sorted by
    a fixed random projection; only equal rows can tie, and their order does not matter)."""
    if features.shape[0] < 2:
        return features
    w = torch.randn(features.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return features[torch.argsort(features.double() @ w.to(features.device), stable=True)]


def _nonempty(state) -> bool:
    return isinstance(state, torch.Tensor) or len(state) > 0


class _OrderFreeKID(KernelInceptionDistance):
    """``KernelInceptionDistance`` whose random subsets do not depend on the order of the features.

    torchmetrics draws the subsets as ``randperm`` indices into the concatenated features, whose order
    is that of the ranks (each holds a round-robin share of the chunks / reference images): under the
    same seed the KID of the same sample set differed between one process and several.
    """

    def compute(self):
        real, fake = self.real_features, self.fake_features
        try:
            # lists of tensors, or one tensor once synced over ranks
            self.real_features = [_canonical_order(dim_zero_cat(real))] if _nonempty(real) else real
            self.fake_features = [_canonical_order(dim_zero_cat(fake))] if _nonempty(fake) else fake
            return super().compute()
        finally:
            self.real_features, self.fake_features = real, fake


def make_kid_metric(extractor: nn.Module, subset_size: int = 1000, subsets: int = 100, **kwargs: Any
                    ) -> KernelInceptionDistance:
    """``KernelInceptionDistance(feature=extractor)`` (Bińkowski et al. 2018, cubic polynomial kernel MMD^2);
    the value depends on the sets of features (and the seed of ``compute_seeded``), not on their order."""
    _num_features(extractor)
    kwargs.setdefault("reset_real_features", False)
    return _OrderFreeKID(feature=extractor, subset_size=subset_size, subsets=subsets, **kwargs)


class _CheckedInceptionScore(InceptionScore):
    """``InceptionScore`` refusing splits of fewer than 2 samples: a split of one sample has
    p(y|x) = p(y) and scores exactly 1, so too many splits gave IS = 1 (the lower bound) silently."""

    def compute(self):
        n = sum(int(f.shape[0]) for f in self.features) if isinstance(self.features, list) else len(self.features)
        if n < 2 * self.splits:
            raise ValueError(f"the Inception Score needs at least 2 x splits = {2 * self.splits} samples, got {n}; "
                             f"use fewer splits (make_is_metric(..., splits=...)) or more samples")
        return super().compute()


def make_is_metric(classifier: nn.Module, splits: int = 10, **kwargs: Any) -> InceptionScore:
    """``InceptionScore(feature=classifier)`` (Salimans et al. 2016): ``classifier`` must return class
    *logits* (B, K); the mean and std over ``splits`` (each of >= 2 samples) of exp E_x KL(p(y|x) || p(y)).
    The FID network (pool3, no logits layer) cannot give an IS."""
    if getattr(classifier, "num_features", None) == 2048 and is_inception(classifier):
        raise ValueError("the FID Inception network stops at pool3 (2048-d) and has no logits; "
                         "pass a classifier returning class logits to compute an Inception Score")
    return _CheckedInceptionScore(feature=classifier, splits=check_int("splits", splits), **kwargs)


def load_reference_statistics(metric: FrechetInceptionDistance, mu: torch.Tensor, sigma: torch.Tensor,
                              n: int, rank: int = 0) -> None:
    """Load real-data statistics (mu (F,), Sigma (F, F) unbiased, n) into ``metric``'s real states.

    On ``rank`` > 0 the real states are zeroed: torchmetrics sums states across ranks, so the total
    equals rank 0's statistics exactly.
    """
    f = metric.real_features_sum.shape[0]
    mu = torch.as_tensor(mu, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if mu.shape != (f,) or sigma.shape != (f, f):
        raise ValueError(f"reference statistics must have shapes ({f},) and ({f}, {f}) for this extractor, "
                         f"got {tuple(mu.shape)} and {tuple(sigma.shape)}")
    if int(n) < 2:
        raise ValueError(f"n (number of reference samples) must be >= 2, got {n!r}")
    device = metric.real_features_sum.device
    mu, sigma = mu.to(device), sigma.to(device)
    if rank == 0:
        metric.real_features_sum = mu * n
        metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
        metric.real_features_num_samples = torch.tensor(int(n), device=device, dtype=torch.long)
    else:
        metric.real_features_sum = torch.zeros_like(mu)
        metric.real_features_cov_sum = torch.zeros_like(sigma)
        metric.real_features_num_samples = torch.tensor(0, device=device, dtype=torch.long)


def load_reference_features(metric: KernelInceptionDistance, features: torch.Tensor, rank: int = 0) -> None:
    """Put cached real features (N, F) into a KID metric's ``real_features`` list state (rank 0 only;
    torchmetrics concatenates the lists of all ranks)."""
    metric.real_features.clear()
    if rank == 0:
        metric.real_features.append(torch.as_tensor(features).to(metric.device, torch.float32))


def statistics_from_states(feature_sum: torch.Tensor, cov_sum: torch.Tensor, n) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mu, unbiased Sigma, n) from the running sums Σf, Σ f f^T kept by ``FrechetInceptionDistance``."""
    n = int(n)
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got n={n}")
    mu = feature_sum.double() / n
    sigma = (cov_sum.double() - n * torch.outer(mu, mu)) / (n - 1)
    return mu, sigma, n


def real_statistics(metric: FrechetInceptionDistance) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mu, Sigma, n) of the real features accumulated in ``metric`` (local states, no sync)."""
    return statistics_from_states(metric.real_features_sum, metric.real_features_cov_sum,
                                  metric.real_features_num_samples)


def fake_statistics(metric: FrechetInceptionDistance) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mu, Sigma, n) of the generated features accumulated in ``metric`` (local states, no sync)."""
    return statistics_from_states(metric.fake_features_sum, metric.fake_features_cov_sum,
                                  metric.fake_features_num_samples)


@contextlib.contextmanager
def seeded_global_rng(seed: int = 0):
    """Run the block with the global RNGs (CPU, current CUDA device) seeded with ``seed`` and restore
    their states afterwards: the block is reproducible and leaves training's random stream untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def compute_seeded(metric, seed: int = 0):
    """``metric.compute()`` under a fixed global RNG seed (KID / IS draw random subsets and splits),
    restoring the RNG state afterwards, so every rank and every run gets the same value."""
    with seeded_global_rng(seed):
        return metric.compute()
