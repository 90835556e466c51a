"""Exact resume at any step: a run stopped at step k and resumed with ``ckpt_path=last`` ends bitwise
equal to the uninterrupted run (weights, EMA and its counter, optimizer, LR scheduler, every RNG
stream, Lightning's epoch / batch counters, the data position), for k mid-epoch, at the last batch
of an epoch, right after an epoch boundary and several epochs in; with periodic checkpoints, sample
grids, dropout and (one case) the FID callback switched on.

The runs go through ``train.train`` (what ``python train.py`` runs) in this process, on a tiny U-Net
and the digits with a global batch of 512: 3 batches per epoch.
"""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

import train as train_script
from test_ddp_resume import _assert_tree_equal as assert_tree_equal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 3  # 1797 digits // 512
TINY = [
    "logger=none", "data.batch_size=512", "net.base_channels=8", "net.channel_mults=[1]", "net.num_groups=4",
    "net.dropout=0.1", "model.ema_decay=0.9", "lr_schedule.warmup_steps=3", "trainer.deterministic=true",
    "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "callbacks.checkpoint.every_n_train_steps=2", "callbacks.samples.every_n_steps=3",
    "callbacks.samples.num_samples=4", "~callbacks.samples.samplers", "+callbacks.samples.samplers={ddpm:{method:ddpm,steps:2,options:{}}}",
]
FID = ["callbacks=fid", "metrics=randproj", "metrics.extractor.dim=8", "metrics.reference_num_samples=64",
       "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=8", "callbacks.fid.batch_size=8",
       "callbacks.fid.method=ddpm", "callbacks.fid.steps=2", "callbacks.likelihood=null"]


def run(run_dir, *overrides):
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"run_dir={run_dir}", *overrides])
    threads = torch.get_num_threads()
    try:
        train_script.train(cfg)
    finally:
        torch.set_num_threads(threads)  # train() sets cpu_threads
    return torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), weights_only=True)


def assert_same_run_state(a, b):
    """Everything a continuing run depends on (callbacks' state minus file paths included)."""
    for key in ("global_step", "epoch", "state_dict", "ema", "optimizer_states", "lr_schedulers", "rng", "loops",
                "DigitsDataModule"):
        assert_tree_equal(a[key], b[key], key)
    for name, state in a["callbacks"].items():
        if not name.startswith("ModelCheckpoint"):
            assert_tree_equal(state, b["callbacks"][name], name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    return {n: run(root / f"full{n}", f"trainer.max_steps={n}") for n in (11,)}


@pytest.mark.parametrize("stop", [1, STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1, 3 * STEPS_PER_EPOCH],
                         ids=["first_step", "before_epoch_end", "epoch_end", "after_epoch_end", "three_epochs"])
def test_resume_at_any_step_is_bitwise_exact(uninterrupted, tmp_path, stop):
    part = run(tmp_path, f"trainer.max_steps={stop}")
    assert part["global_step"] == stop
    epoch, batch = divmod(stop, STEPS_PER_EPOCH)
    if batch == 0:  # written at the last batch of an epoch: that epoch, all of its batches
        epoch, batch = epoch - 1, STEPS_PER_EPOCH
    assert part["DigitsDataModule"]["epoch"] == epoch and part["DigitsDataModule"]["batches_consumed"] == batch
    assert part["ema"]["num_updates"] == stop
    resumed = run(tmp_path, "trainer.max_steps=11", "ckpt_path=last")
    full = uninterrupted[11]
    assert full["global_step"] == 11 and full["ema"]["num_updates"] == 11
    assert full["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 11 // STEPS_PER_EPOCH
    assert_same_run_state(full, resumed)


def test_resume_with_fid_callback_is_bitwise_exact(tmp_path):
    fid = [*FID, f"metrics.cache_dir={tmp_path / 'cache'}"]  # the first run computes the statistics, the others load them
    full = run(tmp_path / "full", "trainer.max_steps=5", *fid)
    run(tmp_path / "part", "trainer.max_steps=3", *fid)
    resumed = run(tmp_path / "part", "trainer.max_steps=5", "ckpt_path=last", *fid)
    assert_same_run_state(full, resumed)
    assert any(name.startswith("FIDCallback") for name in full["callbacks"])


def test_checkpoint_after_fit_resumes_like_one_of_the_last_step(tmp_path):
    """max_steps mid-epoch: the file written when fit ends holds the epoch and batch of the last step."""
    ck = run(tmp_path, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=100")
    assert ck["epoch"] == 1 and ck["DigitsDataModule"]["epoch"] == 1
    progress = ck["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert progress["started"] == 2 and progress["processed"] == 1
    assert ck["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] == 1
