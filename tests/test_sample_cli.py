"""sample.py modes on a checkpoint written in-process (tiny U-Net, random weights): clear errors,
the inverse-task mode, the evaluation mode, and the uint8 conversion of saved samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = {"_target_": "sgm_lightning.nets.unet.UNet", "in_channels": 1, "image_size": 8, "num_classes": None,
       "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
       "num_groups": 4}
SDE = {"_target_": "sgm_lightning.sde.VPSDE", "beta_min": 0.1, "beta_max": 20.0, "N": 1000}
LOSS = {"_target_": "sgm_lightning.losses.DSMLoss", "weighting": "sigma2"}
DATA = {"_target_": "sgm_lightning.training.data.embedded.DigitsDataModule", "image_size": 8, "batch_size": 16,
        "seed": 0, "val_fraction": 0.0}


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    """A checkpoint with the layout train.py writes: state dict, hparams, sgm_config, EMA."""
    from hydra.utils import instantiate

    from sgm_lightning.training.lit_module import ScoreLitModule
    sde = instantiate(SDE)
    torch.manual_seed(0)
    config = {"net": NET, "sde": SDE, "loss": LOSS, "data": DATA}
    module = ScoreLitModule(net=instantiate(NET), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                            ema_decay=0.9, config=config)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01)
    module.ema_update()
    return write_checkpoint(module, tmp_path_factory.mktemp("ckpt") / "last.ckpt")


def write_checkpoint(module, path) -> str:
    """Save ``module`` with the layout train.py writes (state dict, hparams, sgm_config, EMA, RNG)."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 1}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def run_sample(*overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    res = run_sample(f"ckpt_path={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path}")
    assert res.returncode != 0
    assert "nope.ckpt" in res.stderr and "Traceback" not in res.stderr


def test_sample_writes_grid_and_uint8_npz(ckpt_path, tmp_path):
    res = run_sample(f"ckpt_path={ckpt_path}", "method=ddim", "steps=2", "num_samples=6", "batch_size=4",
                     f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h", "seed=3")
    assert res.returncode == 0, res.stderr[-3000:]
    z = np.load(tmp_path / "ddim_samples.npz")
    x = torch.from_numpy(z["samples"])
    # the uint8 images are exactly the clipped, rounded [-1, 1] -> [0, 255] map of the raw samples
    expected = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(z["images"], expected)
    settings = json.loads(str(z["settings"]))
    assert settings["seed"] == 3 and settings["nfe"] > 0 and settings["use_ema"] is True


def test_inverse_task_mode(ckpt_path, tmp_path):
    # dict-valued options are overridable from the command line (they default to null, not a struct {})
    res = run_sample(f"ckpt_path={ckpt_path}", "task=inpaint", "task_method=replacement", "steps=3",
                     "num_samples=4", "task_options={mask: half, snr: 0.1}", "data_overrides={val_fraction: 0.5}",
                     f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h")
    assert res.returncode == 0, res.stderr[-3000:]
    for key in ("truth", "measurement", "reconstruction", "grid"):
        assert os.path.getsize(tmp_path / f"inpaint_replacement_{key}.png") > 0
    assert "PSNR" in res.stdout
    summary = json.loads((tmp_path / "inpaint_replacement_metrics.json").read_text())
    assert summary["split"] == "val" and summary["num_images"] == 4 and summary["checkpoint_step"] == 1
    assert "HalfInpainting" in summary["operator"]
    assert summary["psnr_mean"] == pytest.approx(float(np.mean(summary["psnr"])))
    assert summary["ssim_mean"] == pytest.approx(float(np.mean(summary["ssim"])))


@pytest.mark.slow
def test_eval_mode_with_random_projection_features(ckpt_path, tmp_path):
    res = run_sample(f"ckpt_path={ckpt_path}", "eval.fid=true", "metrics=randproj", "eval.num_samples=16",
                     "metrics.reference_num_samples=64", f"metrics.cache_dir={tmp_path}/cache", "method=ddim",
                     "steps=2", "batch_size=8", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluation" in res.stdout
