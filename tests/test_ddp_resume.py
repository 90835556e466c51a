"""End-to-end resume / preemption / NaN tests of ``train.py`` (run as a subprocess, tiny U-Net, CPU).

* bitwise resume: a run stopped at step k and resumed from its last.ckpt ends with exactly the same
  weights, EMA, optimizer and LR-scheduler state, global step, RNG streams and data position as the
  uninterrupted run (deterministic CPU kernels, same seed);
* SIGTERM to a running train.py writes last.ckpt and exits with code 143, and the run resumes;
* a NaN loss injected at step k stops the run naming step k and keeps the last good checkpoint;
* DDP with 2 CPU processes (gloo) trains, checkpoints and resumes, also on a different world size
  (slow: each start-up of the two-process group costs ~10 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_QUIET

from sgm_lightning.training.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [*TINY_QUIET, "model.ema_decay=0.9", "lr_schedule.warmup_steps=3", "trainer.deterministic=true",
        "trainer.log_every_n_steps=1"]


def _env():
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("SGM_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def train(run_dir, *overrides, timeout=300, check=True):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *TINY, f"hydra.run.dir={run_dir}", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def last(run_dir):
    return load_checkpoint(os.path.join(run_dir, "checkpoints", "last.ckpt"))


def _assert_tree_equal(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max |diff| {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} differ"
        for k in a:
            _assert_tree_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "ema", "optimizer_states", "lr_schedulers", "rng"):
        _assert_tree_equal(a[key], b[key], key)
    # the data position (resumable sampler / DataModule state) and loop counters
    for key in [k for k in a if "DataModule" in k or k == "datamodule"]:
        _assert_tree_equal(a[key], b[key], key)
    _assert_tree_equal(a["loops"]["fit_loop"]["epoch_loop.batch_progress"],
                       b["loops"]["fit_loop"]["epoch_loop.batch_progress"], "batch_progress")


def test_bitwise_resume_matches_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(full, "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=4")
    train(part, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=4")
    assert last(part)["global_step"] == 4
    train(part, "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=4", "ckpt_path=last")
    a, b = last(full), last(part)
    assert a["global_step"] == 8
    _assert_same_training_state(a, b)
    assert a["ema"]["num_updates"] == 8  # EMA really advanced over all 8 steps in both runs


def _wait_for(path, proc, timeout):
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() - t0 > timeout:
            return False
        time.sleep(0.2)
    return True


DDP2 = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


@pytest.mark.parametrize("world", [pytest.param(1, id="1proc"), pytest.param(2, id="ddp2", marks=pytest.mark.slow)])
def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path, world):
    run = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *TINY, f"hydra.run.dir={run}", "trainer.max_steps=100000",
           "callbacks.checkpoint.every_n_train_steps=2", *(DDP2 if world == 2 else [])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(run / "checkpoints" / "last.ckpt", proc, 240), "training never wrote a checkpoint"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "Preempted" in err
    ck = last(run)
    step = ck["global_step"]
    assert 2 <= step < 100000
    assert sorted(n for n in os.listdir(run / "checkpoints") if n.endswith(".tmp")) == []
    p = train(run, f"trainer.max_steps={step + 2}", "callbacks.checkpoint.every_n_train_steps=1", "ckpt_path=last",
              *(DDP2 if world == 2 else []), timeout=600)
    assert last(run)["global_step"] == step + 2, p.stdout[-2000:]


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    p = train(run, "trainer.max_steps=20", "callbacks.checkpoint.every_n_train_steps=2",
              "+callbacks.inject_nan._target_=sgm_lightning.training.fault_tolerance.InjectNaN",
              "+callbacks.inject_nan.at_step=5", check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Error: the loss is NaN/Inf at global step 5" in p.stderr
    assert "Traceback" not in p.stderr
    ck = last(run)
    assert ck["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


@pytest.mark.slow
def test_ddp_two_processes_train_checkpoint_resume_and_change_world_size(tmp_path):
    run = tmp_path / "ddp"
    ddp = [*DDP2, "callbacks.checkpoint.every_n_train_steps=2"]
    train(run, *ddp, "trainer.max_steps=4", timeout=600)
    ck = last(run)
    assert ck["global_step"] == 4 and ck["ema"]["num_updates"] == 4
    assert sorted(ck["rng"]["generator"]) == [0, 1]  # every rank's training-noise generator
    train(run, *ddp, "trainer.max_steps=6", "ckpt_path=last", timeout=600)
    ck6 = last(run)
    assert ck6["global_step"] == 6 and ck6["ema"]["num_updates"] == 6
    # 4 + 2 on two processes == 6 in one go on two processes, bitwise
    straight = tmp_path / "straight"
    train(straight, *ddp, "trainer.max_steps=6", timeout=600)
    _assert_same_training_state(last(straight), ck6)
    # resume the 2-process checkpoint on one process: continues at step 6 with the stored EMA
    train(run, "trainer.max_steps=7", "callbacks.checkpoint.every_n_train_steps=1", "ckpt_path=last")
    ck7 = last(run)
    assert ck7["global_step"] == 7 and ck7["ema"]["num_updates"] == 7
    # EMA continued from the stored average: one more update is a convex combination of the old
    # shadow and the new weights, e_7 = d e_6 + (1 - d) w_7 with d = min(0.9, (1 + 7) / (10 + 7))
    d = min(0.9, (1 + 7) / (10 + 7))
    from sgm_lightning.training.lit_module import load_from_sgm_checkpoint
    names = [n for n, _ in load_from_sgm_checkpoint(str(run / "checkpoints" / "last.ckpt")).score_model.named_parameters()]
    w7 = [ck7["state_dict"]["score_model." + n] for n in names]
    assert len(w7) == len(ck7["ema"]["shadow_params"])
    for e6, e7, w in zip(ck6["ema"]["shadow_params"], ck7["ema"]["shadow_params"], w7):
        torch.testing.assert_close(e7, d * e6 + (1 - d) * w, rtol=1e-5, atol=1e-6)
