"""``train_classifier.py`` (noisy classifier for classifier guidance) and ``sample.py classifier_ckpt=...``:
the run writes a checkpoint that rebuilds from the file alone, resumes bitwise across an epoch boundary,
and guides an unconditional score model; every mismatch between the two models is one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_config, load_script
from test_edges_cli import run_sample
from test_resume_matrix import assert_tree_equal

from sgm_lightning.cli import run_cli

CLF = ["logger=none", "data.batch_size=512", "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false",
       "trainer.enable_model_summary=false", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
       "checkpoint.every_n_train_steps=2"]  # digits: 3 batches of 512 per epoch
UNET = ["classifier_net.base_channels=8", "classifier_net.channel_mults=[1]", "classifier_net.num_groups=4"]


def fit_classifier(out_dir, *overrides):
    net = [] if "classifier_net=mlp" in overrides else UNET
    cfg = compose_config("classifier", [*CLF, *net, f"run_dir={out_dir}", *overrides])
    threads = torch.get_num_threads()
    try:
        return run_cli(load_script("train_classifier").train_classifier)(cfg)
    finally:
        torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("no_debug")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("clf")
    fit_classifier(run, "trainer.max_steps=7")
    return run


@pytest.mark.parametrize("stop", [3, 4])
def test_classifier_resume_across_an_epoch_boundary_is_bitwise(classifier_run, tmp_path, stop):
    """Stopped exactly at the first epoch's end (step 3: the digits' training split makes 3 batches of 512)
    or one step into the second, resumed with ckpt_path=last to step 7 (in the third epoch): the same
    weights, optimizer, RNG and loop state as the uninterrupted 7 steps."""
    first = fit_classifier(tmp_path, f"trainer.max_steps={stop}")
    assert first.num_training_batches == 3
    trainer = fit_classifier(tmp_path, "trainer.max_steps=7", "ckpt_path=last")
    assert trainer.global_step == 7
    a = torch.load(classifier_run / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("global_step", "epoch", "state_dict", "optimizer_states", "rng", "loops"):
        assert_tree_equal(a[key], b[key], key)


def test_classifier_checkpoint_rebuilds_from_the_file_alone(classifier_run):
    from sgm_lightning.training.lit_classifier import load_classifier_checkpoint
    path = classifier_run / "checkpoints" / "last.ckpt"
    clf = load_classifier_checkpoint(str(path))
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not clf.training and clf.classifier.num_classes == 10
    for name, value in clf.state_dict().items():
        assert torch.equal(value, state[name]), name
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    assert clf(x, t).shape == (3, 10)


def test_guided_sampling_labels_and_the_unguided_limit(classifier_run, run_dir, tmp_path, capsys):
    """classifier_scale=0 is the unguided sampler bit for bit; a positive scale changes the samples;
    the labels are stored (cycled over the classifier's 10 classes, or class_label)."""
    base = [f"ckpt_path={run_dir}", "num_samples=4", "method=ddim", "steps=3"]
    plain_run, _ = run_sample(tmp_path, capsys, *base)
    zero, err = run_sample(tmp_path, capsys, *base, f"classifier_ckpt={classifier_run}", "classifier_scale=0")
    guided, _ = run_sample(tmp_path, capsys, *base, f"classifier_ckpt={classifier_run}", "classifier_scale=5",
                           "class_label=7")
    a, b, c = (np.load(r["npz"]) for r in (plain_run, zero, guided))
    np.testing.assert_array_equal(a["samples"], b["samples"])
    assert b["labels"].tolist() == [0, 1, 2, 3] and c["labels"].tolist() == [7, 7, 7, 7]
    assert np.abs(c["samples"] - a["samples"]).max() > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (["classifier_scale=2"], "classifier_scale needs classifier_ckpt="),
    (["class_label=10"], "class_label=10 is not a class of the classifier (10 classes)"),
    (["class_label=-1"], "class_label=-1 is not a class of the classifier"),
    (["classifier_scale=abc"], "scale"),
])
def test_classifier_options_are_checked(classifier_run, run_dir, tmp_path, capsys, overrides, message):
    extra = [] if overrides == ["classifier_scale=2"] else [f"classifier_ckpt={classifier_run}"]
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={run_dir}", "num_samples=2", "steps=2", *extra, *overrides)
    assert code == 2 and message in err, err
    assert not list(tmp_path.glob("*.npz"))


def test_classifier_of_another_sde_or_data_is_refused(run_dir, tmp_path, capsys):
    ve = tmp_path / "ve"
    fit_classifier(ve, "trainer.max_steps=1", "sde=ve")
    code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={run_dir}", f"classifier_ckpt={ve}")
    assert code == 2 and "was trained on x_t of VESDE" in err and "same sde" in err, err
    toy = tmp_path / "toy"
    fit_classifier(toy, "trainer.max_steps=1", "data=toy", "data.name=gaussian_mixture", "classifier_net=mlp",
                   "classifier_net.hidden_dim=8", "data.batch_size=64")
    code, err = run_sample(tmp_path / "out", capsys, f"ckpt_path={run_dir}", f"classifier_ckpt={toy}")
    assert code == 2 and "does not take this model's data of shape (1, 8, 8)" in err, err


def test_checkpoints_of_the_other_kind_are_named(classifier_run, run_dir, tmp_path, capsys):
    from sgm_lightning.training.checkpoint import CheckpointError
    from sgm_lightning.training.lit_classifier import load_classifier_checkpoint
    with pytest.raises(CheckpointError, match="not a noisy-classifier checkpoint.*train_classifier.py"):
        load_classifier_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"))
    code, err = run_sample(tmp_path, capsys, f"ckpt_path={classifier_run}")
    assert code == 2 and "classifier_ckpt=" in err, err  # a classifier as the score model
    with pytest.raises(SystemExit):  # a score checkpoint to resume a classifier run: its net differs
        fit_classifier(tmp_path / "r", "trainer.max_steps=1", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert "net" in capsys.readouterr().err


def test_classifier_needs_labelled_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fit_classifier(tmp_path, "trainer.max_steps=1", "data=toy", "data.name=swiss_roll", "classifier_net=mlp",
                       "data.batch_size=64")  # the swiss roll has no classes
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs a labelled dataset" in err, err
