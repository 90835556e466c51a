"""SampleGridCallback: bad sampler specs fail at construction; a numerical failure of one sampler
during training is a warning, not the end of the run."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.training.callbacks.samples import SampleGridCallback
from sgm_lightning.samplers.common import SampleResult
from sgm_lightning.sampling import sample
from sgm_lightning.sde import VPSDE


class _StubModule:
    device = torch.device("cpu")
    num_classes = None
    hparams = SimpleNamespace(data_range="[-1,1]")

    def generate(self, n, method, steps=None, generator=None, y=None, use_ema=True, **options):
        if method == "ode":
            raise RuntimeError("the adaptive ODE solver 'dopri5' could not keep its step size above zero")
        return SampleResult(samples=torch.rand(n, 1, 4, 4, generator=generator) * 2 - 1, nfe=7)


def test_unknown_method_fails_at_construction():
    with pytest.raises(ValueError, match=r"samplers\['fast'\]\.method.*'pc'"):
        SampleGridCallback(samplers={"fast": {"method": "euler"}})


def test_failing_sampler_warns_and_the_others_still_draw(tmp_path):
    cb = SampleGridCallback(every_n_steps=1, num_samples=4, out_dir=str(tmp_path),
                            samplers={"ode": {"method": "ode"}, "pc": {"method": "pc", "steps": 3}})
    trainer = SimpleNamespace(global_step=5, is_global_zero=True, default_root_dir=str(tmp_path), loggers=[])
    with pytest.warns(UserWarning, match=r"sample grid 'ode' \(ode\) failed at step 5.*training continues"):
        paths = cb.draw(trainer, _StubModule())
    assert list(paths) == ["pc"] and os.path.exists(paths["pc"])
    assert sorted(os.listdir(tmp_path)) == ["pc_step5.png"]


def test_ode_step_size_underflow_is_a_clear_runtime_error():
    """A drift that blows up near t = eps (as a barely trained x0-model does) makes dopri5 underflow."""
    sde = VPSDE()
    mix = GaussianMixture([1.0], [[0.0, 0.0]], [1e-12])  # a near-point mass: score ~ -x / sigma(t)^2

    with pytest.raises(RuntimeError, match=r"dopri5.*step size.*solver='rk4'"):
        sample(mix.score_fn(sde), sde, (4, 2), "ode", eps=1e-7, rtol=1e-9, atol=1e-9, solver="dopri5",
               generator=torch.Generator().manual_seed(0))


def test_a_null_sampler_entry_switches_it_off(tmp_path):
    cb = SampleGridCallback(every_n_steps=5, samplers={"ode": None, "pc": {"method": "pc", "steps": 3}},
                            out_dir=str(tmp_path))
    assert list(cb.samplers) == ["pc"]
