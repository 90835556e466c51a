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


@pytest.mark.parametrize("overrides,needle", [
    (["mode=eval", "num_samples=100"], "num_samples=100 is an option of mode=grid / mode=task, not of mode=eval"),
    (["mode=eval", "grid_rows=2"], "grid_rows=2 is an option of mode=grid, not of mode=eval"),
    (["metrics=randproj"], "metrics (its metrics."),
    (["mode=task", "eval.num_samples=10"], "eval.num_samples=10 is an option of mode=eval, not of mode=task"),
    (["mode=grid", "task_options={zeta: 1}"], "task_options={'zeta': 1} is an option of mode=task"),
    (["mode=task"], "mode=task needs task=inpaint|colorize|superres|deblur"),
    (["mode=grid", "interpolate.pairs=2"], "interpolate.pairs=2 is an option of mode=interpolate, not of mode=grid"),
    (["mode=interpolate", "num_samples=8"], "num_samples=8 is an option of mode=grid / mode=task, not of mode=interpolate"),
    (["mode=foo"], "mode='foo' is not supported"),
])
def test_option_of_another_mode_is_an_error(overrides, needle):
    from hydra import compose, initialize_config_dir

    from sgm_lightning.cli import ConfigError, check_sample_mode, config_defaults
    configs = os.path.join(ROOT, "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose(config_name="sample", overrides=overrides)
    with pytest.raises(ValueError) as err:
        check_sample_mode(cfg, config_defaults(configs, "sample"))
    assert needle in str(err.value) and (isinstance(err.value, ConfigError) or "mode='foo'" in needle)


def test_each_mode_accepts_its_own_options():
    from hydra import compose, initialize_config_dir

    from sgm_lightning.cli import check_sample_mode, config_defaults
    configs = os.path.join(ROOT, "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        for mode, overrides in (("grid", ["num_samples=8", "grid_rows=2", "class_label=1", "steps=3"]),
                                ("eval", ["mode=eval", "metrics=randproj", "eval.num_samples=16", "batch_size=8",
                                          "data_overrides={val_fraction: 0.5}"]),
                                ("task", ["mode=task", "task=deblur", "task_method=dps", "num_samples=4",
                                          "task_options={zeta: 1.0}"]),
                                ("interpolate", ["mode=interpolate", "interpolate.pairs=2", "interpolate.n=5",
                                                 "options={rtol: 1e-4}", "data_overrides={val_fraction: 0.5}"])):
            assert check_sample_mode(compose(config_name="sample", overrides=overrides),
                                     config_defaults(configs, "sample")) == mode


def test_option_of_another_mode_exits_2_before_loading(tmp_path):
    res = run_sample(f"ckpt_path={tmp_path}/nope.ckpt", "task=inpaint", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert ("Error: task=inpaint is an option of mode=task, not of mode=grid, which would ignore it. "
            "Use mode=task for it, or drop task.") in res.stderr


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
    res = run_sample(f"ckpt_path={ckpt_path}", "mode=task", "task=inpaint", "task_method=replacement", "steps=3",
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


def test_interpolate_mode_rows_start_and_end_at_the_images(ckpt_path, tmp_path):
    res = run_sample(f"ckpt_path={ckpt_path}", "mode=interpolate", "interpolate.pairs=2", "interpolate.n=4",
                     "options={rtol: 1e-5, atol: 1e-5}", "data_overrides={val_fraction: 0.5}",
                     f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h")
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.getsize(tmp_path / "interpolate_grid.png") > 0
    z = np.load(tmp_path / "interpolate_samples.npz")
    x = torch.from_numpy(z["samples"]).reshape(2, 4, 1, 8, 8)
    settings = json.loads(str(z["settings"]))
    assert settings["split"] == "val" and settings["nfe"] > 0
    # the ends of each row are its two dataset images (encode -> decode through the same PF-ODE; the
    # random-weights score is stiff near t = eps, so the float32 round trip is close, not exact)
    from hydra.utils import instantiate

    from sgm_lightning.evaluation.inverse_tasks import first_images
    images, _ = first_images(instantiate({**DATA, "val_fraction": 0.5}), 4)
    ends = torch.cat([x[:, 0], x[:, -1]])  # the images in the order pair 0 left, pair 1 left, 0 right, 1 right
    dist = (ends.flatten(1)[:, None] - images.flatten(1)[None]).abs().amax(-1)  # (4 ends, 4 images)
    assert torch.equal(dist.argmin(1), torch.arange(4)), dist
    assert dist.diagonal().max() < 0.1, dist
    assert (x[:, 1] - x[:, 0]).abs().max() > 0.1  # the inside of a row is not a copy of its end


@pytest.mark.slow
def test_eval_mode_with_random_projection_features(ckpt_path, tmp_path):
    res = run_sample(f"ckpt_path={ckpt_path}", "mode=eval", "metrics=randproj", "eval.num_samples=16",
                     "metrics.reference_num_samples=64", f"metrics.cache_dir={tmp_path}/cache", "method=ddim",
                     "steps=2", "batch_size=8", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluation" in res.stdout
