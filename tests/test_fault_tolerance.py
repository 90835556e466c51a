"""Checkpoint safety and fault tolerance: atomic writes survive kill -9, safe loads, NaN guard, preemption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sgm_lightning.training.checkpoint import (AtomicCheckpointIO, CheckpointError, atomic_save, check_compatible,
                                      config_differences, load_checkpoint, to_plain)
from sgm_lightning.training.fault_tolerance import (PREEMPTED_EXIT_CODE, InjectNaN, NaNGuard, NonFiniteError, Preempted,
                                           PreemptionCheckpoint)


class Tiny(L.LightningModule):
    """y = w x regression; ``on_step`` lets a test act at a given global step."""

    def __init__(self, on_step=None):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.on_step = on_step

    def training_step(self, batch, batch_idx):
        if self.on_step is not None:
            self.on_step(self.global_step)
        (x,) = batch
        return ((self.lin(x) - x.sum(1, keepdim=True)) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["sgm_config"] = {"net": {"width": 3}, "sde": {"beta_max": 20.0}}


def _loader():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 3, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=4)


def _trainer(tmp_path, callbacks=(), max_steps=6, every=2):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True, save_top_k=1,
                           every_n_train_steps=every)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[*callbacks, ckpt], plugins=[AtomicCheckpointIO()],
                     default_root_dir=str(tmp_path))


# ------------------------------------------------------------------------- atomic writes / safe loads
def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(2)}}, p)
    atomic_save({"state_dict": {"w": torch.zeros(2)}}, p)
    assert torch.equal(load_checkpoint(p)["state_dict"]["w"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]


def test_failed_write_keeps_previous_file(tmp_path):
    p = tmp_path / "last.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(2)}}, p)

    def broken_writer(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_save({"state_dict": {}}, p, writer=broken_writer)
    assert torch.equal(load_checkpoint(p)["state_dict"]["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_kill9_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    """A child process writes last.ckpt once, then starts a slow second save and is SIGKILLed mid-write."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        from sgm_lightning.training.checkpoint import atomic_save
        p = {str(tmp_path / 'last.ckpt')!r}
        atomic_save({{"state_dict": {{"w": torch.full((1000,), 1.0)}}}}, p)
        def slow(obj, f):
            f.write(b"x" * 1000); f.flush()
            print("WRITING", flush=True)
            time.sleep(60)
        atomic_save({{"state_dict": {{"w": torch.full((1000,), 2.0)}}}}, p, writer=slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path))  # the save really is in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert torch.equal(load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"], torch.full((1000,), 1.0))
    atomic_save({"state_dict": {}}, tmp_path / "last.ckpt")  # the next save sweeps the stale temp file
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_missing_checkpoint_lists_candidates(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    atomic_save({"state_dict": {}}, tmp_path / "checkpoints" / "step0000010.ckpt")
    with pytest.raises(FileNotFoundError) as e:
        load_checkpoint(tmp_path / "nope.ckpt")
    msg = str(e.value)
    assert "nope.ckpt" in msg and "step0000010.ckpt" in msg and "ckpt_path" in msg


def test_truncated_checkpoint_names_file_and_previous(tmp_path):
    good, bad = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    atomic_save({"state_dict": {"w": torch.randn(100)}}, good)
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert "corrupt or truncated" in str(e.value) and str(bad) in str(e.value) and "a.ckpt" in str(e.value)


def test_pickled_code_is_refused(tmp_path):
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": Tiny}, p)  # a class reference: needs an unsafe unpickler
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(p)


def test_foreign_checkpoints_rejected(tmp_path):
    p = tmp_path / "x.ckpt"
    atomic_save({"weights": torch.ones(1)}, p)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_checkpoint(p)
    atomic_save({"state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="not a sgm_lightning"):
        load_checkpoint(p, require_sgm=True)


def test_incompatible_config_lists_differing_keys():
    ckpt = {"state_dict": {}, "sgm_config": {"net": {"ch": 128, "mults": [1, 2]}, "sde": {"beta_max": 20.0}}}
    cur = {"net": {"ch": 64, "mults": [1, 2]}, "sde": {"beta_max": 20.0}, "loss": {"x": 1}}
    assert config_differences(ckpt["sgm_config"], cur) == ["net.ch: checkpoint=128, current=64"]
    with pytest.raises(CheckpointError) as e:
        check_compatible(ckpt, cur, path="run/last.ckpt")
    assert "net.ch: checkpoint=128, current=64" in str(e.value) and "start fresh" in str(e.value)
    check_compatible(ckpt, {"net": {"ch": 128, "mults": [1, 2]}, "sde": {"beta_max": 20.0}})  # same: no error


def test_to_plain_makes_configs_weights_only_loadable(tmp_path):
    from omegaconf import OmegaConf
    from lightning.fabric.utilities.data import AttributeDict

    obj = {"hp": AttributeDict(a=1, cfg=OmegaConf.create({"net": {"ch": [1, 2]}})), "p": tmp_path}
    plain = to_plain(obj)
    assert plain == {"hp": {"a": 1, "cfg": {"net": {"ch": [1, 2]}}}, "p": str(tmp_path)}
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, **obj}, tmp_path / "c.ckpt")
    assert load_checkpoint(tmp_path / "c.ckpt")["hp"]["cfg"]["net"]["ch"] == [1, 2]


def test_lightning_resume_goes_through_safe_loader(tmp_path):
    tr = _trainer(tmp_path, max_steps=4)
    tr.fit(Tiny(), _loader())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last, require_sgm=True)["global_step"] == 4
    bad = tmp_path / "checkpoints" / "bad.ckpt"
    bad.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _trainer(tmp_path / "r", max_steps=6).fit(Tiny(), _loader(), ckpt_path=str(bad))
    tr2 = _trainer(tmp_path / "r2", max_steps=6)
    tr2.fit(Tiny(), _loader(), ckpt_path=str(last))
    assert tr2.global_step == 6


# ------------------------------------------------------------------------- NaN guard
@pytest.mark.parametrize("every", [1, None])
def test_nan_guard_stops_naming_step_and_keeps_last_good(tmp_path, every):
    """every=1: caught before the bad optimizer step; None (read on logging steps, here every 50): caught
    when the next checkpoint is about to be written, which is refused."""
    tr = _trainer(tmp_path, callbacks=[NaNGuard(check_every_n_steps=every), InjectNaN(at_step=5)], max_steps=10, every=2)
    model = Tiny()
    with pytest.raises(NonFiniteError) as e:
        tr.fit(model, _loader())
    assert "global step 5" in str(e.value) and "loss" in str(e.value)
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 4  # the last good checkpoint, not overwritten
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    if every == 1:
        assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights
    else:
        assert "found at step 6" in str(e.value)  # when checkpoint step 6 was about to be written


def test_nan_guard_with_logging_off_reads_every_default_interval(tmp_path):
    """trainer.log_every_n_steps=0 (Lightning's "logging off") made the guard divide by zero at the first step."""
    from sgm_lightning.training.fault_tolerance import CHECK_EVERY_WITHOUT_LOGGING
    guard = NaNGuard()
    reads = []
    guard._check = lambda trainer, module: reads.append(trainer.global_step)
    tr = L.Trainer(max_steps=CHECK_EVERY_WITHOUT_LOGGING + 3, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   log_every_n_steps=0, callbacks=[guard], default_root_dir=str(tmp_path))
    tr.fit(Tiny(), _loader())
    n = CHECK_EVERY_WITHOUT_LOGGING
    assert reads[:2] == [n - 1, n + 2] and set(reads[2:]) <= {n + 3}  # the interval, the last step, fit end


def test_nan_guard_names_parameter_with_bad_gradient(tmp_path):
    def poison(step):
        if step == 2:
            model.lin.weight.register_hook(lambda g: g * float("inf")) if not hasattr(model, "_h") else None
            model._h = True

    model = Tiny(on_step=poison)
    with pytest.raises(NonFiniteError, match=r"gradient of parameter 'lin.weight'.*global step 2"):
        _trainer(tmp_path, callbacks=[NaNGuard(check_every_n_steps=1)], max_steps=10).fit(model, _loader())


def test_nan_guard_skip_counts_and_stops_after_max_skips(tmp_path):
    guard = NaNGuard(on_nan="skip", max_skips=2)
    model = Tiny()
    tr = _trainer(tmp_path, callbacks=[guard, InjectNaN(at_step=3, times=2)], max_steps=8)
    tr.fit(model, _loader())
    assert guard.skipped == 2 and tr.global_step == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    guard2 = NaNGuard(on_nan="skip", max_skips=2)
    with pytest.raises(NonFiniteError, match=r"global step 5 after 2 skipped steps"):
        _trainer(tmp_path / "b", callbacks=[guard2, InjectNaN(at_step=3, times=5)], max_steps=10).fit(Tiny(), _loader())


def test_bad_guard_arguments():
    with pytest.raises(ValueError, match="on_nan"):
        NaNGuard(on_nan="ignore")
    with pytest.raises(ValueError, match="max_skips"):
        NaNGuard(max_skips=0)
    with pytest.raises(ValueError, match="check_every_n_steps"):
        NaNGuard(check_every_n_steps=0)


# ------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_signal_saves_last_at_step_boundary(tmp_path, sig):
    def send(step):
        if step == 3:
            os.kill(os.getpid(), getattr(signal, sig))

    tr = _trainer(tmp_path, callbacks=[PreemptionCheckpoint()], max_steps=50, every=100)
    with pytest.raises(Preempted) as e:
        tr.fit(Tiny(on_step=send), _loader())
    assert e.value.code == PREEMPTED_EXIT_CODE
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 4  # step 3 finished (4 optimizer steps), then saved
    tr2 = _trainer(tmp_path / "r", max_steps=6, every=100)
    tr2.fit(Tiny(), _loader(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert tr2.global_step == 6


@pytest.mark.parametrize("max_steps,expected_files", [(5, {"last.ckpt", "epoch=0-step=4.ckpt"}),
                                                      (4, {"last.ckpt", "epoch=0-step=4.ckpt"})])
def test_last_checkpoint_holds_the_final_step(tmp_path, max_steps, expected_files):
    """max_steps between two periodic checkpoints: last.ckpt must still hold the final weights."""
    module = Tiny()
    _trainer(tmp_path, callbacks=[PreemptionCheckpoint()], max_steps=max_steps, every=4).fit(module, _loader())
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == max_steps
    assert torch.equal(ckpt["state_dict"]["lin.weight"], module.lin.weight.detach())
    assert set(os.listdir(tmp_path / "checkpoints")) == expected_files


def test_resume_refuses_another_parametrization_and_accepts_older_checkpoints_without_it():
    stored = {"net": {"ch": 8}, "sde": {"beta_max": 20.0}, "model": {"prediction": "eps", "label": None}}
    ckpt = {"state_dict": {}, "sgm_config": stored}
    cur = {"net": {"ch": 8}, "sde": {"beta_max": 20.0}, "model": {"prediction": "x0", "label": "log_sigma",
                                                                  "ema_decay": 0.5}}
    with pytest.raises(CheckpointError) as e:
        check_compatible(ckpt, cur, path="run/last.ckpt")
    msg = str(e.value)
    assert "model.prediction: checkpoint='eps', current='x0'" in msg
    assert "model.label: checkpoint=None, current='log_sigma'" in msg and "model.prediction" in msg.split("Fix:")[1]
    same = {"net": {"ch": 8}, "sde": {"beta_max": 20.0}, "model": {"prediction": "eps", "label": None, "ema_decay": 0.5}}
    check_compatible(ckpt, same)  # other model settings (EMA, compile, ...) may change on resume
    older = {"state_dict": {}, "sgm_config": {"net": {"ch": 8}, "sde": {"beta_max": 20.0}, "model": {}}}
    check_compatible(older, cur)  # written before the parametrization was checked: not refused


@pytest.mark.parametrize("device", ["cuda", "foo"])
def test_a_device_that_is_not_here_is_not_called_a_corrupt_checkpoint(tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = tmp_path / "a.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, map_location=device)
    assert "cannot be loaded onto map_location" in str(e.value) and "corrupt" not in str(e.value)
    assert load_checkpoint(p)["state_dict"]["w"].sum() == 2  # the file is fine


def test_nan_guard_stops_every_rank_when_one_rank_sees_a_non_finite_loss():
    """Under fp16 the guard checks only the loss, which is rank-local: one rank raised alone and the
    others waited forever in the next collective. The flags are now summed over ranks before acting."""
    from types import SimpleNamespace
    guard = NaNGuard(check_every_n_steps=4)
    guard._pending = [(0, torch.tensor([True, True])), (1, torch.tensor([True, True]))]  # this rank: all finite
    other_rank_bad_at_step_1 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    reduced = []

    def reduce(t, reduce_op):
        reduced.append(reduce_op)
        return t + other_rank_bad_at_step_1

    trainer = SimpleNamespace(world_size=2, global_step=3, strategy=SimpleNamespace(reduce=reduce))
    with pytest.raises(NonFiniteError, match="the loss is NaN/Inf at global step 1"):
        guard._check(trainer, Tiny())
    assert reduced == ["sum"]
    guard._pending = [(4, torch.tensor([True, True]))]
    guard._check(SimpleNamespace(world_size=2, global_step=4,
                                 strategy=SimpleNamespace(reduce=lambda t, reduce_op: t)), Tiny())  # all ranks fine
