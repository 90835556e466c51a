"""End-to-end plumbing of train.py (tiny U-Net, a few steps, W&B offline) and unit tests of the
LightningModule's EMA / RNG / checkpoint handling.

The subprocess runs are shared by a module-scoped fixture: one fresh run of 4 steps, then a resume
from its last.ckpt to step 6.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_TRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    *TINY_TRAIN, "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=2", "callbacks.samples.every_n_steps=4",
    "callbacks.samples.num_samples=4",
    "callbacks.samples.samplers.unipc.steps=3", "callbacks.samples.samplers.dpm_sde.steps=3",
    "callbacks.samples.samplers.ode.options={rtol:0.1,atol:0.1}",
]


def run_script(script: str, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def wandb_records(run_dir: str) -> list[dict]:
    """All records of the offline W&B runs in run_dir, read back with `wandb leet inspect --json`."""
    wandb_exe = os.path.join(os.path.dirname(sys.executable), "wandb")
    records = []
    for f in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        out = subprocess.run([wandb_exe, "leet", "inspect", "--json", f], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        records += [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
    return records


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    first = run_script("train.py", *TINY, "trainer.max_steps=4", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), weights_only=True)
    run_id = open(os.path.join(run_dir, "wandb_run_id.txt")).read().strip()
    second = run_script("train.py", *TINY, "trainer.max_steps=6", "ckpt_path=last", f"hydra.run.dir={run_dir}")
    assert second.returncode == 0, second.stderr[-3000:]
    return {"run_dir": run_dir, "first_ckpt": ckpt, "run_id": run_id}


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(trained, tmp_path):
    """4 steps + resume to 6 == 6 steps in one go (data order, training noise, optimizer, EMA)."""
    straight = run_script("train.py", *TINY, "trainer.max_steps=6", f"hydra.run.dir={tmp_path}", "logger=none")
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = torch.load(os.path.join(trained["run_dir"], "checkpoints", "last.ckpt"), weights_only=True)
    b = torch.load(os.path.join(tmp_path, "checkpoints", "last.ckpt"), weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for k in b["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    for sa, sb in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        torch.testing.assert_close(sa, sb, rtol=0, atol=0)


def test_checkpoint_holds_ema_rng_and_config(trained):
    ckpt = trained["first_ckpt"]
    assert ckpt["global_step"] == 4
    ema = ckpt["ema"]
    params = [v for k, v in ckpt["state_dict"].items() if k.startswith("score_model.")]
    assert len(ema["shadow_params"]) == len(params)
    assert ema["num_updates"] == 4  # one EMA update per optimizer step
    # the EMA after 4 warm-up updates differs from the raw weights (decay_n < 1) but is close to them
    assert any(not torch.equal(s, p) for s, p in zip(ema["shadow_params"], params))
    assert set(ckpt["sgm_config"]) >= {"net", "sde", "loss"}
    assert ckpt["sgm_config"]["net"]["in_channels"] == 1 and ckpt["sgm_config"]["net"]["image_size"] == 8
    assert isinstance(ckpt["rng"]["generator"][0], torch.Tensor)


def test_png_grids_and_wandb_offline_run(trained):
    run_dir = trained["run_dir"]
    for name in ("unipc", "dpm_sde", "ode"):
        assert os.path.getsize(os.path.join(run_dir, "samples", f"{name}_step4.png")) > 0
        assert os.path.exists(os.path.join(run_dir, "samples", f"{name}_step6.png"))
    records = wandb_records(run_dir)
    text = json.dumps(records)
    assert "train/loss" in text and "train/grad_norm" in text
    for name in ("unipc", "dpm_sde", "ode"):
        assert f"samples/{name}" in text and f"samples/{name}_nfe" in text


def test_resume_continues_step_and_wandb_run(trained):
    run_dir = trained["run_dir"]
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["ema"]["num_updates"] == 6  # EMA state continued, not restarted
    assert open(os.path.join(run_dir, "wandb_run_id.txt")).read().strip() == trained["run_id"]
    runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(trained["run_id"]) for r in runs)


def test_wandb_config_is_the_nested_hydra_config_with_hyperparameters_once(trained):
    """The run's W&B config is the resolved Hydra config, nested by group; the module's hyperparameters
    Lightning logs at fit start added every model.* setting again flat at the top level (and all groups
    again under ``config``): now only what the Hydra config lacks (data_shape, the net resolved from the data)."""
    records = wandb_records(trained["run_dir"])
    config = [r["run"]["config"]["update"] for r in records if r["type"] == "run"][0]
    assert config["model"]["ema_decay"] == 0.9999 and config["sde"]["_target_"].endswith("VPSDE")
    assert config["trainer"]["max_steps"] == 4 and config["logger"]["kind"] == "wandb"
    for update in (r["config"]["update"] for r in records if r["type"] == "config"):
        assert not set(update) & (set(config["model"]) | {"config", "seed"}), sorted(update)
        assert update["net"]["in_channels"] == 1 and update["data_shape"] == [1, 8, 8]


def test_sample_cli_all_methods(trained, tmp_path):
    ckpt = os.path.join(trained["run_dir"], "checkpoints", "last.ckpt")
    methods = ["pc", "ddpm", "ddim", "ode", "heun"]
    res = run_script("sample.py", "-m", f"ckpt_path={ckpt}", f"method={','.join(methods)}", "steps=3",
                     "num_samples=4", "batch_size=2", f"out_dir={tmp_path}", "options={}",
                     f"hydra.sweep.dir={tmp_path}/sweep")
    assert res.returncode == 0, res.stderr[-3000:]
    import numpy as np
    for m in methods:
        assert os.path.getsize(tmp_path / f"{m}_grid.png") > 0
        z = np.load(tmp_path / f"{m}_samples.npz")
        assert z["images"].shape == (4, 8, 8, 1) and z["images"].dtype == np.uint8
        assert z["samples"].shape == (4, 1, 8, 8) and np.isfinite(z["samples"]).all()
        assert json.loads(str(z["settings"]))["method"] == m


def test_bad_config_is_one_clear_error(tmp_path):
    res = run_script("train.py", "optim.lr=-1", f"hydra.run.dir={tmp_path}", "logger=none")
    assert res.returncode != 0
    assert "lr must be > 0" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- in-process unit tests
def _tiny_module(**kw):
    from sgm_lightning.training.lit_module import ScoreLitModule
    from sgm_lightning.losses import DSMLoss
    from sgm_lightning.nets.mlp import MLPScoreNet
    from sgm_lightning.sde import VPSDE
    sde = VPSDE()
    torch.manual_seed(0)
    net = MLPScoreNet(dim=2, hidden_dim=16, num_layers=2, embedding_dim=8)
    return ScoreLitModule(net=net, sde=sde, loss=DSMLoss(sde), data_shape=(2,), **kw)


def test_ema_callback_matches_closed_form():
    """Without warm-up, two updates give shadow = d (d p0 + (1-d) p1) + (1-d) p2 exactly."""
    from types import SimpleNamespace

    from sgm_lightning.training.callbacks import EMACallback
    d = 0.9
    module = _tiny_module(ema_decay=d, ema_warmup=False)
    cb = EMACallback()  # the schedule is the module's (ema_decay, ema_warmup)
    trainer = SimpleNamespace(global_step=0)
    cb.setup(trainer, module, "fit")
    cb.on_fit_start(trainer, module)
    p = next(module.score_model.parameters())
    p0 = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    p1 = p.detach().clone()
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_batch_end(trainer, module, None, None, 1)  # same global_step (accumulation): no update
    with torch.no_grad():
        p.mul_(3.0)
    p2 = p.detach().clone()
    trainer.global_step = 2
    cb.on_train_batch_end(trainer, module, None, None, 2)
    expected = d * (d * p0 + (1 - d) * p1) + (1 - d) * p2
    torch.testing.assert_close(module.ema.shadow_params[0], expected)
    with module.ema_scope():
        torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(p.detach(), p2)  # raw weights restored after the scope


def test_training_noise_generator_resumes_bitwise():
    module = _tiny_module()
    x = torch.randn(8, 2)
    module.loss_fn(module.score_model, x, generator=module.generator)  # advance the stream
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    expected = module.loss_fn(module.score_model, x, generator=module.generator)
    other = _tiny_module()
    other.load_state_dict(module.state_dict())
    other.on_load_checkpoint(ckpt)
    torch.testing.assert_close(other.loss_fn(other.score_model, x, generator=other.generator), expected,
                               rtol=0, atol=0)


def test_bad_module_arguments_raise():
    from functools import partial
    for kw, word in (({"optimizer": "sgd"}, "optimizer"), ({"optimizer": partial(torch.optim.Adam, lr=0)}, "lr"),
                     ({"optimizer": partial(torch.optim.Adam, betas=(1.5, 0.9))}, "beta"),
                     ({"compile_mode": "fastest"}, "compile_mode"), ({"ema_decay": 1.0}, "ema_decay"),
                     ({"cond_drop_prob": 1.5}, "cond_drop_prob")):
        with pytest.raises(ValueError, match=word):
            _tiny_module(**kw)


def test_load_from_sgm_checkpoint_rebuilds_model(trained):
    from sgm_lightning.training.lit_module import load_from_sgm_checkpoint
    path = os.path.join(trained["run_dir"], "checkpoints", "last.ckpt")
    module = load_from_sgm_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][k], rtol=0, atol=0)
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    raw = module.score_model.score(x, t)
    with module.ema_scope():
        ema = module.score_model.score(x, t)
    assert not torch.allclose(raw, ema)  # the EMA weights were restored and differ from the raw ones
    g = torch.Generator().manual_seed(0)
    res = module.generate(4, method="ddpm", steps=3, generator=g, batch_size=3)
    assert res.samples.shape == (4, 1, 8, 8) and torch.isfinite(res.samples).all() and res.nfe > 0


def test_wandb_offline_decision_and_run_id(tmp_path, monkeypatch):
    import time

    from sgm_lightning.training import loggers as lu
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no netrc entry
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t0 = time.perf_counter()
    assert lu.wandb_should_be_offline()  # no key -> offline, decided without touching the network
    assert time.perf_counter() - t0 < 1.0
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    assert lu.wandb_api_key_available()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert lu.wandb_should_be_offline()
    rid = lu.run_id_for(str(tmp_path / "run"))
    assert lu.run_id_for(str(tmp_path / "run")) == rid and len(rid) == 8
    with pytest.raises(ValueError, match="logger"):
        lu.make_logger("mlflow", run_dir=str(tmp_path))


@pytest.mark.parametrize("overrides", [
    ["experiment=ddpmpp_vp_cifar10"], ["experiment=ddpmpp_subvp_cifar10"], ["experiment=ncsnpp_ve_cifar10"],
    ["experiment=ddpm_cifar10"], ["experiment=ncsn_cifar10"], ["sde=vp_cosine", "loss=dsm_likelihood"],
    ["data=toy", "net=mlp", "sde=ve", "loss=ncsn"], ["loss=ddpm", "optim=adamw", "logger=csv", "trainer=cpu"],
    ["optim=adam", "lr_schedule=cosine", "trainer.max_steps=20000"], ["lr_schedule=constant", "model.compile=true", "model.channels_last=true"],
])
def test_configs_compose_and_build(overrides):
    """Every config group option composes, and its SDE and loss build (published values spot-checked)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides + ["run_dir=/tmp/unused"])
    sde = instantiate(cfg.sde)
    assert callable(instantiate(cfg.loss, sde=sde))
    optimizer = instantiate(cfg.optim, _convert_="all")([torch.zeros(1, requires_grad=True)])
    scheduler = instantiate(cfg.lr_schedule)(optimizer)
    assert isinstance(optimizer, torch.optim.Optimizer) and optimizer.param_groups[0]["lr"] > 0
    if "lr_schedule=cosine" in overrides:  # warm-up, peak, then the half cosine down to 0 at max_steps
        f = scheduler.lr_lambdas[0]
        assert (f(0), f(4999), f(5000), f(cfg.trainer.max_steps)) == (1 / 5000, 1.0, 1.0, 0.0)
    if "experiment=ncsnpp_ve_cifar10" in overrides:
        assert cfg.model.ema_decay == 0.999 and type(sde).__name__ == "VESDE" and cfg.sde.sigma_max == 50.0
    if "experiment=ddpm_cifar10" in overrides:
        assert cfg.trainer.max_steps == 800_000 and cfg.net.dropout == 0.1 and cfg.model.ema_decay == 0.9999
    if overrides[0].startswith("experiment=ddpmpp"):
        assert (cfg.optim.lr, cfg.lr_schedule.warmup_steps, cfg.data.batch_size, cfg.trainer.gradient_clip_val) \
            == (2e-4, 5000, 128, 1.0)
