"""The bad-input catalogue (docs/robustness.md): each bad input gives one clear paragraph, no traceback.

Most cases run ``train.py``'s / ``sample.py``'s own ``main`` body in-process (``run_cli(train)`` on a
config composed by Hydra exactly as on the command line), which is fast; two cases run the scripts
as subprocesses to check the printed ``Error: ...`` line, the exit code 2 and the absent traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TINY_QUIET, compose_config, load_script

from sgm_lightning.training.checkpoint import atomic_save
from sgm_lightning.cli import (ConfigError, check_batch_vs_world, check_data_vs_net, check_num_samples,
                                      run_cli)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [*TINY_QUIET, "trainer.max_steps=2"]


def run_train(tmp_path, capsys, *overrides):
    """(exit code, stderr) of train.py's main body on ``overrides`` (expects an error exit)."""
    cfg = compose_config("train", [*TINY, f"run_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(SystemExit) as e:
        run_cli(load_script("train").train)(cfg)
    return e.value.code, capsys.readouterr().err


def run_sample(tmp_path, capsys, *overrides):
    cfg = compose_config("sample", [f"out_dir={tmp_path / 'out'}", "device=cpu", *overrides])
    with pytest.raises(SystemExit) as e:
        run_cli(load_script("sample").sample_main)(cfg)
    return e.value.code, capsys.readouterr().err


def _env():
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("SGM_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("SGM_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


# ----------------------------------------------------------------------------- checkpoints
def test_missing_checkpoint(tmp_path, capsys):
    ck = tmp_path / "run" / "checkpoints"
    atomic_save({"state_dict": {}}, ck / "step0000002.ckpt")
    code, err = run_train(tmp_path, capsys, f"ckpt_path={ck / 'nope.ckpt'}")
    assert code == 2
    assert "Error: checkpoint file not found" in err and "nope.ckpt" in err and "step0000002.ckpt" in err
    assert "ckpt_path" in err and "Traceback" not in err


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    code, err = run_train(tmp_path, capsys, f"ckpt_path={bad}")
    assert code == 2 and "corrupt or truncated" in err and str(bad) in err


def test_checkpoint_from_incompatible_config(tmp_path, capsys):
    cfg = compose_config("train", [*TINY, f"run_dir={tmp_path}"])
    from omegaconf import OmegaConf

    net = OmegaConf.to_container(cfg.net, resolve=True)
    net.update(in_channels=1, image_size=8, base_channels=16)
    path = tmp_path / "other.ckpt"
    atomic_save({"state_dict": {}, "sgm_config": {"net": net, "sde": OmegaConf.to_container(cfg.sde)}}, path)
    code, err = run_train(tmp_path, capsys, f"ckpt_path={path}")
    assert code == 2
    assert "net.base_channels: checkpoint=16, current=8" in err and "start fresh" in err


def test_sample_missing_checkpoint(tmp_path, capsys):
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={tmp_path / 'none.ckpt'}")
    assert code == 2 and "checkpoint file not found" in err and "none.ckpt" in err


# ----------------------------------------------------------------------------- data vs network
def test_channels_mismatch(tmp_path, capsys):
    code, err = run_train(tmp_path, capsys, "net.in_channels=3")
    assert code == 2 and "channels mismatch" in err and "net.in_channels=1" in err


def test_image_size_incompatible_with_unet(tmp_path, capsys):
    code, err = run_train(tmp_path, capsys, "net.channel_mults=[1,1,1,1,1]")  # 8x8 digits, 4 downsamplings
    assert code == 2 and "8x8" in err and "divisible by 16" in err


def test_image_size_mismatch(tmp_path, capsys):
    code, err = run_train(tmp_path, capsys, "net.image_size=16")
    assert code == 2 and "image size mismatch" in err and "net.image_size=8" in err


def test_dataset_path_without_images(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, err = run_train(tmp_path, capsys, "data._target_=sgm_lightning.training.data.hub.HFImageDataModule",
                          "+data.name=imagefolder", f"+data.root={empty}", "~data.val_fraction")
    assert code == 2 and "no image files" in err and str(empty) in err


# ----------------------------------------------------------------------------- numbers and names
@pytest.mark.parametrize("override, needle", [
    ("sde.beta_max=0", "beta"),
    ("sde.beta_min=-0.1", "beta"),
    ("data.batch_size=0", "batch_size"),
    ("trainer.max_steps=0", "max_steps"),
])
def test_non_positive_numbers(tmp_path, capsys, override, needle):
    code, err = run_train(tmp_path, capsys, override)
    assert code == 2 and err.startswith("Error: ") and needle in err and "Traceback" not in err


def test_non_positive_sigma(tmp_path, capsys):
    code, err = run_train(tmp_path, capsys, "sde=ve", "sde.sigma_min=-1")
    assert code == 2 and "sigma_min" in err


def test_sample_non_positive_steps_and_num_samples(tmp_path, capsys):
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={tmp_path / 'x.ckpt'}", "steps=0")
    assert code == 2 and "steps must be a positive integer, got 0" in err
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={tmp_path / 'x.ckpt'}", "num_samples=-4")
    assert code == 2 and "num_samples must be a positive integer, got -4" in err


def test_batch_not_divisible_by_world_size():
    with pytest.raises(ConfigError, match=r"data.batch_size=10 .* divisible by the world size 4.*8 or 12"):
        check_batch_vs_world(10, 4)
    check_batch_vs_world(12, 4)


def test_num_samples_not_divisible_by_world_size():
    with pytest.raises(ConfigError, match="num_samples=10 must be divisible by the world size 4"):
        check_num_samples(10, world_size=4)
    check_num_samples(12, world_size=4)


def test_data_vs_net_unit():
    check_data_vs_net((3, 32, 32), 3, 32, [1, 2, 2, 2])
    with pytest.raises(ConfigError, match="channels mismatch"):
        check_data_vs_net((1, 28, 28), 3, 28, [1, 2])
    with pytest.raises(ConfigError, match="divisible by 8"):
        check_data_vs_net((1, 28, 28), 1, 28, [1, 2, 2, 2])


def test_unknown_sampler_method():
    from sgm_lightning.sampling import sample
    from sgm_lightning.sde import VPSDE

    with pytest.raises(ValueError, match=r"method.*'foo'.*allowed.*'ode'"):
        sample(lambda x, t: -x, VPSDE(), (2, 3), method="foo", steps=4)


def test_sample_cli_unknown_method_before_loading(tmp_path, capsys):
    """sample.py names the bad method before it touches the (here missing) checkpoint."""
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={tmp_path / 'x.ckpt'}", "method=foo")
    assert code == 2 and "method='foo' is not supported" in err and "'heun'" in err


def test_unknown_sde_and_dataset_names_subprocess(tmp_path):
    for override, group in (("sde=foo", "sde"), ("data=nodata", "data")):
        p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), override, f"hydra.run.dir={tmp_path}"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode != 0
        assert f"Could not find '{group}/" in p.stderr and f"Available options in '{group}'" in p.stderr
        assert "Traceback" not in p.stderr


def test_cli_prints_one_paragraph_and_exit_code_2(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *TINY, "net.in_channels=3",
                        f"hydra.run.dir={tmp_path}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Error: channels mismatch" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *TINY, "net.in_channels=3",
                        f"hydra.run.dir={tmp_path}"], cwd=REPO, env=dict(_env(), SGM_DEBUG="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError" in p.stderr


def test_multi_process_run_needs_use_distributed_sampler_false():
    from sgm_lightning.cli import ConfigError, validate_train_config
    cfg = {"trainer": {"devices": 2, "num_nodes": 1, "use_distributed_sampler": True}, "data": {"batch_size": 8}}
    with pytest.raises(ConfigError, match="use_distributed_sampler must be false"):
        validate_train_config(cfg)
    cfg["trainer"]["use_distributed_sampler"] = False
    validate_train_config(cfg)
    validate_train_config({"trainer": {"devices": 1, "use_distributed_sampler": True}, "data": {"batch_size": 8}})


@pytest.mark.parametrize("data", [{"batch_size": 8, "val_batch_size": 7}, {"base": {"batch_size": 7}},
                                  {"base": {"batch_size": 8, "val_batch_size": 5}}])
def test_every_global_batch_is_checked_against_the_world_size(data):
    """Only data.batch_size was checked: a validation batch or an SR3 pair module's data.base.batch_size that
    does not split over the ranks failed later, on every rank, inside the data module."""
    from sgm_lightning.cli import ConfigError, validate_train_config
    key = "data." + ("base." if "base" in data else "") + ("val_batch_size" if "val_batch_size" in str(data) else
                                                            "batch_size")
    cfg = {"trainer": {"devices": 2, "use_distributed_sampler": False}, "data": data}
    with pytest.raises(ConfigError, match=rf"{key}=\d+ \(the global batch\) must be divisible by the world size 2"):
        validate_train_config(cfg)
