"""Edge cases left by the stop-16 audit and found since: guidance on a checkpoint whose null class was
never trained, settings Lightning would silently change (fp16 on CPU), ``group=null``, torchrun / srun run
dirs, a new run in an earlier run's dir, sample.py options a mode would ignore, and options that failed
only at step N (misspelt sampler / solver options, FID and bits/dim on data they cannot measure)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_edges_cli import run_sample

pytestmark = pytest.mark.usefixtures("no_debug")


def _conditional_module(cond_drop_prob):
    from sgm_lightning.losses import DSMLoss
    from sgm_lightning.nets.mlp import MLPScoreNet
    from sgm_lightning.sde import VPSDE
    from sgm_lightning.training.lit_module import ScoreLitModule
    sde = VPSDE()
    return ScoreLitModule(net=MLPScoreNet(dim=2, hidden_dim=8, num_classes=3), sde=sde, loss=DSMLoss(sde),
                          data_shape=(2,), cond_drop_prob=cond_drop_prob)


@pytest.mark.parametrize("scale", [0.0, 2.0, 7.5])
def test_guidance_needs_a_trained_null_class(scale):
    """With cond_drop_prob=0 the null label's embedding never saw a gradient; guidance mixed its
    (untrained) score into the samples without a word."""
    module = _conditional_module(0.0)
    with pytest.raises(ValueError, match="never trained .model.cond_drop_prob=0.*cond_drop_prob > 0"):
        module.generate(2, method="ddim", steps=2, y=1, guidance_scale=scale)
    # scale 1 is the plain conditional score: allowed, and equal to sampling without guidance
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = module.generate(2, method="ddim", steps=2, y=1, guidance_scale=1.0, generator=g()).samples
    b = module.generate(2, method="ddim", steps=2, y=1, generator=g()).samples
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a model trained with label dropout takes any scale
    trained = _conditional_module(0.1)
    assert trained.generate(2, method="ddim", steps=2, y=1, guidance_scale=scale).samples.shape == (2, 2)


def test_guidance_scale_text_is_named_before_the_null_class_check():
    with pytest.raises(ValueError, match="scale"):
        _conditional_module(0.0).generate(2, method="ddim", steps=2, y=1, guidance_scale="strong")


@pytest.mark.parametrize("label", ["3", "-1"])
def test_sample_cli_refuses_the_untrained_null_label(tmp_path, capsys, label):
    from hydra.utils import instantiate
    from test_sample_cli import LOSS, NET, SDE, write_checkpoint

    from sgm_lightning.training.lit_module import ScoreLitModule
    net, sde = {**NET, "num_classes": 3}, instantiate(SDE)
    module = ScoreLitModule(net=instantiate(net), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                            cond_drop_prob=0.0, config={"net": net, "sde": SDE, "loss": LOSS, "data": {}})
    ckpt = write_checkpoint(module, tmp_path / "last.ckpt")
    code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={ckpt}", f"class_label={label}")
    assert code == 2 and f"Error: class_label={label} is the null (unconditional) label" in err, err
    code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={ckpt}", "guidance_scale=3.0")
    assert code == 2 and "never trained (model.cond_drop_prob=0)" in err, err
    paths, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={ckpt}", "class_label=2", "num_samples=2",
                            "steps=1", "method=ddim")
    assert np.load(paths["npz"])["labels"].tolist() == [2, 2], err


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_train_py_keeps_the_asked_precision_on_cpu(tmp_path, precision):
    """trainer.precision=16-mixed on a CPU trained in bf16 (Lightning's fallback, one warning) while the
    stored config said fp16; now the fp16 autocast + grad scaler run, and resume from their checkpoint."""
    import os

    import train as train_script
    from test_resume_matrix import TINY
    from hydra import compose, initialize_config_dir
    from conftest import REPO

    def fit(steps, ckpt=None):
        extra = [f"ckpt_path={ckpt}"] if ckpt else []
        with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[*TINY, f"run_dir={tmp_path}", f"trainer.max_steps={steps}",
                                              "trainer.accelerator=cpu", f"trainer.precision={precision}",
                                              "trainer.limit_val_batches=0", "callbacks.samples=null", *extra])
        threads = torch.get_num_threads()
        try:
            return train_script.train(cfg)
        finally:
            torch.set_num_threads(threads)

    trainer = fit(2)
    plugin = trainer.precision_plugin
    assert plugin.precision == precision
    assert (plugin.scaler is not None) == (precision == "16-mixed")  # fp16 needs its loss scale
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ("MixedPrecision" in ckpt) == (precision == "16-mixed")  # the scaler's state is saved
    trainer = fit(3, "last")
    assert trainer.global_step == 3 and trainer.precision_plugin.precision == precision


def test_group_null_means_no_config_for_optional_groups():
    """``lr_schedule=null`` stopped inside Hydra with a traceback ('Config group override must be a string
    or a list. Got NoneType'); it now means ``~lr_schedule`` (a constant learning rate)."""
    from conftest import compose_config, load_script
    from sgm_lightning.cli import ConfigError
    train = load_script("train")
    argv = ["lr_schedule=null", "trainer.max_steps=3", "experiment=null", "logger=null", "model.x=null"]
    assert train.null_groups_dropped(argv) == ["~lr_schedule", "trainer.max_steps=3", "~logger", "model.x=null"]
    cfg = compose_config("train", train.null_groups_dropped(["lr_schedule=null", "callbacks=null"]))
    assert cfg.get("lr_schedule") is None and cfg.get("callbacks") is None and cfg.optim is not None
    with pytest.raises(ConfigError, match="data=null: a run needs a data config; choose data=<one of .*digits"):
        train.null_groups_dropped(["data=null"])


def test_required_group_null_is_one_error_line_from_the_cli(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    proc = subprocess.run([sys.executable, "train.py", "net=null", f"run_dir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: net=null: a run needs a net config"), proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


@pytest.mark.parametrize("env", [{"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
                                 {"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}])
def test_external_launchers_need_one_run_dir_for_all_ranks(tmp_path, env):
    """Under torchrun / srun each rank runs Hydra itself and took its own time-stamped run dir (README's own
    torchrun lines): other nodes' ranks never saw rank 0's checkpoints, and ckpt_path=last resumed
    different states on different ranks. The launcher is recognised from its environment and the run
    dir must be given; checked before anything is built."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "logger=none", "hydra.output_subdir=null"],
                          cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("Error: ") and "hydra.run.dir=outputs/ddp_run1" in proc.stderr, proc.stderr
    assert not any(p.name.endswith(".ckpt") for p in tmp_path.rglob("*"))


@pytest.mark.slow
def test_torchrun_with_a_shared_run_dir_trains_and_resumes(tmp_path):
    """README's torchrun line with hydra.run.dir: 2 CPU ranks (gloo) train, write one run dir, resume."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "logger=csv",
           "data.batch_size=64", "net.base_channels=8", "net.channel_mults=[1]", "net.num_groups=4",
           "callbacks.samples=null", "trainer.limit_val_batches=0", f"hydra.run.dir={tmp_path}"]
    for steps, extra in ((2, []), (3, ["ckpt_path=last"])):
        proc = subprocess.run([*cmd, f"trainer.max_steps={steps}", *extra], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"[train] done at step {steps}; run dir: {tmp_path}" in proc.stdout
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("mode, extra", [
    (["mode=task", "task=inpaint", "task_method=dps"], "method=ddim"),
    (["mode=task", "task=inpaint", "task_method=replacement"], "options={eta: 1.0}"),
    (["mode=task", "task=inpaint", "task_method=dps"], "batch_size=1"),
    (["mode=interpolate"], "method=ddim"),
    (["mode=interpolate"], "batch_size=1"),
])
def test_options_a_mode_would_ignore_are_refused(tmp_path, capsys, mode, extra):
    """sample.py mode=task ran DPS / replacement / RePaint with its own sampler whatever method= or options=
    said, and mode=task / interpolate ignored batch_size: a run that looked configured was not."""
    from test_sample_cli import DATA, LOSS, NET, SDE, write_checkpoint

    from hydra.utils import instantiate
    from sgm_lightning.training.lit_module import ScoreLitModule
    sde = instantiate(SDE)
    module = ScoreLitModule(net=instantiate(NET), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                            config={"net": NET, "sde": SDE, "loss": LOSS, "data": DATA})
    ckpt = write_checkpoint(module, tmp_path / "last.ckpt")
    size = ["num_samples=2"] if "mode=task" in mode else []
    code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={ckpt}", "steps=2", *size, *mode, extra)
    key = extra.split("=")[0]
    assert code == 2 and err.startswith(f"Error: {key}=") and f"drop {key}" in err, err


def test_sr3_takes_method_and_options_as_its_sampler(tmp_path, capsys):
    """For task_method=sr3, method= and options= were ignored (the SR3 sampler stayed ddpm): they now pick
    the sampler, like task_options.sampler (unipc with 3 steps: NFE 3; ddim eta=1: NFE 3 and other images)."""
    import json

    from test_sr3 import LOSS, SDE, SR_DATA, SR_NET, write_checkpoint
    from hydra.utils import instantiate
    from sgm_lightning.training.lit_module import ScoreLitModule
    sde = instantiate(SDE)
    torch.manual_seed(0)
    module = ScoreLitModule(net=instantiate(SR_NET), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                            config={"net": SR_NET, "sde": SDE, "loss": LOSS, "data": SR_DATA})
    ckpt = write_checkpoint(module, tmp_path / "last.ckpt")
    base = [f"ckpt_path={ckpt}", "mode=task", "task=superres", "task_method=sr3", "steps=3", "num_samples=2"]
    runs = {}
    for name, extra in (("ddpm", []), ("ddim0", ["method=ddim"]), ("ddim1", ["method=ddim", "options={eta: 1.0}"])):
        res, err = run_sample(tmp_path / name, capsys, *base, *extra)
        assert isinstance(res, dict), err
        runs[name] = json.load(open(res["metrics"]))
    assert {k: v["nfe"] for k, v in runs.items()} == {"ddpm": 3, "ddim0": 3, "ddim1": 3}
    assert len({v["psnr_mean"] for v in runs.values()}) == 3  # three different samplers
    code, err = run_sample(tmp_path / "x", capsys, *base, "method=ddim", "task_options={sampler: ddpm}")
    assert code == 2 and "disagree" in err, err


def test_misspelt_sampler_and_solver_options_fail_at_construction():
    """A misspelt option reached the sampler only at the first grid / FID evaluation (step 500 / 5000 by
    default, after training had run without a checkpoint), and log_likelihood passed 'rtoll' to
    torchdiffeq, which only warns and integrates at its default tolerance."""
    from sgm_lightning.evaluation.features import RandomProjectionFeatures
    from sgm_lightning.evaluation.fid_callback import FIDCallback
    from sgm_lightning.evaluation.likelihood_callback import LikelihoodCallback
    from sgm_lightning.likelihood import log_likelihood
    from sgm_lightning.sde import VPSDE
    from sgm_lightning.training.callbacks.samples import SampleGridCallback
    with pytest.raises(ValueError, match=r"samplers\['unipc'\].options: unknown option.*'ordr': did you mean 'order'"):
        SampleGridCallback(samplers={"unipc": {"method": "unipc", "steps": 3, "options": {"ordr": 2}}})
    with pytest.raises(ValueError, match="'rtoll': did you mean 'rtol'"):
        FIDCallback(extractor=RandomProjectionFeatures((1, 8, 8)), method="ode", sampler_options={"rtoll": 1e-3})
    with pytest.raises(ValueError, match="'rtoll': did you mean 'rtol'"):
        LikelihoodCallback(every_n_steps=2, solver_options={"rtoll": 1e-3})
    with pytest.raises(ValueError, match="'step_sze': did you mean 'step_size'"):
        log_likelihood(lambda x, t: -x, VPSDE(), torch.randn(2, 2), solver="rk4", step_sze=0.1)
    # the solvers' real options still pass, and change the result
    a = log_likelihood(lambda x, t: -x, VPSDE(), torch.ones(2, 2), solver="rk4", step_size=0.5)
    b = log_likelihood(lambda x, t: -x, VPSDE(), torch.ones(2, 2), solver="rk4", step_size=0.05)
    assert a.nfe < b.nfe
    SampleGridCallback(samplers={"unipc": {"method": "unipc", "steps": 3, "options": {"order": 2}}})


def test_evaluation_callbacks_refuse_data_they_cannot_measure(tmp_path, capsys):
    """On 2-D toy data, callbacks=fid metrics=randproj failed with 'expected inputs of shape (B, 1, 8, 8),
    got (8, 2)' and, with the extractor fixed, the bits/dim callback with 'images hold values outside the
    8-bit range' at its first evaluation; both now stop at start-up naming the setting to change."""
    from test_edges_cli import run_train
    base = ["data=toy", "net=mlp", "net.hidden_dim=8", "callbacks=fid", "metrics=randproj",
            "metrics.reference_num_samples=64", "callbacks.fid.num_samples=8", "callbacks.fid.batch_size=8",
            "callbacks.samples=null", "trainer.max_steps=2", "data.batch_size=64"]
    code, err = run_train(tmp_path / "a", capsys, *base, "callbacks.likelihood=null", base=["logger=none"])
    assert code == 2 and "set 'metrics.extractor.in_shape=[2]'" in err, err
    code, err = run_train(tmp_path / "b", capsys, *base, "metrics.extractor.in_shape=[2]", base=["logger=none"])
    assert code == 2 and "bits/dim of 8-bit images" in err and "callbacks.likelihood=null" in err, err
    assert not (tmp_path / "b" / "run" / "checkpoints").exists()


def test_colorize_on_grey_images_names_what_to_use():
    from sgm_lightning.inverse.operators import Grayscale
    with pytest.raises(ValueError, match="these images have 1 channel: use a model of colour images"):
        Grayscale(channels=1)
    assert Grayscale(channels=3).channels == 3


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints(tmp_path, capsys):
    """train.py with the run dir of an earlier run and ckpt_path=null started from scratch and overwrote its
    last.ckpt (and mixed its metrics and grids into the earlier run's); so did a start from another run's
    checkpoint file. Resuming the run dir's own checkpoint is unchanged."""
    from test_edges_cli import run_train
    from test_classifier_cli import fit_classifier
    run = tmp_path / "run"
    assert run_train(tmp_path, capsys, "trainer.max_steps=2")[0] is None
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    for extra in ([], [f"ckpt_path={tmp_path / 'elsewhere' / 'checkpoints' / 'last.ckpt'}"]):
        code, err = run_train(tmp_path, capsys, "trainer.max_steps=3", *extra)
        assert code == 2 and "already holds the checkpoints of an earlier run (last.ckpt)" in err, err
        assert "ckpt_path=last" in err and last.read_bytes() == before
    code, err = run_train(tmp_path, capsys, "trainer.max_steps=3", "ckpt_path=last")
    assert code is None, err
    code, err = run_train(tmp_path, capsys, "trainer.max_steps=4", f"ckpt_path={last}")
    assert code is None, err
    assert torch.load(last, weights_only=True)["global_step"] == 4
    fit_classifier(tmp_path / "clf", "trainer.max_steps=1")
    with pytest.raises(SystemExit):
        fit_classifier(tmp_path / "clf", "trainer.max_steps=2")
    assert "already holds the checkpoints" in capsys.readouterr().err
