"""Edge cases of the precision / compile / optimizer options on CPU (held-out-check audit).

Tiny in-process runs (the U-Net, loader and trainer of ``test_fast_training``)."""

from __future__ import annotations

import functools

import pytest
import torch

from test_fast_training import LOSS, NET, SDE, _loader, _module, _trainer

from sgm_lightning.training.lit_module import ScoreLitModule


def _module_without_ema() -> ScoreLitModule:
    from hydra.utils import instantiate
    torch.manual_seed(0)
    sde = instantiate(SDE)
    return ScoreLitModule(net=instantiate(NET), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                          ema_decay=0.0, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))


# ----------------------------------------------------------------------------- "true" precisions
def test_64_true_trains_with_ema_resumes_bitwise_and_samples_in_float64(tmp_path):
    """trainer.precision=64-true with the default EMA: the float32 shadow weights failed at the first EMA
    update (``_foreach_lerp_`` of float32 and float64); and a resume restored the float64 weights into
    the still-float32 module (Lightning converts it after restoring), rounding them."""
    full = _module()
    _trainer(tmp_path / "full", max_steps=4, precision="64-true").fit(full, _loader(same_batches=True))
    assert all(p.dtype == torch.float64 for p in full.parameters())
    assert all(s.dtype == torch.float64 for s in full.ema.shadow_params)
    first = _module()
    t1 = _trainer(tmp_path / "a", max_steps=2, precision="64-true")
    t1.fit(first, _loader(same_batches=True))
    t1.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)
    assert all(v.dtype == torch.float64 for v in saved["state_dict"].values() if v.is_floating_point())
    resumed = _module()
    _trainer(tmp_path / "b", max_steps=4, precision="64-true").fit(resumed, _loader(same_batches=True),
                                                                   ckpt_path=str(tmp_path / "half.ckpt"))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    for a, b in zip(full.ema.shadow_params, resumed.ema.shadow_params):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    # the sample grids: generate in the weights' dtype (float32 inputs failed in the float64 network)
    samples = full.generate(2, method="ddpm", steps=2, generator=torch.Generator().manual_seed(0)).samples
    assert samples.dtype == torch.float64 and torch.isfinite(samples).all()


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_true_precision_with_ema_is_refused_before_the_first_step(tmp_path, precision):
    """bf16 / fp16 weights cannot carry an EMA (steps (1 - decay)(w - s) below their resolution; before:
    a dtype RuntimeError at the first EMA update): a clear error naming the fixes, before any step."""
    module = _module()
    trainer = _trainer(tmp_path, max_steps=2, precision=precision)
    with pytest.raises(ValueError, match=rf"precision={precision}.*-mixed.*model\.ema_decay=0"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0
    # without an EMA it trains, and samples in the weights' dtype
    module = _module_without_ema()
    trainer = _trainer(tmp_path / "no_ema", max_steps=2, precision=precision)
    trainer.fit(module, _loader())
    assert trainer.global_step == 2 and all(p.dtype != torch.float32 for p in module.parameters())
