"""Multi-process (DDP) edge cases: validation sharding over any world size, and (slow, 2 CPU processes
with gloo through ``train.py``) resuming a 1-process run on 2 processes with validation and sample grids on.

The validation loader shards without repeats (``ResumableBatchSampler(pad=False)``): padding like
``DistributedSampler`` counted some examples twice in the cross-rank mean ``val/loss``. ``ScoreLitModule``
reduces ``val/loss`` as float64 sums and counts, because Lightning's ``sync_dist`` mean of the integer
batch-size weights is floored on gloo, exact only while every rank holds the same number of examples
(measured: 11 held-out digits on 2 ranks, logged 1.0612 against the exact 0.9647).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import lightning as L
import torch
from torch.utils.data import Dataset


class _Labelled(Dataset):
    """x = [i, 0], y = i: the label tells which example a batch holds."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i), 0.0]), i


def _val_shards(n_val: int, val_batch_size: int, world_size: int) -> list[list[list[int]]]:
    """The validation batches (as lists of example ids) of every rank of a ``world_size`` layout."""
    from sgm_lightning.training.data import MapDataModule
    shards = []
    for rank in range(world_size):
        dm = MapDataModule(dataset=_Labelled(n_val), val_dataset=_Labelled(n_val), input_range=None,
                           batch_size=world_size, val_batch_size=val_batch_size, seed=3)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, current_epoch=0)
        loader = dm.val_dataloader()
        batches = [y.tolist() for _, y in loader]
        assert len(batches) == len(loader)
        shards.append(batches)
    return shards


@pytest.mark.parametrize("n_val,val_batch_size,world_size", [
    (11, 8, 2),  # last global batch of 3 examples over 2 ranks: 2 + 1
    (9, 8, 2),   # last global batch of 1 example < 2 ranks: merged into the one before
    (13, 6, 3),  # 6 + 6 + 1: the single example joins the second batch
    (5, 8, 4),   # one global batch smaller than batch_size: 1 + 1 + 1 + 2
    (10, 4, 2),   # divisible: nothing changes
    (7, 3, 1),    # one process: dataset order in chunks of 3
])
def test_validation_shards_hold_every_example_once_and_equal_batch_counts(n_val, val_batch_size, world_size):
    shards = _val_shards(n_val, val_batch_size, world_size)
    ids = [i for rank in shards for batch in rank for i in batch]
    # each held-out example exactly once over all ranks: the weighted cross-rank mean is the set's mean
    assert sorted(ids) == list(range(n_val)), shards
    # the same number of non-empty batches on every rank (no rank waits for the others' metric sync)
    assert len({len(rank) for rank in shards}) == 1
    per_rank = val_batch_size // world_size
    assert all(1 <= len(b) <= per_rank + 1 for rank in shards for b in rank), shards
    if world_size == 1:
        assert shards[0] == [list(range(i, min(i + per_rank, n_val))) for i in range(0, n_val, per_rank)]


def test_validation_set_smaller_than_world_size_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"has 3 example\(s\), fewer than the world size 4: every rank needs at "
                                         r"least one\. Hold out more examples .*data\.val_fraction"):
        _val_shards(3, 4, 4)


def test_sampler_pad_false_never_repeats_and_keeps_equal_batch_counts():
    """``pad=True`` (the default) keeps DistributedSampler's wrap-around; ``pad=False`` never repeats an
    example, and every rank still yields the same number of non-empty batches."""
    from sgm_lightning.training.data.sampler import ResumableBatchSampler
    padded = [list(ResumableBatchSampler(9, 4, r, 2, seed=0, shuffle=False, drop_last=False)) for r in range(2)]
    assert padded == [[[0, 1, 2, 3], [8]], [[4, 5, 6, 7], [0]]]
    exact = [list(ResumableBatchSampler(9, 4, r, 2, seed=0, shuffle=False, drop_last=False, pad=False))
             for r in range(2)]
    assert exact == [[[0, 1, 2, 3]], [[4, 5, 6, 7, 8]]]
    for n, bs, ws in ((11, 4, 2), (13, 2, 3), (5, 2, 4), (64, 8, 4), (65, 8, 4), (67, 8, 4), (3, 1, 3)):
        shards = [ResumableBatchSampler(n, bs, r, ws, seed=1, shuffle=True, drop_last=False, pad=False)
                  for r in range(ws)]
        batches = [list(s) for s in shards]
        assert sorted(i for rank in batches for b in rank for i in b) == list(range(n)), (n, bs, ws)
        assert len({len(rank) for rank in batches}) == 1 and all(len(s) == len(batches[0]) for s in shards)
        assert all(1 <= len(b) <= bs + 1 for rank in batches for b in rank), (n, bs, ws, batches)
    with pytest.raises(ValueError, match="num_samples=1 examples cannot be split over world_size=2 ranks"):
        ResumableBatchSampler(1, 4, 0, 2, seed=0, drop_last=False, pad=False)


# ---------------------------------------------------------------------------------------- DDP (slow)
def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ddp_resume_of_one_process_run_with_exact_validation_and_one_grid(tmp_path):
    """A 1-process checkpoint resumed on 2 processes continues at its step, data position and EMA;
    val/loss (11 held-out digits) is the exact mean over the ranks' validation batches; the sample grid
    is written once, by rank 0."""
    from conftest import TINY_TRAIN
    from test_ddp_resume import DDP2, REPO, _env, last

    from sgm_lightning.training.data import DigitsDataModule
    from sgm_lightning.training.lit_module import ScoreLitModule, load_from_sgm_checkpoint

    run = tmp_path / "run"
    # test_ddp_resume's settings, with the CSV logger and a cheap sample grid instead of none
    common = [*TINY_TRAIN, "model.ema_decay=0.9", "lr_schedule.warmup_steps=3", "trainer.deterministic=true",
              "trainer.log_every_n_steps=1", "logger=csv", "data.val_fraction=0.0062", "trainer.val_check_interval=2",
              "callbacks.checkpoint.every_n_train_steps=2", "callbacks.samples.every_n_steps=0",
              "callbacks.samples.num_samples=4", "~callbacks.samples.samplers",
              "+callbacks.samples.samplers={ddpm:{method:ddpm,steps:2,options:{}}}"]

    def train(*overrides, timeout=300):
        cmd = [sys.executable, os.path.join(REPO, "train.py"), *common, f"hydra.run.dir={run}", *overrides]
        p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        return p

    train("trainer.max_steps=2")
    one = last(run)
    assert one["global_step"] == 2 and sorted(one["rng"]["generator"]) == [0]
    p = train(*DDP2, "trainer.max_steps=4", "ckpt_path=last", timeout=600)
    ck = last(run)
    assert ck["global_step"] == 4 and ck["ema"]["num_updates"] == 4
    assert sorted(ck["rng"]["generator"]) == [0, 1]
    dm_key = next(k for k in ck if "DataModule" in k)
    assert ck[dm_key]["batches_consumed"] == 4 and ck[dm_key]["epoch"] == 0
    # one grid per run end, written by rank 0 only, and one "sample grid" line
    assert sorted(os.listdir(run / "samples")) == ["ddpm_step2.png", "ddpm_step4.png"]
    assert p.stdout.count("[train] sample grid:") == 1

    # val/loss at step 4 == the mean of the module's validation losses over every entry of the ranks'
    # validation batches, each rank's evaluated with that rank's noise (EMA weights, as EMACallback swaps
    # them in): the cross-rank reduction happens exactly once and weighs every entry equally. (The
    # entries include one padded repeat of the 11 held-out digits while val_dataloader pads.)
    rows = [r for r in _metrics(run) if r.get("val/loss")]
    logged = float(rows[-1]["val/loss"])
    logged_t0 = float(rows[-1]["val/loss_t0.0-0.1"])
    module = load_from_sgm_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    dm = DigitsDataModule(image_size=8, batch_size=8, val_fraction=0.0062, seed=42)
    total, total_t0, count = 0.0, 0.0, 0
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
        with mock.patch.object(ScoreLitModule, "global_rank", new_callable=mock.PropertyMock, return_value=rank), \
                torch.no_grad(), module.ema_scope():
            for i, batch in enumerate(dm.val_dataloader()):
                losses = module.validation_losses(batch, i).double()  # (K, B)
                total += losses.mean(0).sum().item()
                total_t0 += losses[0].sum().item()
                count += losses.shape[1]
    assert len(dm.val_dataset) == 11 and count in (11, 12)
    assert logged == pytest.approx(total / count, rel=1e-5)
    assert logged_t0 == pytest.approx(total_t0 / count, rel=1e-5)


def test_ranks_get_their_own_global_rng_stream_and_rank_0_keeps_seed_everythings():
    """seed_everything(seed) gave every rank the same global CPU RNG: dropout masks were identical on all
    ranks. At train start ranks > 0 reseed from (seed, step, rank); a resumed rank restores its saved state."""
    from types import SimpleNamespace

    from sgm_lightning.training.state import TrainingStateMixin

    class Module(TrainingStateMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"seed": 3})
            self._pending_torch_rng = None

    def first_draw(rank, step=0, saved=None):
        L.seed_everything(3, verbose=False)
        m = Module()
        m._trainer = SimpleNamespace(global_rank=rank, global_step=step)
        m._pending_torch_rng = saved
        m.on_train_start()
        return torch.rand(4)

    assert torch.equal(first_draw(0), (L.seed_everything(3, verbose=False), torch.rand(4))[1])  # unchanged
    ranks = [first_draw(r) for r in range(3)]
    assert not torch.equal(ranks[0], ranks[1]) and not torch.equal(ranks[1], ranks[2])
    assert torch.equal(first_draw(1), ranks[1])  # deterministic
    assert not torch.equal(first_draw(1, step=5), ranks[1])  # a resume with no state for this rank: new stream
    state = torch.Generator().manual_seed(11).get_state()
    expected = torch.rand(4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(first_draw(1, saved={"torch": state, "cuda": None}), expected)  # restored, not reseeded
