"""SR3 conditional super-resolution: the U-Net's image-condition path, the (high-res, low-res) data
wrapper, the conditional sampler and ``sample.py mode=task task=superres task_method=sr3``."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from sgm_lightning.evaluation.inverse_tasks import run_inverse_task
from sgm_lightning.inverse.sr3 import downsample, sr3_condition, sr3_sample, upsample
from sgm_lightning.nets.unet import UNet
from sgm_lightning.parametrization import ScoreModel
from sgm_lightning.sde import VPSDE
from sgm_lightning.training.data.embedded import DigitsDataModule
from sgm_lightning.training.data.superres import SuperResDataModule
from tests.test_sample_cli import DATA, LOSS, NET, SDE, run_sample, write_checkpoint

SR_NET = {**NET, "cond_channels": 1}
SR_DATA = {"_target_": "sgm_lightning.training.data.superres.SuperResDataModule", "factor": 2,
           "downsample": "area", "interpolation": "bicubic", "base": {**DATA, "val_fraction": 0.05}}


def tiny_unet(**kw) -> UNet:
    return UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                attn_resolutions=[], dropout=0.0, num_groups=4, **kw)


def test_unet_concatenates_the_image_condition():
    torch.manual_seed(0)
    net = tiny_unet(cond_channels=1)
    assert net.encoder.conv_in.in_channels == 2 and net.hparams()["cond_channels"] == 1
    x, c, label = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.rand(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        out, other = net(x, label, x_cond=c), net(x, label, x_cond=-c)
    assert out.shape == x.shape and not torch.allclose(out, other)  # the output depends on the condition
    with pytest.raises(ValueError, match="x_cond"):
        net(x, label)
    with pytest.raises(ValueError, match="cond_channels=0"):
        tiny_unet()(x, label, x_cond=c)
    with pytest.raises(ValueError, match="cond_channels"):
        tiny_unet(cond_channels=-1)


def test_superres_data_module_makes_bicubic_conditions_of_avg_pooled_images():
    base = DigitsDataModule(batch_size=32, val_fraction=0.05, seed=0)
    dm = SuperResDataModule(base=base, factor=2)
    dm.setup("fit")
    x, y, cond = next(iter(dm.train_dataloader()))
    assert x.shape == cond.shape == (32, 1, 8, 8) and y.shape == (32,)
    expected = F.interpolate(F.avg_pool2d(x, 2), size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(cond, expected)
    assert len(dm.val_dataset) == len(base.val_dataset) > 0 and dm.data_shape == dm.cond_shape == (1, 8, 8)
    assert "sr2x" in dm.dataset_id
    with pytest.raises(ValueError, match="factor"):
        SuperResDataModule(base=base, factor=3)
    with pytest.raises(ValueError, match="interpolation"):
        SuperResDataModule(base=base, factor=2, interpolation="lanczos")


def test_sr3_helpers_and_inverse_task_methods():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(downsample(x, 2), F.avg_pool2d(x, 2))
    assert upsample(downsample(x, 4), 8, "nearest").shape == x.shape
    out = run_inverse_task(None, VPSDE(), x, task="superres", method="bicubic", steps=1, factor=2)
    torch.testing.assert_close(out["reconstruction"], sr3_condition(x, 2).clamp(-1, 1))
    assert out["nfe"] == 0
    torch.manual_seed(0)
    model = ScoreModel(tiny_unet(cond_channels=1), VPSDE())
    res = sr3_sample(model, VPSDE(), sr3_condition(x, 2), method="ddpm", steps=3,
                     generator=torch.Generator().manual_seed(0))
    assert res.samples.shape == x.shape and res.nfe == 3
    out = run_inverse_task(model, VPSDE(), x, task="superres", method="sr3", steps=3, factor=2,
                           generator=torch.Generator().manual_seed(0))
    assert out["psnr"].shape == (4,) and out["method"] == "sr3"
    with pytest.raises(ValueError, match="superres"):
        run_inverse_task(model, VPSDE(), x, task="inpaint", method="sr3", steps=3)


@pytest.fixture(scope="module")
def sr3_ckpt(tmp_path_factory):
    from hydra.utils import instantiate

    from sgm_lightning.training.lit_module import ScoreLitModule
    sde = instantiate(SDE)
    torch.manual_seed(0)
    module = ScoreLitModule(net=instantiate(SR_NET), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                            ema_decay=0.9, config={"net": SR_NET, "sde": SDE, "loss": LOSS, "data": SR_DATA})
    module.ema_update()
    return write_checkpoint(module, tmp_path_factory.mktemp("sr3") / "last.ckpt")


def test_sample_cli_superres_with_sr3(sr3_ckpt, tmp_path):
    res = run_sample(f"ckpt_path={sr3_ckpt}", "mode=task", "task=superres", "task_method=sr3", "steps=3", "num_samples=4",
                     f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.load(open(os.path.join(tmp_path, "superres_sr3_metrics.json")))
    assert summary["split"] == "val" and summary["num_images"] == 4 and summary["nfe"] == 3
    assert "factor=2" in summary["operator"]
    assert os.path.exists(os.path.join(tmp_path, "superres_sr3_grid.png"))
