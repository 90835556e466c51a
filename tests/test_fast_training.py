"""Mixed precision with a fused optimizer and clipping, the compiled / channels-last network, host
syncs per step, and the optimizer / LR-schedule components (in-process, tiny models, CPU).

GPU runs of train.py (bf16 + compile, resume) are at the end, marked ``gpu``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from sgm_lightning.training.callbacks import EMACallback
from sgm_lightning.training.fault_tolerance import NaNGuard
from sgm_lightning.training.lit_module import ScoreLitModule, load_from_sgm_checkpoint
from sgm_lightning.training.optim import WarmupSchedule, from_legacy_hparams, warmup_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = {"_target_": "sgm_lightning.nets.unet.UNet", "in_channels": 1, "image_size": 8, "base_channels": 8,
       "channel_mults": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0, "num_groups": 4}
SDE = {"_target_": "sgm_lightning.sde.VPSDE"}
LOSS = {"_target_": "sgm_lightning.losses.DSMLoss"}


def _module(**kw) -> ScoreLitModule:
    from hydra.utils import instantiate
    torch.manual_seed(0)
    sde = instantiate(SDE)
    kw.setdefault("optimizer", functools.partial(torch.optim.Adam, lr=1e-3))
    kw.setdefault("lr_scheduler", functools.partial(warmup_schedule, warmup_steps=2))
    return ScoreLitModule(net=instantiate(NET), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                          ema_decay=0.9, config={"net": NET, "sde": SDE, "loss": LOSS}, **kw)


def _loader(n: int = 64, same_batches: bool = False):
    """Random images in [-1, 1]; ``same_batches``: every batch the same (a resume needs no data position)."""
    x = torch.rand(8 if same_batches else n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return torch.utils.data.DataLoader(list(x) * (n // 8 if same_batches else 1), batch_size=8)


def _trainer(tmp_path, max_steps=4, precision="32-true", log_every=1, callbacks=(), nan_every=1, **kw):
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins import MixedPrecision
    if precision == "16-mixed":  # Lightning would fall back to bf16 on CPU; ask for fp16 + grad scaler
        kw["plugins"], precision = [MixedPrecision("16-mixed", "cpu")], None
    kw = {"enable_progress_bar": False, **kw}
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, precision=precision, gradient_clip_val=1.0,
                     log_every_n_steps=log_every, logger=CSVLogger(str(tmp_path)), default_root_dir=str(tmp_path),
                     enable_checkpointing=False, enable_model_summary=False,
                     callbacks=[EMACallback(), NaNGuard(check_every_n_steps=nan_every), *callbacks], **kw)


# ----------------------------------------------------------------------------- mixed precision
def test_bf16_mixed_fused_adam_with_clipping_trains_and_resumes_exactly(tmp_path):
    """Lightning's bf16-mixed plugin refuses to clip a fused optimizer (the GPU failure, same on CPU);
    the module clips itself, and a resumed run matches an uninterrupted one bitwise."""
    module = _module()
    trainer = _trainer(tmp_path / "a", precision="bf16-mixed")
    trainer.fit(module, _loader(same_batches=True))
    opt = trainer.optimizers[0]
    assert opt.defaults["fused"] is True
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        trainer.precision_plugin.clip_gradients(opt, 1.0)  # what Lightning alone would do at every step
    assert trainer.global_step == 4 and 0 < float(trainer.callback_metrics["train/grad_norm"]) < float("inf")
    assert all(torch.isfinite(p).all() for p in module.parameters())

    half = _module()
    t1 = _trainer(tmp_path / "b", max_steps=2, precision="bf16-mixed")
    t1.fit(half, _loader(same_batches=True))
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _module()
    _trainer(tmp_path / "c", precision="bf16-mixed").fit(resumed, _loader(same_batches=True), ckpt_path=str(tmp_path / "half.ckpt"))
    for (k, a), b in zip(module.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for a, b in zip(module.ema.shadow_params, resumed.ema.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp16_mixed_fused_clipping_sees_unscaled_gradients(tmp_path):
    """Under 16-mixed the grad scaler multiplies the loss by 2^16; the logged norm (and the clipping)
    must be that of the true gradients, as in fp32."""
    norms = {}
    for precision in ("32-true", "16-mixed"):
        module = _module()
        trainer = _trainer(tmp_path / precision, max_steps=1, precision=precision)
        trainer.fit(module, _loader())
        assert trainer.optimizers[0].defaults["fused"] is True
        assert (getattr(trainer.precision_plugin, "scaler", None) is not None) == (precision == "16-mixed")
        norms[precision] = float(trainer.callback_metrics["train/grad_norm"])
    assert norms["16-mixed"] == pytest.approx(norms["32-true"], rel=0.05)


def test_cosine_schedule_and_legacy_hparams():
    f = WarmupSchedule(warmup_steps=10, decay="cosine", total_steps=110, min_lr_ratio=0.1)
    assert (f(0), f(9), f(10), f(60), f(110), f(500)) == pytest.approx((0.1, 1.0, 1.0, 0.55, 0.1, 0.1))
    with pytest.raises(ValueError, match="total_steps"):
        WarmupSchedule(warmup_steps=10, decay="cosine", total_steps=-1)
    hp = {"optimizer": "adamw", "lr": 3e-4, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1,
          "warmup_steps": 7, "ema_decay": 0.9}
    optimizer, scheduler = from_legacy_hparams(hp)
    assert hp == {"ema_decay": 0.9}
    opt = optimizer([torch.zeros(1, requires_grad=True)])
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.99)
    assert scheduler(opt).lr_lambdas[0](0) == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        from_legacy_hparams({"optimizer": "sgd"})


def test_old_checkpoint_hparams_still_load(tmp_path):
    """A checkpoint written before the optim / lr_schedule groups (optimizer="adam", lr=..., warmup_steps=...)."""
    module = _module()
    hp = {k: v for k, v in module.hparams.items() if k not in ("fused", "compile", "compile_mode", "channels_last")}
    hp.update(optimizer="adam", lr=5e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, warmup_steps=3)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": hp, "global_step": 1}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "old.ckpt")
    loaded = load_from_sgm_checkpoint(str(tmp_path / "old.ckpt"))
    conf = loaded.configure_optimizers()
    assert conf["optimizer"].defaults["lr"] == 5e-4 and conf["lr_scheduler"]["scheduler"].lr_lambdas[0](0) == 1 / 3


# ----------------------------------------------------------------------------- compile / channels_last
def test_compiled_channels_last_checkpoint_round_trips_with_eager(tmp_path, monkeypatch):
    """The compiled forward runs in training steps only; parameter names stay those of the network, so
    checkpoints of compiled and eager runs load into each other (aot_eager stands in for inductor)."""
    calls = []
    real_compile = torch.compile

    def fake_compile(fn, mode=None, **kw):
        calls.append(mode)
        compiled = real_compile(fn, backend="aot_eager")

        def counted(*a, **k):
            calls.append("call")
            return compiled(*a, **k)
        return counted
    monkeypatch.setattr(torch, "compile", fake_compile)
    module = _module(compile=True, compile_mode="max-autotune-no-cudagraphs", channels_last=True)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, _loader())
    assert calls[0] == "max-autotune-no-cudagraphs" and calls.count("call") == 2  # once per training step
    convs = [p for p in module.score_model.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    state = torch.load(tmp_path / "compiled.ckpt", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    eager = load_from_sgm_checkpoint(str(tmp_path / "compiled.ckpt"))  # uncompiled, as sample.py uses it
    assert eager._compiled_forward is None
    x, t = torch.rand(3, 1, 8, 8) * 2 - 1, torch.full((3,), 0.3)
    module.eval()
    torch.testing.assert_close(eager.score_model.score(x, t), module.score_model.score(x, t))
    samples = eager.generate(2, method="ddpm", steps=2, generator=torch.Generator().manual_seed(0)).samples
    assert torch.isfinite(samples).all()
    other = _module(compile=True, channels_last=True)  # an eager run's weights into a compiled module
    other.configure_model()
    other.load_state_dict(_module().state_dict(), strict=True)
    module.train()
    losses, _ = other.train_losses(x)
    assert losses.shape == (3,) and torch.isfinite(losses).all()


def test_compile_options_reach_torch_compile_and_cuda_graph_steps_are_marked(monkeypatch):
    """``model.compile_options`` go to ``torch.compile(options=...)`` (checked against inductor's option
    names, never together with a mode, errors naming the fix); a CUDA-graph compile (a mode or
    ``triton.cudagraphs``) marks the start of every training step, an ordinary one does not."""
    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    for kwargs, expected, marked in (({"compile_options": {"triton.cudagraphs": True}}, {"options": {"triton.cudagraphs": True}}, 2),
                                     ({"compile_options": {"cpp_wrapper": True}}, {"options": {"cpp_wrapper": True}}, 0),
                                     ({"compile_mode": "reduce-overhead"}, {"mode": "reduce-overhead"}, 2),
                                     ({}, {"mode": None}, 0)):
        calls.clear(), marks.clear()
        module = _module(compile=True, **kwargs)
        module.configure_model()
        module.train_losses(x), module.train_losses(x)
        assert calls == [expected] and len(marks) == marked, (kwargs, calls, marks)
    with pytest.raises(ValueError, match="unknown inductor option.*no_such_option"):
        _module(compile=True, compile_options={"no_such_option": 1})
    with pytest.raises(ValueError, match="both given.*Keep compile_mode=default"):
        _module(compile=True, compile_mode="max-autotune", compile_options={"cpp_wrapper": True})


def test_compile_options_from_the_command_line():
    from hydra import compose, initialize_config_dir

    from sgm_lightning.cli import plain
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["model.compile=true", "model.compile_options={triton.cudagraphs:true}"])
    assert plain(cfg.model)["compile_options"] == {"triton.cudagraphs": True}


# ----------------------------------------------------------------------------- host syncs
def test_non_logging_steps_make_no_host_sync(tmp_path):
    """With the default callbacks' hot-path work (EMA, NaN guard, progress bar, logger), only logging
    steps (every 4th) read values from the device."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from profile_step import OpCounter

    from sgm_lightning.training.callbacks.progress import LossProgressBar

    counter = OpCounter()

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counter.step = trainer.global_step

    trainer = _trainer(tmp_path, max_steps=8, log_every=4, callbacks=[Stamp(), LossProgressBar(refresh_rate=4)],
                       precision="bf16-mixed", nan_every=None, enable_progress_bar=True)  # the default NaN guard: read on logging steps
    with counter:
        trainer.fit(_module(), _loader())
    syncs = {s: counter.syncs[s] for s in range(8)}
    assert all(syncs[s] == 0 for s in (0, 1, 2, 4, 5, 6)), (syncs, dict(counter.sync_names))
    assert syncs[3] > 0 and syncs[7] > 0  # the counter sees them: logging steps read the metrics
    assert "train/grad_norm" in trainer.callback_metrics and "train/img_per_sec" in trainer.callback_metrics


def test_hot_path_walks_no_module_tree_and_norms_the_gradients_once(tmp_path, monkeypatch):
    """Host work of a non-logging step (after the first): the EMA update, the NaN guard and the
    clipping neither walk the module tree (``Module.named_modules``, behind ``parameters()``: ~500
    generator steps per walk on the CIFAR U-Net) nor compute the gradients' norm twice (the NaN
    guard's finiteness test and the clipping share one foreach norm), and nothing calls
    ``self.log`` (~1,700 Python calls each); logging steps do log."""
    import collections
    counts, window = collections.Counter(), {"on": False, "step": -1}
    named_modules, foreach_norm = torch.nn.Module.named_modules, torch._foreach_norm

    def counting_named_modules(self, *args, **kwargs):
        if window["on"]:
            counts["walk", window["step"]] += 1
        return named_modules(self, *args, **kwargs)

    def counting_foreach_norm(*args, **kwargs):
        if window["on"]:
            counts["norm", window["step"]] += 1
        return foreach_norm(*args, **kwargs)

    def counting_log(self, *args, **kwargs):
        if window["on"]:
            counts["log", window["step"]] += 1
        return log(self, *args, **kwargs)

    log = L.LightningModule.log
    monkeypatch.setattr(torch.nn.Module, "named_modules", counting_named_modules)
    monkeypatch.setattr(torch, "_foreach_norm", counting_foreach_norm)
    monkeypatch.setattr(L.LightningModule, "log", counting_log)

    class Window(L.Callback):  # from one step's start to the next one's: every hook of the step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            window["on"], window["step"] = trainer.global_step >= 1, trainer.global_step

        def on_train_end(self, trainer, pl_module):
            window["on"] = False

    module = _module()
    trainer = _trainer(tmp_path, max_steps=7, log_every=3, callbacks=[Window()], nan_every=None)
    trainer.fit(module, _loader())
    quiet = [1, 3, 4, 6]  # steps 2 and 5 log (global_step + 1 divisible by 3)
    assert [counts["walk", s] for s in quiet] == [0] * 4, dict(counts)
    assert [counts["norm", s] for s in quiet] == [1] * 4, dict(counts)
    assert [counts["log", s] for s in quiet] == [0] * 4 and counts["log", 2] > 0 and counts["log", 5] > 0, dict(counts)
    window["on"], window["step"] = True, 99  # the counters do see a walk and a norm
    list(module.parameters()), torch._foreach_norm([torch.ones(2)])
    assert counts["walk", 99] >= 1 and counts["norm", 99] == 1


@pytest.mark.parametrize("max_steps", [5, 8])  # mid-epoch, and at the last batch of the first epoch
def test_step_end_loop_state_equals_the_loop_state_dict_of_that_step_end(tmp_path, max_steps):
    """The cheap per-step capture (progress counters and the loops' own entries) rebuilds exactly the
    ``fit_loop.state_dict()`` of the step end, also after fit has closed the loop (when the live
    state differs): what a checkpoint written after fit needs to resume exactly."""
    import copy

    from sgm_lightning.training.loop_state import StepEndLoopState

    snapshot, reference = StepEndLoopState(), {}

    class Compare(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshot.capture(trainer)
            reference["state"] = copy.deepcopy(trainer.fit_loop.state_dict())
            assert snapshot.state_dict(trainer) == reference["state"]

    trainer = _trainer(tmp_path, max_steps=max_steps, log_every=3, callbacks=[Compare()])
    trainer.fit(_module(), _loader(n=64))  # 8 batches per epoch
    live = trainer.fit_loop.state_dict()
    assert live != reference["state"]  # fit closed the loop after the last step end
    assert snapshot.state_dict(trainer) == reference["state"]
    assert snapshot.global_step == max_steps


def test_train_loss_is_the_mean_over_each_logging_interval_and_resumes(tmp_path):
    """``train/loss`` at a logging step is the mean of the step losses since the previous logging
    step (summed on the device, logged once per interval); a run resumed mid-interval logs the same."""
    import csv

    class Losses(L.Callback):
        def __init__(self):
            self.values = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values[trainer.global_step - 1] = float(outputs["loss"])

    def logged(trainer):
        path = os.path.join(trainer.logger.log_dir, "metrics.csv")
        with open(path) as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    seen = Losses()
    trainer = _trainer(tmp_path / "full", max_steps=9, log_every=4, callbacks=[seen])
    trainer.fit(_module(), _loader(same_batches=True))
    full = logged(trainer)
    assert sorted(full) == [3, 7]  # logging steps: global_step + 1 divisible by 4
    for end, start in ((3, 0), (7, 4)):
        mean = sum(seen.values[s] for s in range(start, end + 1)) / (end - start + 1)
        assert full[end] == pytest.approx(mean, rel=1e-6)
    assert full[3] != pytest.approx(seen.values[3], rel=1e-3)  # not the last step's loss alone

    # with accumulation (2 batches per optimizer step): the mean over all 8 batches of the 4 steps
    accumulated = _trainer(tmp_path / "acc", max_steps=4, log_every=4, accumulate_grad_batches=2)

    class BatchLosses(L.Callback):  # Lightning reports each batch's loss divided by the accumulation
        values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))
    batch_losses = BatchLosses()
    accumulated.callbacks.append(batch_losses)
    accumulated.fit(_module(), _loader(n=64))
    assert logged(accumulated)[3] == pytest.approx(2 * sum(batch_losses.values) / 8, rel=1e-6)
    assert len(batch_losses.values) == 8

    first = _trainer(tmp_path / "a", max_steps=6, log_every=4)
    first.fit(_module(), _loader(same_batches=True))
    first.save_checkpoint(tmp_path / "a.ckpt")  # after fit: resumes as at the end of step 6
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["train_loss_interval"]["steps"] == 2
    second = _trainer(tmp_path / "b", max_steps=9, log_every=4)
    second.fit(_module(), _loader(same_batches=True), ckpt_path=str(tmp_path / "a.ckpt"))
    assert logged(second)[7] == pytest.approx(full[7], rel=1e-6)
    silent = _trainer(tmp_path / "off", max_steps=3, log_every=0)  # logging off: nothing logged, no error
    silent.fit(_module(), _loader(same_batches=True))
    assert "train/loss" not in silent.callback_metrics


# ----------------------------------------------------------------------------- GPU (train.py)
# synthetic-free and offline: the bundled digits, upsampled to 32x32
TINY_GPU = ["data=digits", "data.image_size=32", "net=ddpmpp_cifar10", "net.base_channels=32", "net.num_res_blocks=1",
            "trainer=gpu", "trainer.precision=bf16-mixed", "model.compile=true", "model.channels_last=true",
            "logger=csv", "data.batch_size=32", "trainer.log_every_n_steps=5",
            "callbacks.checkpoint.every_n_train_steps=10", "callbacks.samples.every_n_steps=20",
            "callbacks.samples.num_samples=16", "callbacks.samples.samplers.unipc.steps=5",
            "callbacks.samples.samplers.dpm_sde.steps=5", "callbacks.samples.samplers.ode.options={rtol:0.01,atol:0.01}"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_compile_cli_run_and_resume(tmp_path):
    overrides = TINY_GPU
    env = dict(os.environ, WANDB_MODE="offline")

    def run(*extra):
        return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *overrides, *extra,
                               f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
    first = run("trainer.max_steps=20")
    assert first.returncode == 0, first.stderr[-4000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20 and not any("_orig_mod" in k for k in ckpt["state_dict"])
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    for name in ("unipc", "dpm_sde", "ode"):
        assert os.path.getsize(tmp_path / "samples" / f"{name}_step20.png") > 0
    second = run("trainer.max_steps=30", "ckpt_path=last")
    assert second.returncode == 0, second.stderr[-4000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30 and ckpt["ema"]["num_updates"] == 30


def _train_cli(run_dir, *overrides, timeout=900):
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_cli_bf16_compile_run_resume_and_sample(tmp_path):
    """train.py with model.compile (real inductor on CPU: minutes), a resume, and sample.py from it."""
    tiny = ["net.base_channels=8", "net.channel_mults=[1,2]", "net.num_groups=4", "data.batch_size=16",
            "logger=csv", "trainer.precision=bf16-mixed", "model.compile=true", "model.channels_last=true",
            "trainer.log_every_n_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
            "callbacks.samples.every_n_steps=4", "callbacks.samples.num_samples=4",
            "~callbacks.samples.samplers", "+callbacks.samples.samplers={ddpm:{method:ddpm,steps:3,options:{}}}"]
    first = _train_cli(tmp_path, *tiny, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-4000:]
    second = _train_cli(tmp_path, *tiny, "trainer.max_steps=4", "ckpt_path=last")
    assert second.returncode == 0, second.stderr[-4000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and not any("_orig_mod" in k for k in ckpt["state_dict"])
    assert os.path.getsize(tmp_path / "samples" / "ddpm_step4.png") > 0
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"ckpt_path={tmp_path}/checkpoints/last.ckpt",
                          "method=ddpm", "steps=2", "num_samples=2", f"out_dir={tmp_path}/s", f"hydra.run.dir={tmp_path}/s"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
