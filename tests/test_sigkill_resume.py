"""A hard kill (SIGKILL: no handler runs, nothing is saved) in the middle of training: ``ckpt_path=last``
continues from the last periodic checkpoint, in the same W&B run."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sgm_lightning.training.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["logger=wandb", "~callbacks.samples", "data.batch_size=512", "net.base_channels=8", "net.channel_mults=[1]",
        "net.num_groups=4", "model.ema_decay=0.9", "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks.checkpoint.every_n_train_steps=2"]


def _cmd(run_dir, *overrides):
    return [sys.executable, os.path.join(REPO, "train.py"), *ARGS, f"hydra.run.dir={run_dir}", *overrides]


def _env():
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    return env


@pytest.mark.slow  # ~45 s: two train.py start-ups with W&B
def test_sigkill_mid_training_resumes_from_last_checkpoint_and_wandb_run(tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_cmd(run, "trainer.max_steps=100000"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while (not last.exists() or load_checkpoint(last)["global_step"] < 4) and time.time() - t0 < 240:
            assert proc.poll() is None, "training ended before it was killed"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # mid-training: between or during steps, no handler runs
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    step = load_checkpoint(last)["global_step"]
    assert step >= 4 and step % 2 == 0  # the last periodic checkpoint survived whole
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    p = subprocess.run(_cmd(run, f"trainer.max_steps={step + 3}", "ckpt_path=last"), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "weights_only" not in p.stdout + p.stderr  # the safe setting is passed, no misleading message
    ck = load_checkpoint(last)
    assert ck["global_step"] == step + 3 and ck["ema"]["num_updates"] == step + 3
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    assert (run / "wandb_run_id.txt").read_text().strip() == run_id
    runs = glob.glob(str(run / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)
