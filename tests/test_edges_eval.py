"""Edge cases of the evaluation layer (FID / KID / IS, extractors, reference statistics, evaluation
callbacks) found by a held-out-check audit; each test failed before its fix."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sgm_lightning.evaluation.features import IdentityFeatures, RandomProjectionFeatures
from sgm_lightning.evaluation.fid import make_fid_metric
from sgm_lightning.evaluation.fid_callback import FIDCallback
from tests.test_fid_callback import SHAPE, StubModule, ToyData, _Strategy


def _trainer(step=0, rank=0, world_size=1):
    return SimpleNamespace(global_rank=rank, world_size=world_size, global_step=step, is_global_zero=rank == 0,
                           datamodule=ToyData(), strategy=_Strategy(), loggers=[])


# ---------------------------------------------------------------------------- non-finite samples
def test_fd_of_non_finite_features_is_nan_not_a_crash():
    # NaN features used to reach torch.linalg.eigvals, which segfaults the process on CPU (MKL)
    g = torch.Generator().manual_seed(0)
    m = make_fid_metric(IdentityFeatures((3,)))
    m.update(torch.randn(10, 3, generator=g), real=True)
    x = torch.randn(10, 3, generator=g)
    x[0, 0] = float("nan")
    m.update(x, real=False)
    assert math.isnan(float(m.compute()))
    m.reset()  # the real statistics survive; finite samples give a finite value again
    m.update(torch.randn(10, 3, generator=g), real=False)
    assert math.isfinite(float(m.compute()))


class _NaNFirstModule(StubModule):
    """Samples NaN at its first ``generate`` calls (a diverged early sampler), finite afterwards."""

    nan_calls = 2

    def generate(self, num_samples, generator=None, **kw):
        self.calls.append(num_samples)
        x = 0.3 * torch.randn((num_samples, *SHAPE), generator=generator)
        if len(self.calls) <= self.nan_calls:
            x[0] = float("nan")
        return SimpleNamespace(samples=x, nfe=1)


def test_fid_callback_nan_evaluation_is_logged_but_never_the_best(tmp_path):
    cb = FIDCallback(extractor=IdentityFeatures(SHAPE), every_n_steps=1, num_samples=32, batch_size=16,
                     reference_num_samples=128, cache_dir=str(tmp_path))
    module = _NaNFirstModule()
    cb.on_fit_start(_trainer(), module)
    first = cb.evaluate(_trainer(1), module)
    assert math.isnan(first["fd_identity"]) and math.isnan(first["fd_identity_best"])
    second = cb.evaluate(_trainer(2), module)
    assert math.isfinite(second["fd_identity"]) and second["fd_identity_best"] == second["fd_identity"]
    assert cb.best == second["fd_identity"]
