"""The validation loop: val/loss (DSM on a fixed t grid with fixed noise, EMA weights) is deterministic,
drops with training, leaves the training RNG streams alone, and runs for noise-free models end to end."""

from __future__ import annotations

import functools

import csv
import glob
import os

import lightning as L
import pytest
import torch

from sgm_lightning.losses import DSMLoss
from sgm_lightning.nets.unet import UNet
from sgm_lightning.sde import VPSDE
from sgm_lightning.training.callbacks import EMACallback
from sgm_lightning.training.data.embedded import DigitsDataModule
from sgm_lightning.training.lit_module import ScoreLitModule
from tests.test_train import run_script


def tiny_module(seed: int = 0) -> ScoreLitModule:
    torch.manual_seed(seed)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
               attn_resolutions=[], dropout=0.0, num_groups=4)
    sde = VPSDE()
    return ScoreLitModule(net=net, sde=sde, loss=DSMLoss(sde), data_shape=(1, 8, 8),
                          optimizer=functools.partial(torch.optim.Adam, lr=2e-3),
                          ema_decay=0.99, num_loss_buckets=5, seed=seed)


def trainer(**kw) -> L.Trainer:
    kw.setdefault("callbacks", [EMACallback()])
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_val_loss_is_deterministic_drops_with_training_and_keeps_the_rng_streams():
    dm = DigitsDataModule(batch_size=64, val_fraction=0.05, seed=0)
    module = tiny_module()
    first = trainer().validate(module, datamodule=dm, verbose=False)[0]
    assert set(first) >= {"val/loss", "val/loss_t0.0-0.2", "val/loss_t0.8-1.0"}
    torch.manual_seed(123)
    global_rng, train_rng = torch.get_rng_state(), module.generator.get_state()
    again = trainer().validate(module, datamodule=dm, verbose=False)[0]
    assert again == first  # same weights, same numbers
    assert torch.equal(torch.get_rng_state(), global_rng) and torch.equal(module.generator.get_state(), train_rng)

    fit = trainer(max_steps=100, val_check_interval=100, check_val_every_n_epoch=None)
    fit.fit(module, datamodule=dm)
    trained = fit.callback_metrics["val/loss"].item()
    assert trained < 0.7 * first["val/loss"]
    # EMA weights by default: the logged number is that of the averaged weights, not the raw ones
    assert trainer().validate(module, datamodule=dm, verbose=False)[0]["val/loss"] == pytest.approx(trained)
    raw = trainer(callbacks=[EMACallback(validate_with_ema=False)]).validate(
        module, datamodule=dm, verbose=False)[0]["val/loss"]
    assert raw != pytest.approx(trained, rel=1e-6)

def test_noise_free_ssm_model_trains_end_to_end_with_val_loss_and_best_checkpoint(tmp_path):
    run_dir = str(tmp_path / "ssm")
    out = run_script("train.py", "experiment=ssm_toy", "trainer.max_steps=40", "trainer.val_check_interval=20",
                     "data.n_samples=2000", "logger=csv", "callbacks.checkpoint.monitor=val/loss",
                     "callbacks.checkpoint.every_n_train_steps=null", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for f in glob.glob(os.path.join(run_dir, "**", "metrics.csv"), recursive=True)
            for r in csv.DictReader(open(f)) if r.get("val/loss")]
    assert len(rows) == 2
    assert all(torch.isfinite(torch.tensor(float(r["val/loss"]))) for r in rows)
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "last.ckpt"))
