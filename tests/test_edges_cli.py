"""Edge cases of the two CLIs and their configs (held-out-check audit): bad trainer settings that
Lightning or torch accept silently or answer with a traceback, sample.py's checkpoint argument (a
run directory, ``last``), and sample.py / evaluate never overwriting the files of an earlier call.

Cases run ``train.py``'s / ``sample.py``'s main body in-process on a config composed by Hydra exactly
as on the command line (``run_cli(...)(cfg)``), which is fast.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_QUIET, TINY_TRAIN, compose_config, load_script

from sgm_lightning.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [*TINY_QUIET, "trainer.max_steps=2"]


def run_train(tmp_path, capsys, *overrides, base=TINY):
    """(exit code, stderr) of train.py's main body; exit code None when it ran to the end."""
    cfg = compose_config("train", [*base, f"run_dir={tmp_path / 'run'}", *overrides])
    try:
        run_cli(load_script("train").train)(cfg)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    return None, capsys.readouterr().err


def run_sample(out_dir, capsys, *overrides):
    """(exit code or the returned paths, stderr) of sample.py's main body."""
    cfg = compose_config("sample", [f"out_dir={out_dir}", "device=cpu", *overrides])
    try:
        return run_cli(load_script("sample").sample_main)(cfg), capsys.readouterr().err
    except SystemExit as e:
        return e.code, capsys.readouterr().err


pytestmark = pytest.mark.usefixtures("no_debug")


# ----------------------------------------------------------------------------- train.py: trainer settings
def test_negative_gradient_clip_val_is_an_error(tmp_path, capsys):
    """A negative clipping bound makes clip / norm < 0: the gradients' sign flips and training ascends
    the loss (torch.nn.utils.clip_grad_norm_ does the same); it must stop before training."""
    code, err = run_train(tmp_path, capsys, "trainer.gradient_clip_val=-1.0")
    assert code == 2 and "Error: trainer.gradient_clip_val=-1.0 must be a number >= 0" in err
    assert "trainer.gradient_clip_val=1.0" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # stopped before the first step


def test_zero_val_check_interval_is_an_error(tmp_path, capsys):
    code, err = run_train(tmp_path, capsys, "trainer.val_check_interval=0")  # Lightning: modulo by zero
    assert code == 2 and "trainer.val_check_interval=0 must be > 0" in err and "limit_val_batches=0" in err


def test_lightning_misconfiguration_is_one_clear_error(tmp_path, capsys):
    code, err = run_train(tmp_path, capsys, "callbacks.checkpoint.every_n_train_steps=-1")
    assert code == 2 and err.startswith("Error: callbacks.checkpoint: Invalid value for every_n_train_steps=-1")
    assert "Traceback" not in err
    if not torch.cuda.is_available():
        code, err = run_train(tmp_path, capsys, "trainer=gpu")
        assert code == 2 and "Error: trainer: No supported gpu backend found!" in err and "trainer=cpu" in err


def test_train_ckpt_path_directory_names_both_fixes(tmp_path, capsys, run_dir):
    code, err = run_train(tmp_path, capsys, f"ckpt_path={run_dir}")
    assert code == 2 and f"ckpt_path={run_dir} is a directory" in err
    assert f"hydra.run.dir={run_dir} ckpt_path=last" in err and f"ckpt_path={run_dir}/checkpoints/last.ckpt" in err


# ----------------------------------------------------------------------------- sample.py: checkpoint argument
def test_sample_from_a_run_directory_uses_its_last_ckpt(tmp_path, capsys, run_dir):
    """ckpt_path=<run_dir> (or its checkpoints/ folder) samples from <run_dir>/checkpoints/last.ckpt:
    bitwise the samples of the file itself."""
    last = str(run_dir / "checkpoints" / "last.ckpt")
    args = ("method=ddim", "steps=2", "num_samples=3", "seed=5")
    samples = []
    for i, ckpt in enumerate((last, run_dir, run_dir / "checkpoints")):
        paths, err = run_sample(tmp_path / str(i), capsys, f"ckpt_path={ckpt}", *args)
        assert isinstance(paths, dict), err
        z = np.load(paths["npz"])
        assert json.loads(str(z["settings"]))["ckpt_path"] == last
        samples.append(z["samples"])
    assert samples[0].shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(samples[1], samples[0])
    np.testing.assert_array_equal(samples[2], samples[0])


def test_sample_ckpt_path_last_and_empty_directory_are_clear_errors(tmp_path, capsys):
    code, err = run_sample(tmp_path / "out", capsys, "ckpt_path=last")
    assert code == 2 and "ckpt_path=last" in err and "ckpt_path=<run_dir>" in err
    (tmp_path / "empty").mkdir()
    code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={tmp_path / 'empty'}")
    assert code == 2 and "is a directory without checkpoints/last.ckpt" in err and "no *.ckpt" in err
    code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={tmp_path / 'nope.ckpt'}")
    assert code == 2 and "checkpoint file not found" in err and "start fresh" not in err  # not train.py's advice


# ----------------------------------------------------------------------------- outputs are never overwritten
def test_rerun_into_the_same_out_dir_keeps_earlier_samples(tmp_path, capsys, run_dir):
    """Two calls into one out_dir (e.g. ``-m seed=0,1 out_dir=...``): the second writes unipc-v1_*,
    the first call's files stay bitwise as they were; the same seed gives bitwise the same samples."""
    ckpt, out = f"ckpt_path={run_dir}", tmp_path / "out"
    first, err = run_sample(out, capsys, ckpt, "num_samples=2", "steps=2", "seed=0")
    assert first == {"grid": str(out / "unipc_grid.png"), "npz": str(out / "unipc_samples.npz")}, err
    png, npz = (out / "unipc_grid.png").read_bytes(), np.load(out / "unipc_samples.npz")["samples"]
    second, _ = run_sample(out, capsys, ckpt, "num_samples=2", "steps=2", "seed=1")
    assert second == {"grid": str(out / "unipc-v1_grid.png"), "npz": str(out / "unipc-v1_samples.npz")}
    assert (out / "unipc_grid.png").read_bytes() == png
    np.testing.assert_array_equal(np.load(out / "unipc_samples.npz")["samples"], npz)
    assert not np.array_equal(np.load(second["npz"])["samples"], npz)  # another seed
    third, _ = run_sample(out, capsys, ckpt, "num_samples=2", "steps=2", "seed=0")
    assert third["npz"] == str(out / "unipc-v2_samples.npz")
    np.testing.assert_array_equal(np.load(third["npz"])["samples"], npz)


def test_evaluate_never_overwrites_an_earlier_samples_file(tmp_path):
    from sgm_lightning.evaluation.run import _new_path
    target = tmp_path / "samples.npz"
    assert _new_path(target) == target
    target.write_bytes(b"earlier")
    assert _new_path(target) == tmp_path / "samples-v1.npz"
    (tmp_path / "samples-v1.npz").write_bytes(b"earlier too")
    assert _new_path(target) == tmp_path / "samples-v2.npz"


def test_task_rerun_into_the_same_out_dir_keeps_earlier_files(tmp_path, capsys, run_dir):
    """mode=task wrote <task>_<method>_{truth,...,grid}.png and _metrics.json over an earlier call's."""
    ckpt, out = f"ckpt_path={run_dir}", tmp_path / "out"
    task = ["mode=task", "task=inpaint", "task_method=replacement", "steps=2", "num_samples=2"]
    first, err = run_sample(out, capsys, ckpt, *task, "seed=0")
    assert first["metrics"] == str(out / "inpaint_replacement_metrics.json"), err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    second, _ = run_sample(out, capsys, ckpt, *task, "seed=1")
    assert second["grid"] == str(out / "inpaint_replacement-v1_grid.png")
    assert second["metrics"] == str(out / "inpaint_replacement-v1_metrics.json")
    assert all((out / name).read_bytes() == data for name, data in before.items())  # untouched


# ----------------------------------------------------------------------------- noise-free score matching
TOY = ["data=toy", "net.hidden_dim=8", "data.batch_size=8"]


@pytest.mark.parametrize("overrides, needle", [
    (["net=noise_free_mlp", "loss=dsm"], "net=noise_free_mlp has no noise-level input"),
    (["net=noise_free_mlp", "loss=ssm", "model.prediction=score", "+callbacks.samples={_target_: "
      "sgm_lightning.training.callbacks.SampleGridCallback}"], "Switch the grids off with callbacks.samples=null"),
    (["net=mlp", "loss=fdsm", "model.prediction=score", "+callbacks.samples={_target_: "
      "sgm_lightning.training.callbacks.SampleGridCallback}"], "Switch the grids off with callbacks.samples=null"),
])
def test_noise_free_score_is_neither_denoised_nor_diffusion_sampled(tmp_path, capsys, overrides, needle):
    """A time-blind network trained with DSM, or reverse-diffusion sample grids of a noise-free score s(x),
    ran without a word (meaningless losses / grids); both stop before training."""
    code, err = run_train(tmp_path, capsys, *TOY, *overrides, base=TINY[3:])  # without the U-Net settings
    assert code == 2 and needle in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_sample_refuses_a_noise_free_checkpoint(tmp_path, capsys):
    """sample.py on an experiment=ssm_toy checkpoint drew 'samples' with a score that has no noise level."""
    code, err = run_train(tmp_path, capsys, *TOY, "experiment=ssm_toy", "trainer.max_steps=1",
                          base=[o for o in TINY[3:] if o != "~callbacks.samples"])  # the experiment sets it null
    assert code is None, err
    for mode in ("mode=grid", "mode=interpolate"):
        code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={tmp_path / 'run'}", mode)
        assert code == 2 and f"sample.py {mode} draws with reverse-diffusion samplers" in err
        assert "sgm_lightning.samplers.langevin" in err
    assert not os.path.exists(tmp_path / "out" / "unipc_grid.png")


# ----------------------------------------------------------------------------- keys a component does not take
@pytest.mark.parametrize("override, needle", [
    ("+data.batchsize=4", "Error: data: BaseDataModule.__init__() got an unexpected keyword argument 'batchsize'"),
    ("+trainer.max_step=3", "Error: trainer: Trainer.__init__() got an unexpected keyword argument 'max_step'"),
    ("+model.ema_decy=0.9", "Error: model.ema_decy is not a setting of model (ScoreLitModule)"),
    ("+optim.learning_rate=0.1", "Error: optim.learning_rate is not a setting of optim (Adam)"),
    ("+lr_schedule.warmup=10", "Error: lr_schedule.warmup is not a setting of lr_schedule (warmup_schedule)"),
])
def test_a_key_the_component_does_not_take_is_one_clear_error(tmp_path, capsys, override, needle):
    """Hydra answers a misspelt key with 'To append to your config use +key=...'; following that advice
    gave a TypeError traceback (model.* at construction; optim.* / lr_schedule.* only once fit began)."""
    code, err = run_train(tmp_path, capsys, override)
    assert code == 2 and err.startswith(needle) and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


# ----------------------------------------------------------------------------- SR3 checkpoints in sample.py
@pytest.fixture(scope="module")
def sr3_ckpt(tmp_path_factory):
    """A checkpoint of a U-Net conditioned on an image (SR3, net.cond_channels=1) on 8x8 digit pairs."""
    from test_sample_cli import DATA, LOSS, NET, SDE, write_checkpoint

    from hydra.utils import instantiate
    from sgm_lightning.training.lit_module import ScoreLitModule
    net = {**NET, "cond_channels": 1}
    data = {"_target_": "sgm_lightning.training.data.superres.SuperResDataModule", "factor": 2, "base": DATA}
    sde = instantiate(SDE)
    torch.manual_seed(0)
    module = ScoreLitModule(net=instantiate(net), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                            config={"net": net, "sde": SDE, "loss": LOSS, "data": data})
    return write_checkpoint(module, tmp_path_factory.mktemp("sr3") / "last.ckpt")


@pytest.mark.parametrize("overrides", [[], ["mode=interpolate"], ["mode=task", "task=inpaint", "task_method=dps"]])
def test_sr3_checkpoint_outside_superres_names_the_sr3_task(tmp_path, capsys, sr3_ckpt, overrides):
    """Sampling an SR3 checkpoint unconditionally failed inside the network ('pass the image condition
    x_cond') with no word on what to run instead."""
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={sr3_ckpt}", *overrides)
    assert code == 2 and "this checkpoint is an SR3 model" in err
    assert "use mode=task task=superres task_method=sr3" in err and "Traceback" not in err


def test_data_overrides_with_a_foreign_key_is_one_clear_error(tmp_path, capsys, sr3_ckpt):
    """The SR3 data module nests its dataset under base: data_overrides={val_fraction: ...} was a traceback."""
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={sr3_ckpt}", "mode=task", "task=superres",
                           "task_method=sr3", "num_samples=2", "steps=1", "data_overrides={val_fraction: 0.5}")
    assert code == 2 and err.startswith("Error: data_overrides={'val_fraction': 0.5} does not fit")
    assert "unexpected keyword argument 'val_fraction'" in err and "base" in err


def test_sr3_task_options_must_match_the_trained_pairs(tmp_path, capsys, sr3_ckpt):
    """task_options={factor: 4} on a checkpoint trained on x2 pairs fed it conditions it never saw, silently."""
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={sr3_ckpt}", "mode=task", "task=superres",
                           "task_method=sr3", "num_samples=2", "steps=1", "task_options={factor: 4}")
    assert code == 2 and "task_options.factor=4, but this SR3 checkpoint was trained on pairs with factor=2" in err


@pytest.mark.parametrize("override, needle", [
    ("sde.beta_min=abc", "Error: sde.beta_min='abc' must be a number (default 0.1)"),
    ("optim.lr=fast", "Error: optim.lr='fast' must be a number (default 0.001)"),
    ("model.ema_decay=high", "Error: model.ema_decay='high' must be a number (default 0.9999)"),
    ("model.compile=maybe", "Error: model.compile='maybe' must be true or false"),
    ("seed=abc", "Error: seed='abc' must be an integer"),
    ("data=imagefolder", "Error: data.root has no value ('???' in its config file): pass data.root=<value>"),
])
def test_text_for_a_number_or_a_missing_value_is_one_clear_error(tmp_path, capsys, override, needle):
    """Text where a number goes was a TypeError traceback from a comparison deep in a constructor
    ('>' not supported between 'str' and 'int'), or an int() error that did not name the key."""
    code, err = run_train(tmp_path, capsys, override)
    assert code == 2 and err.startswith(needle) and "Traceback" not in err, err


@pytest.mark.slow  # ~4-6 s of Hydra compositions on the shared CI cores
def test_every_config_option_passes_the_settings_check():
    """No option of any config group, and no experiment, trips the settings check (all keys are
    arguments of their targets, all numbers are numbers)."""
    check = load_script("train").check_settings
    from hydra import compose, initialize_config_dir
    options = {g: sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs", g))) for g in
               ("data", "sde", "net", "loss", "optim", "lr_schedule", "callbacks", "logger", "model", "experiment")}
    # one composition per row: option i of every group (cycled), then each experiment on its own
    rows = [[f"{g}={o[i % len(o)]}" for g, o in options.items() if g != "experiment"]
            for i in range(max(len(o) for o in options.values()))]
    rows += [[f"experiment={e}"] for e in options["experiment"]]
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        for overrides in rows:
            root = ["data.root=/tmp/images"] if "data=imagefolder" in overrides else []  # the value a user gives
            check(compose("train", overrides=[*overrides, *root, "run_dir=/tmp/unused"]))


# ----------------------------------------------------------------------------- data without a picture
@pytest.mark.parametrize("dim", [1, 3])
def test_sample_keeps_samples_of_data_that_has_no_picture(tmp_path, capsys, dim):
    """Vectors (D,) with D != 2 have no grid picture: sample.py drew the samples, then failed in the
    scatter plot ('points must have shape (B, 2)') before writing the .npz, so they were lost."""
    from test_sample_cli import LOSS, SDE, write_checkpoint

    from hydra.utils import instantiate
    from sgm_lightning.training.lit_module import ScoreLitModule
    net = {"_target_": "sgm_lightning.nets.mlp.MLPScoreNet", "dim": dim, "hidden_dim": 8, "num_layers": 1,
           "embedding_dim": 8}
    sde = instantiate(SDE)
    torch.manual_seed(0)
    module = ScoreLitModule(net=instantiate(net), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(dim,),
                            config={"net": net, "sde": SDE, "loss": LOSS, "data": {}})
    ckpt = write_checkpoint(module, tmp_path / "last.ckpt")
    paths, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={ckpt}", "num_samples=5", "method=ddim", "steps=2")
    assert isinstance(paths, dict) and paths["grid"] is None, err
    z = np.load(paths["npz"])
    expected = module.generate(5, method="ddim", steps=2, generator=torch.Generator().manual_seed(0)).samples
    np.testing.assert_array_equal(z["samples"], expected.numpy())  # the seed's samples, bitwise
    assert os.listdir(tmp_path / "out") == ["ddim_samples.npz"]
    # mode=task needs images: it failed in the operator with 'images must have shape (B, C, H, W), got (2, 3)'
    code, err = run_sample(tmp_path / "task", capsys, f"ckpt_path={ckpt}", "mode=task", "task=inpaint")
    assert code == 2 and f"mode=task restores images (C, H, W), but this checkpoint models data of shape ({dim},)" \
        in err


def test_sample_grid_callback_skips_data_without_a_picture(tmp_path):
    """The training callback raised the same scatter-plot ValueError at its first grid step (and at the
    end of training); it now warns once and draws nothing."""
    from types import SimpleNamespace

    from sgm_lightning.training.callbacks.samples import SampleGridCallback

    class Vectors:  # a module whose data are vectors (3,)
        device, num_classes, data_shape = torch.device("cpu"), None, (3,)
        hparams = SimpleNamespace(data_range="[-1,1]")

        def generate(self, n, **kw):
            raise AssertionError("no samples should be drawn for a grid that cannot be pictured")

    cb = SampleGridCallback(every_n_steps=1, num_samples=4, out_dir=str(tmp_path), samplers={"pc": {"method": "pc"}})
    trainer = SimpleNamespace(global_step=1, is_global_zero=True, default_root_dir=str(tmp_path), loggers=[])
    with pytest.warns(UserWarning, match=r"no sample grids for data of shape \(3,\)"):
        assert cb.draw(trainer, Vectors()) == {}
    trainer.global_step = 2
    assert cb.draw(trainer, Vectors()) == {}  # warned once
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- W&B
def test_wandb_mode_disabled_is_respected(tmp_path, monkeypatch):
    """logger=wandb under WANDB_MODE=disabled turned the user's setting into offline and wrote an
    offline run (and started the W&B service) anyway."""
    import numpy as np

    from sgm_lightning.training.callbacks.samples import log_image
    from sgm_lightning.training.loggers import make_logger
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = make_logger("wandb", run_dir=str(tmp_path))
    assert os.environ["WANDB_MODE"] == "disabled"
    logger.log_hyperparams({"seed": 1})
    logger.log_metrics({"train/loss": 1.0}, step=1)
    log_image(logger, "samples/unipc", np.zeros((8, 8, 1), np.uint8), 1, "caption")
    logger.experiment.finish()
    assert not os.path.exists(tmp_path / "wandb")  # nothing written for W&B


# ----------------------------------------------------------------------------- mode=eval batch size
def test_eval_default_batch_fits_a_small_num_samples(tmp_path, capsys, run_dir):
    """mode=eval with eval.num_samples below 250 and no batch_size stopped with 'num_samples=16 must be
    divisible by batch_size=250' (a key mode=eval refuses); the default batch is now min(250, n), and
    a bad pair names eval.num_samples, batch_size and a divisor to use."""
    common = [f"ckpt_path={run_dir}", "mode=eval", "metrics=randproj", "metrics.reference_num_samples=16",
              f"metrics.cache_dir={tmp_path / 'cache'}", "method=ddim", "steps=1"]
    code, err = run_sample(tmp_path / "a", capsys, *common, "eval.num_samples=300")
    assert code == 2 and ("eval.num_samples=300 must be a multiple of batch_size=250 (the default of mode=eval)"
                          in err) and "batch_size=150" in err
    result, err = run_sample(tmp_path / "b", capsys, *common, "eval.num_samples=4")
    assert isinstance(result, dict), err
    assert (result["eval"]["num_samples"], result["eval"]["batch_size"]) == (4, 4)
    assert np.load(result["eval"]["samples_path"])["images"].shape == (4, 8, 8, 1)


# ----------------------------------------------------------------------------- devices and threads
def test_sample_device_that_is_not_here_is_named(tmp_path, capsys, run_dir):
    """device=cuda on a machine without a GPU was reported as a 'corrupt or truncated' checkpoint;
    device=foo was a RuntimeError traceback."""
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={run_dir}", "device=foo")
    assert code == 2 and "device='foo' is not a device: use device=auto, cpu, cuda" in err
    n = torch.cuda.device_count()
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={run_dir}", f"device=cuda:{n}")
    assert code == 2 and f"device=cuda:{n} but" in err and "device=cpu" in err and "corrupt" not in err


@pytest.mark.parametrize("value", ["-1", "abc"])
def test_bad_cpu_threads_is_one_clear_error(tmp_path, capsys, value):
    code, err = run_train(tmp_path, capsys, f"cpu_threads={value}")
    shown = value if value == "-1" else repr(value)
    assert code == 2 and f"Error: cpu_threads={shown} must be a positive integer" in err


def test_class_label_outside_the_classes_names_class_label(tmp_path, capsys):
    """class_label=5 on a 3-class checkpoint failed inside the network ('y must lie in 0..2') after the
    sampling had started, without naming class_label."""
    from test_sample_cli import LOSS, NET, SDE, write_checkpoint

    from hydra.utils import instantiate
    from sgm_lightning.training.lit_module import ScoreLitModule
    net, sde = {**NET, "num_classes": 3}, instantiate(SDE)
    module = ScoreLitModule(net=instantiate(net), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                            config={"net": net, "sde": SDE, "loss": LOSS, "data": {}})
    ckpt = write_checkpoint(module, tmp_path / "last.ckpt")
    code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={ckpt}", "class_label=5")
    assert code == 2 and err.startswith("Error: class_label=5 is not a class of this checkpoint (3 classes: 0..2")
    for label in ("2.5", "abc"):  # 2.5 was silently class 2; 'abc' an int() error naming nothing
        code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={ckpt}", f"class_label={label}")
        assert code == 2 and "must be a whole class number 0..2" in err, err
    assert not os.path.exists(tmp_path / "out" / "unipc_samples.npz")
    paths, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={ckpt}", "class_label=2", "num_samples=2",
                            "steps=1", "method=ddim")
    assert np.load(paths["npz"])["labels"].tolist() == [2, 2], err


def test_a_sampler_error_is_a_line_of_its_own(tmp_path, capsys, run_dir):
    """An error raised while sampling (here an option the sampler does not take) was printed on the
    progress bar's unfinished line ('...step/s]<ESC>[AError: ...'), not as a line of its own."""
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={run_dir}", "options={snr: 0.16}", "steps=2")
    assert code == 2
    assert "Error: unknown option(s) ['snr'] for method='unipc'" in err.splitlines()[-2]  # then the SGM_DEBUG hint
    assert err.splitlines()[-2].startswith("Error: ")


def test_a_server_that_accepts_but_never_answers_is_not_reachable():
    """With an API key, W&B went online whenever a TCP connect to api.wandb.ai:443 succeeded, which a
    proxy or firewall that accepts and then drops everything also allows (wandb.init then waits ~100 s);
    reachable now means a TLS handshake within the timeout."""
    import socket
    import time

    from sgm_lightning.training.loggers import network_reachable
    with socket.socket() as server:  # accepts connections (the kernel's backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        t0 = time.perf_counter()
        assert not network_reachable("127.0.0.1", server.getsockname()[1], timeout=0.3)
        assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("override, needle", [
    ("interpolate.pairs=0", "interpolate.pairs must be a positive integer, got 0"),
    ("interpolate.n=1", "interpolate.n (points per row, both ends included) must be an integer >= 2, got 1"),
])
def test_interpolate_counts_are_checked(tmp_path, capsys, run_dir, override, needle):
    """interpolate.pairs=0 ran the probability-flow ODE on no images and never ended (killed after 120 s);
    interpolate.n=1 was refused as 'n must be ...' without naming interpolate.n."""
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={run_dir}", "mode=interpolate", override)
    assert code == 2 and f"Error: {needle}" in err


def test_sr3_data_without_its_experiment_and_a_classless_net_asked_for_classes(tmp_path, capsys):
    """data=digits_sr alone crashed with omegaconf's "Key 'cond_channels' is not in struct" traceback (the
    settings check merged the filled-in net config into the struct config); experiment=ssm_toy with
    model.class_conditional=true failed the same way, then with NoiseFreeMLP's unexpected num_classes."""
    sr_base = [o for o in TINY if not o.startswith("data.batch_size")] + ["data.base.batch_size=8"]
    code, err = run_train(tmp_path / "sr", capsys, "data=digits_sr", "trainer.max_steps=1", base=sr_base)
    assert code is None, err
    code, err = run_train(tmp_path / "ssm", capsys, "experiment=ssm_toy", "model.class_conditional=true",
                          "trainer.max_steps=1", "logger=none", base=[])
    assert code == 2 and "NoiseFreeMLP takes no class labels" in err and "model.class_conditional=false" in err


def test_sr3_run_with_grids_trains_and_with_fid_stops_before_training(tmp_path, capsys):
    """An SR3 network with the sample grids or callbacks=fid on trained to the first grid / FID step and
    stopped there ('pass the image condition x_cond'), without a checkpoint: the training was lost.
    Grids are now skipped with a warning, evaluations refused at start-up."""
    base = [o for o in TINY_TRAIN if not o.startswith("data.batch_size")] + ["data.base.batch_size=8", "logger=none"]
    code, err = run_train(tmp_path / "grids", capsys, "data=digits_sr", "trainer.max_steps=2",
                          "callbacks.samples.every_n_steps=1", "callbacks.samples.num_samples=2", base=base)
    assert code is None and (tmp_path / "grids" / "run" / "checkpoints" / "last.ckpt").exists(), err
    code, err = run_train(tmp_path / "fid", capsys, "data=digits_sr", "trainer.max_steps=2", "callbacks=fid",
                          "metrics=randproj", "callbacks.fid.every_n_steps=1", "~callbacks.samples", base=base)
    assert code == 2 and "conditioned on an image (SR3)" in err and "callbacks.fid=null" in err
