"""`python train.py callbacks=fid`: FID (or a plugged-in Frechet distance) and bits/dim during training,
with the best checkpoint selected on the metric; misconfigurations stop the run at start-up."""

from __future__ import annotations

import csv
import os

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sgm_lightning.evaluation.fid import metric_key
from tests.test_train import ROOT, TINY, run_script


def test_metrics_configs_monitor_the_key_the_callback_logs():
    """callbacks=fid's `best` checkpoint monitors val/<metrics.monitor>: it must be the key FIDCallback logs."""
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["metrics=randproj"])
        assert cfg.metrics.monitor == metric_key(instantiate(cfg.metrics.extractor))
        cfg = compose(config_name="train", overrides=["metrics=inception"])
        assert cfg.metrics.monitor == "fid"  # Inception's key (its weights may be absent here)


def test_train_with_fid_callbacks_logs_and_keeps_best(tmp_path):
    run_dir = tmp_path / "run"
    out = run_script("train.py", *TINY, "logger=csv", "callbacks=fid", "metrics=randproj",
                     f"metrics.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1", "trainer.max_steps=4",
                     "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=32", "callbacks.fid.batch_size=16",
                     "callbacks.fid.method=ddim", "callbacks.fid.steps=3", "callbacks.likelihood.trace=hutchinson",
                     "+callbacks.likelihood.solver_options={rtol:0.01,atol:0.01}", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    fd = [float(r["val/fd_randproj64_s0"]) for r in rows if r.get("val/fd_randproj64_s0")]
    bpd = [float(r["val/bpd"]) for r in rows if r.get("val/bpd")]
    assert len(fd) == 2 and all(v > 0 for v in fd)  # steps 2 and 4
    assert len(bpd) == 2 and all(0 < v < 100 for v in bpd)
    best = [p for p in os.listdir(run_dir / "checkpoints") if p.startswith("best-")]
    best_step = 2 if fd[0] < fd[1] else 4
    assert best == [f"best-step{best_step:07d}.ckpt"]


def test_empty_validation_split_stops_at_start_up(tmp_path):
    out = run_script("train.py", *TINY, "logger=none", "callbacks=fid", "metrics=randproj", "trainer.max_steps=4",
                     "data.val_fraction=0.0", f"hydra.run.dir={tmp_path / 'run'}")  # no validation split
    assert out.returncode == 2
    assert "LikelihoodCallback(split='val') has no data" in out.stderr and "data.val_fraction" in out.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "last.ckpt")
