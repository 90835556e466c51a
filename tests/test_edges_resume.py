"""Exact resume in the cases ``tests/test_resume_matrix.py`` does not cover: gradient accumulation
(a resume at a step boundary, a preemption signal between two micro-batches), validation at an
epoch's last batch right before the stop (the logger's step counter), and a cosine LR schedule whose
length changes with the resumed run's ``max_steps`` (an interrupted run, an extended one).

The runs go through ``train.train`` in this process with the tiny settings of the matrix (3 batches
of 512 digits per epoch).
"""

from __future__ import annotations

import csv
import functools
import glob
import os
import signal

import lightning as L
import pytest
import torch
from test_resume_matrix import assert_same_run_state, run

from sgm_lightning.training.optim import WarmupSchedule, warmup_schedule

ACCUMULATE = ["+trainer.accumulate_grad_batches=2"]  # 3 batches per epoch: steps of batches {0, 1}, {2}


class SignalAt(L.Callback):
    """Send SIGUSR1 to this process at the end of the ``at_batch``-th training batch (1-based)."""

    def __init__(self, at_batch: int):
        self.at_batch, self.seen = int(at_batch), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.at_batch:
            os.kill(os.getpid(), signal.SIGUSR1)


class SignalAtStart(SignalAt):
    """Send SIGUSR1 when the ``at_batch``-th training batch starts (before any callback's batch end)."""

    def on_train_batch_end(self, *args):
        pass

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += 1
        if self.seen == self.at_batch:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """The uninterrupted 4-step run with 2 batches per optimizer step."""
    return run(tmp_path_factory.mktemp("acc") / "full", "trainer.max_steps=4", *ACCUMULATE)


def test_accumulation_resume_at_a_step_boundary_is_exact(accumulated, tmp_path):
    """Stopped at the epoch's last step, the resumed run starts with a micro-batch that does not step:
    EMACallback counted it as an optimizer step (its step counter was read before the checkpoint
    was restored), one EMA update too many."""
    part = run(tmp_path, "trainer.max_steps=2", *ACCUMULATE)
    assert part["ema"]["num_updates"] == 2
    resumed = run(tmp_path, "trainer.max_steps=4", "ckpt_path=last", *ACCUMULATE)
    assert accumulated["ema"]["num_updates"] == 4
    assert_same_run_state(accumulated, resumed)


def test_preemption_between_micro_batches_waits_for_the_optimizer_step(accumulated, tmp_path):
    """A signal seen after the first micro-batch of a step (batch 4: epoch 1's batch 0) must not save
    then: the accumulated gradient is in no checkpoint, and the resumed run would step without it.
    The checkpoint is written at the end of that optimizer step instead."""
    from sgm_lightning.training.fault_tolerance import Preempted
    with pytest.raises(Preempted):  # SIGUSR1 after batch 4 (PreemptionCheckpoint runs after the other callbacks)
        run(tmp_path, "trainer.max_steps=4", *ACCUMULATE,
            f"+callbacks.zsignal._target_={__name__}.SignalAt", "+callbacks.zsignal.at_batch=4")
    part = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert part["global_step"] == 3 and part["DigitsDataModule"]["batches_consumed"] == 2
    resumed = run(tmp_path, "trainer.max_steps=4", "ckpt_path=last", *ACCUMULATE)
    assert_same_run_state(accumulated, resumed)


def _logged_steps(run_dir) -> dict[str, list[int]]:
    """{metric: [logged steps]} of the CSV logger's files of a run dir (all versions)."""
    steps: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(str(run_dir), "**", "metrics.csv"), recursive=True)):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value:
                        steps.setdefault(key, []).append(int(row["step"]))
    return steps


@pytest.mark.parametrize("validation", [
    pytest.param(["trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1"], id="every_epoch"),
    pytest.param(["trainer.val_check_interval=3"], id="every_3_steps", marks=pytest.mark.slow)])  # same path
def test_validation_at_the_last_batch_before_the_stop_keeps_the_logger_step(tmp_path, validation):
    """Validation ran at the epoch's last batch, which was the last step: the resumed run's logger
    step counter (``_batches_that_stepped``) was one ahead, every later metric logged one step late."""
    args = ["logger=csv", *validation]
    full = run(tmp_path / "full", "trainer.max_steps=5", *args)
    run(tmp_path / "part", "trainer.max_steps=3", *args)
    resumed = run(tmp_path / "part", "trainer.max_steps=5", "ckpt_path=last", *args)
    assert_same_run_state(full, resumed)
    expected = _logged_steps(tmp_path / "full")
    assert expected["train/loss"] == list(range(5)) and expected["val/loss"] == [2]

    def resumed_steps(steps):  # the per-step metrics of steps 3 and 4 (the resumed run's)
        return {k: [s for s in v if s >= 3] for k, v in steps.items()
                if k.startswith(("train/loss", "train/grad_norm", "train/lr")) and any(s >= 3 for s in v)}
    assert resumed_steps(_logged_steps(tmp_path / "part")) == resumed_steps(expected)
    # the CSV logger appends to the resumed run's metrics.csv (Lightning's writer deleted it: steps 0-2 were lost)
    part = _logged_steps(tmp_path / "part")
    assert part["train/loss"] == expected["train/loss"] and part["val/loss"] == expected["val/loss"]


# ----------------------------------------------------------------------------- LR schedule
def _lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_resumed_schedule_follows_this_runs_config():
    """The schedule's settings are this run's (as the EMA decay is): a cosine run stopped at step 4 of
    a 4-step schedule and resumed for 8 steps continues the 8-step cosine, and extending a finished
    run anneals again instead of training on at lr 0; the learning rate of the first resumed step is
    the new schedule's too. Same settings: the saved state is reproduced bitwise."""
    def opt():
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    make = functools.partial(warmup_schedule, warmup_steps=2, decay="cosine")
    full = _lrs(make(opt(), total_steps=8), 8)
    short = make(opt(), total_steps=4)
    _lrs(short, 4)
    assert short.optimizer.param_groups[0]["lr"] == 0.0  # the 4-step schedule ended
    resumed = make(opt(), total_steps=8)
    resumed.optimizer.load_state_dict(short.optimizer.state_dict())
    resumed.load_state_dict(short.state_dict())
    assert _lrs(resumed, 4) == full[4:]
    assert resumed.lr_lambdas[0].total_steps == 8
    assert resumed.optimizer.param_groups[0]["lr"] == 0.1 * WarmupSchedule(2, "cosine", 8)(8)

    same = make(opt(), total_steps=8)  # unchanged settings: identical state
    state = short.state_dict()
    again = make(opt(), total_steps=4)
    again.optimizer.load_state_dict(short.optimizer.state_dict())
    again.load_state_dict(state)
    assert again.state_dict() == state and again.optimizer.param_groups[0]["lr"] == 0.0
    assert same.lr_lambdas[0].total_steps == 8


@pytest.mark.slow  # the unit test above covers the schedule; this is the train.py route
def test_cosine_run_interrupted_by_max_steps_resumes_exactly(tmp_path):
    """``lr_schedule.total_steps`` defaults to ``trainer.max_steps``: a run stopped with a smaller
    max_steps and resumed with the full one ends as the uninterrupted run."""
    cosine = ["lr_schedule=cosine", "lr_schedule.warmup_steps=2"]
    full = run(tmp_path / "full", "trainer.max_steps=5", *cosine)
    run(tmp_path / "part", "trainer.max_steps=3", *cosine)
    resumed = run(tmp_path / "part", "trainer.max_steps=5", "ckpt_path=last", *cosine)
    assert_same_run_state(full, resumed)


# ----------------------------------------------------------------------------- EMA
def test_ema_switched_on_at_resume_starts_at_the_checkpoint_weights():
    """A checkpoint trained without EMA (``ema_decay=0``) resumed with EMA: the average starts at the
    resumed weights (as a fresh EMA starts at the current ones), not at this run's random init."""
    from test_ema_schedule import tiny
    src = tiny(ema_decay=0)
    with torch.no_grad():
        for p in src.score_model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ckpt = {"state_dict": src.state_dict()}
    src.on_save_checkpoint(ckpt)
    assert "ema" not in ckpt
    dst = tiny(ema_decay=0.9, ema_warmup=False)
    dst.on_load_checkpoint(ckpt)
    dst.load_state_dict(ckpt["state_dict"])
    params = list(dst.score_model.parameters())
    assert all(torch.equal(s, p) for s, p in zip(dst.ema.shadow_params, params))
    w = [p.detach().clone() for p in params]
    with torch.no_grad():
        params[0].add_(1.0)
    dst.ema_update()
    torch.testing.assert_close(dst.ema.shadow_params[0], w[0] + 0.1, rtol=0, atol=1e-6)  # 0.9 w + 0.1 (w + 1)


def test_ema_scope_leaves_no_copy_of_the_weights_in_checkpoints_and_nests():
    """After an EMA scope (validation, sample grids) torch-ema kept its copy of the raw weights
    (``collected_params``) in every later checkpoint: a checkpoint's EMA state then depended on
    whether a validation had run since the run (re)started (a resumed run differed from the
    uninterrupted one) and held a second copy of the weights. A nested scope used to restore the
    EMA weights as the raw ones (the inner ``store`` overwrote the outer copy)."""
    from test_ema_schedule import tiny
    module = tiny(ema_decay=0.9)
    params = list(module.score_model.parameters())
    with torch.no_grad():
        params[0].add_(1.0)  # raw weights != EMA weights
    raw = [p.detach().clone() for p in params]
    with module.ema_scope():
        with module.ema_scope():  # e.g. an evaluation callback inside EMACallback's validation scope
            assert torch.equal(params[0], module.ema.shadow_params[0])
        assert torch.equal(params[0], module.ema.shadow_params[0])
    assert all(torch.equal(p, r) for p, r in zip(params, raw))
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["ema"]["collected_params"] is None


def test_loss_buckets_without_examples_are_gaps_not_repeats(tmp_path):
    """A noise-level bucket with no example in a logging step kept its last value (Lightning re-logged it);
    it is now NaN, and each logged bucket is the mean over that step's examples in it."""
    run(tmp_path, "trainer.max_steps=4", "logger=csv", "data.batch_size=4", "trainer.log_every_n_steps=1")
    (path,) = glob.glob(os.path.join(str(tmp_path), "**", "metrics.csv"), recursive=True)
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_t0.0-0.1")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    buckets = [k for k in rows[0] if k.startswith("train/loss_t")]
    assert len(buckets) == 10
    for prev, row in zip(rows, rows[1:]):
        values = [float(row[k]) for k in buckets]
        assert 1 <= sum(v == v for v in values) <= 4  # 4 examples: at most 4 buckets hold one
        assert not any(v == v and v == float(prev[k]) for k, v in zip(buckets, values))  # nothing repeated


def test_preemption_at_an_evaluation_step_saves_after_the_evaluation(tmp_path):
    """The preemption checkpoint ran before the FID callback of the same step: step 2 was saved without
    its evaluation, and the resumed run never evaluated it (history [4] instead of [2, 4])."""
    from test_resume_matrix import FID

    from sgm_lightning.training.fault_tolerance import Preempted
    with pytest.raises(Preempted):  # SIGUSR1 when the 2nd batch starts: saved at the end of step 2
        run(tmp_path, "trainer.max_steps=4", *FID, f"+callbacks.asignal._target_={__name__}.SignalAtStart",
            "+callbacks.asignal.at_batch=2")
    part = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert part["global_step"] == 2
    (fid_state,) = [v for k, v in part["callbacks"].items() if k.startswith("FIDCallback")]
    assert [step for step, _ in fid_state["history"]] == [2]
