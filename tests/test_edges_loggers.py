"""Edge cases of the experiment loggers as a researcher watching a dashboard meets them: the W&B run id
under several processes (torchrun starts every rank at once), what W&B is given as config, and the
errors when a logger cannot work."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import pytest


def _id_of_a_rank(run_dir, barrier, queue):
    from sgm_lightning.training.loggers import run_id_for
    barrier.wait()  # every "rank" builds its logger at the same moment, as under torchrun
    queue.put(run_id_for(run_dir))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_ranks_starting_together_agree_on_the_wandb_run_id(tmp_path):
    """Every rank computed the id: when several found no wandb_run_id.txt yet, each wrote its own, so
    the file could hold another rank's id than rank 0's W&B run (measured: 8 of 40 four-process starts
    disagreed), and a resume (ckpt_path=last reads the file) then opened a new W&B run."""
    from sgm_lightning.training.loggers import RUN_ID_FILE
    ctx = mp.get_context("fork")
    for i in range(40):
        run_dir = str(tmp_path / f"run{i}")
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_id_of_a_rank, args=(run_dir, barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        ids = [queue.get(timeout=5) for _ in procs]
        on_disk = open(os.path.join(run_dir, RUN_ID_FILE)).read().strip()
        assert ids == [on_disk] * 4, f"start {i}: ranks got {ids}, the file holds {on_disk}"
        assert sorted(os.listdir(run_dir)) == [RUN_ID_FILE]  # no temporary file left behind
    assert len({open(os.path.join(tmp_path, f"run{i}", RUN_ID_FILE)).read() for i in range(40)}) == 40  # new dir: new id


def test_wandb_not_importable_is_a_clear_error_naming_logger_csv(tmp_path, monkeypatch):
    """Without an importable wandb, make_logger returned Lightning's WandbLogger, which failed at its first
    log inside fit ("import of wandb halted"), after data and model were built, naming no way out."""
    from sgm_lightning.training.loggers import make_logger
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"logger=wandb needs the wandb package.*pip install wandb.*logger=csv"):
        make_logger("wandb", run_dir=str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written
    assert make_logger("none", run_dir=str(tmp_path)) is None
