"""The EMA schedule has one source (the module's hyperparameters): half-life in images against the
closed form, its update counter through a checkpoint, and ``ema_decay=0`` really off everywhere."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from sgm_lightning.training.callbacks import EMACallback
from sgm_lightning.training.lit_module import ScoreLitModule
from sgm_lightning.training.state import ema_halflife_beta
from sgm_lightning.losses import DSMLoss
from sgm_lightning.nets.mlp import MLPScoreNet
from sgm_lightning.sde import VPSDE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw) -> ScoreLitModule:
    torch.manual_seed(0)
    sde = VPSDE()
    return ScoreLitModule(net=MLPScoreNet(dim=2, hidden_dim=8, num_layers=1, embedding_dim=8), sde=sde, loss=DSMLoss(sde), data_shape=(2,), **kw)


class _Trainer:  # what EMACallback reads from the trainer
    def __init__(self):
        self.global_step, self.world_size, self.accumulate_grad_batches = 0, 2, 1


def _steps(module, cb, trainer, n, batch, start=0):
    p = next(module.score_model.parameters())
    for i in range(start, start + n):
        with torch.no_grad():
            p.add_(float(i + 1))  # an "optimizer step"
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, batch, i)


def test_halflife_ema_matches_closed_form_and_resumes():
    H, ratio, B = 1000.0, 0.05, 64  # per-rank batch 32 on 2 ranks
    batch = (torch.zeros(32, 2), torch.zeros(32, dtype=torch.long))
    module = tiny(ema_halflife_img=H, ema_rampup_ratio=ratio)
    cb, trainer = EMACallback(), _Trainer()
    cb.on_fit_start(trainer, module)
    p = next(module.score_model.parameters())
    expected = p.detach().clone()
    ckpt = {}
    for i in range(6):
        _steps(module, cb, trainer, 1, batch, start=i)
        h = min(H, i * B * ratio)  # EDM: ema_halflife_nimg = min(..., cur_nimg * ema_rampup_ratio)
        beta = 0.5 ** (B / max(h, 1e-8))
        expected = beta * expected + (1 - beta) * p.detach()
        torch.testing.assert_close(module.ema.shadow_params[0], expected, rtol=1e-6, atol=1e-6)
        if i == 2:
            module.on_save_checkpoint(ckpt)
    assert module.ema.num_updates == 6 and ckpt["ema"]["num_updates"] == 3
    assert ema_halflife_beta(0, B, H, ratio) == 0.0 and ema_halflife_beta(10**6, B, H, ratio) == 0.5 ** (B / H)
    # resume from the step-3 checkpoint: the counter continues the schedule, bitwise
    again = tiny(ema_halflife_img=H, ema_rampup_ratio=ratio)
    again.load_state_dict({k: v for k, v in module.state_dict().items()})
    with torch.no_grad():
        for a, s in zip(again.score_model.parameters(), ckpt["ema"]["shadow_params"]):
            a.copy_(s)  # any weights: only the EMA continuation is compared below
    ref = tiny(ema_halflife_img=H, ema_rampup_ratio=ratio)
    ref.load_state_dict(again.state_dict())
    again.on_load_checkpoint(ckpt)
    ref.on_load_checkpoint(ckpt)
    t1, t2 = _Trainer(), _Trainer()
    t1.global_step = t2.global_step = 3
    for m, t in ((again, t1), (ref, t2)):
        c = EMACallback()
        c.on_fit_start(t, m)
        _steps(m, c, t, 2, batch, start=3)
    assert again.ema.num_updates == 5
    torch.testing.assert_close(again.ema.shadow_params[0], ref.ema.shadow_params[0], rtol=0, atol=0)


def test_ema_decay_zero_is_off_everywhere():
    module = tiny(ema_decay=0.0)
    assert module.ema is None
    cb, trainer = EMACallback(), _Trainer()
    cb.on_fit_start(trainer, module)
    _steps(module, cb, trainer, 2, (torch.zeros(4, 2),))  # no EMA, no error
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    assert "ema" not in ckpt
    g = torch.Generator().manual_seed(0)
    a = module.generate(3, method="ddpm", steps=2, generator=g, use_ema=True).samples
    b = module.generate(3, method="ddpm", steps=2, generator=torch.Generator().manual_seed(0), use_ema=False).samples
    assert torch.equal(a, b)


def test_ema_decay_zero_through_train_py(tmp_path):
    from test_resume_matrix import run
    ck = run(tmp_path, "trainer.max_steps=2", "model.ema_decay=0")
    assert ck["global_step"] == 2 and "ema" not in ck
    assert os.path.exists(tmp_path / "samples" / "ddpm_step2.png")  # grids (use_ema=true) drew from the raw weights
    from sgm_lightning.training.lit_module import load_from_sgm_checkpoint
    assert load_from_sgm_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt")).ema is None


@pytest.mark.parametrize("warmup", [True, False])
def test_foreach_ema_update_equals_torch_ema(warmup):
    """ema_update (one foreach lerp) gives torch-ema's own update, warm-up decay and counter included."""
    from torch_ema import ExponentialMovingAverage
    module = tiny(ema_decay=0.9, ema_warmup=warmup)
    ref = ExponentialMovingAverage(module.score_model.parameters(), decay=0.9, use_num_updates=warmup)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        with torch.no_grad():
            for p in module.score_model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        module.ema_update()
        ref.update(module.score_model.parameters())
        assert module.ema.num_updates == ref.num_updates
        for a, b in zip(module.ema.shadow_params, ref.shadow_params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
