"""Edge cases of the precision / compile / optimizer options on CPU (held-out-check audit).

Tiny in-process runs (the U-Net, loader and trainer of ``test_fast_training``)."""

from __future__ import annotations

import functools

import pytest
import torch

from test_fast_training import LOSS, NET, SDE, _loader, _module, _trainer

from sgm_lightning.training.lit_module import ScoreLitModule


def _module_without_ema() -> ScoreLitModule:
    from hydra.utils import instantiate
    torch.manual_seed(0)
    sde = instantiate(SDE)
    return ScoreLitModule(net=instantiate(NET), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                          ema_decay=0.0, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))


# ----------------------------------------------------------------------------- "true" precisions
def test_64_true_trains_with_ema_resumes_bitwise_and_samples_in_float64(tmp_path):
    """trainer.precision=64-true with the default EMA: the float32 shadow weights failed at the first EMA
    update (``_foreach_lerp_`` of float32 and float64); and a resume restored the float64 weights into
    the still-float32 module (Lightning converts it after restoring), rounding them."""
    full = _module()
    _trainer(tmp_path / "full", max_steps=4, precision="64-true").fit(full, _loader(same_batches=True))
    assert all(p.dtype == torch.float64 for p in full.parameters())
    assert all(s.dtype == torch.float64 for s in full.ema.shadow_params)
    first = _module()
    t1 = _trainer(tmp_path / "a", max_steps=2, precision="64-true")
    t1.fit(first, _loader(same_batches=True))
    t1.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)
    assert all(v.dtype == torch.float64 for v in saved["state_dict"].values() if v.is_floating_point())
    resumed = _module()
    _trainer(tmp_path / "b", max_steps=4, precision="64-true").fit(resumed, _loader(same_batches=True),
                                                                   ckpt_path=str(tmp_path / "half.ckpt"))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    for a, b in zip(full.ema.shadow_params, resumed.ema.shadow_params):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    # the sample grids: generate in the weights' dtype (float32 inputs failed in the float64 network)
    samples = full.generate(2, method="ddpm", steps=2, generator=torch.Generator().manual_seed(0)).samples
    assert samples.dtype == torch.float64 and torch.isfinite(samples).all()


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_true_precision_with_ema_is_refused_before_the_first_step(tmp_path, precision):
    """bf16 / fp16 weights cannot carry an EMA (steps (1 - decay)(w - s) below their resolution; before:
    a dtype RuntimeError at the first EMA update): a clear error naming the fixes, before any step."""
    module = _module()
    trainer = _trainer(tmp_path, max_steps=2, precision=precision)
    with pytest.raises(ValueError, match=rf"precision={precision}.*-mixed.*model\.ema_decay=0"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0
    # without an EMA it trains, and samples in the weights' dtype
    module = _module_without_ema()
    trainer = _trainer(tmp_path / "no_ema", max_steps=2, precision=precision)
    trainer.fit(module, _loader())
    assert trainer.global_step == 2 and all(p.dtype != torch.float32 for p in module.parameters())


# ----------------------------------------------------------------------------- optimizer / LR schedule settings
@pytest.mark.parametrize("settings, match", [
    ({"betas": [0.5]}, r"optim\.betas must be two numbers.*got \[0\.5\].*optim\.betas=\[0\.9,0\.999\]"),  # IndexError
    ({"betas": [0.9, 0.99, 0.5]}, r"optim\.betas must be two numbers"),  # the third value was ignored
    ({"betas": 0.9}, r"optim\.betas must be two numbers"),  # TypeError
    ({"betas": [0.9, None]}, r"optim\.betas must be two numbers"),  # TypeError
    ({"lr": float("inf")}, r"lr must be > 0 and finite, got inf"),  # accepted: NaN weights after one step
    ({"lr": "1e-3"}, r"lr must be > 0 and finite"),  # TypeError
    ({"weight_decay": -1}, r"Adam refused its settings.*weight_decay.*optim\.\*"),
])
def test_bad_optimizer_settings_are_clear_value_errors(settings, match):
    from sgm_lightning.training.optim import check_optimizer
    with pytest.raises(ValueError, match=match):
        check_optimizer(functools.partial(torch.optim.Adam, **{"lr": 1e-3, **settings}))


def test_optimizer_settings_from_the_command_line_reach_the_optimizer(tmp_path):
    """optim=adamw 'optim.betas=[0.5,0.6]' optim.weight_decay=0.3 model.fused=false, composed as train.py
    does: the optimizer the module builds has them (betas as a tuple), unfused."""
    from conftest import compose_config
    from hydra.utils import instantiate
    cfg = compose_config("train", ["optim=adamw", "optim.betas=[0.5,0.6]", "optim.weight_decay=0.3",
                                   "optim.lr=3e-4", "model.fused=false", "lr_schedule=constant"])
    module = _module(optimizer=instantiate(cfg.optim, _convert_="all"), lr_scheduler=instantiate(cfg.lr_schedule),
                     fused=cfg.model.fused)
    opt = module.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.AdamW and not opt.defaults["fused"]
    assert (opt.defaults["betas"], opt.defaults["weight_decay"], opt.defaults["lr"]) == ((0.5, 0.6), 0.3, 3e-4)


@pytest.mark.parametrize("total_steps", [10.5, "100", float("nan")])
def test_cosine_total_steps_must_be_an_integer(total_steps):
    """10.5 was truncated to 10 silently; text failed with a TypeError, NaN with 'cannot convert float NaN'."""
    from sgm_lightning.training.optim import WarmupSchedule
    with pytest.raises(ValueError, match="lr_schedule.total_steps must be an integer"):
        WarmupSchedule(warmup_steps=2, decay="cosine", total_steps=total_steps)


# ----------------------------------------------------------------------------- compile
def test_compile_with_a_double_backward_loss_is_refused_and_fdsm_trains(monkeypatch):
    """model.compile=true with loss=ssm / ism (noise_free_mlp): the loss differentiates the score in x with
    create_graph=True, and torch.compile has no double backward: a RuntimeError at the first backward.
    Refused at construction naming the fixes; loss=fdsm (no double backward) trains compiled."""
    from sgm_lightning.losses import FDSMLoss, ImplicitScoreMatchingLoss, SlicedScoreMatchingLoss
    from sgm_lightning.nets.mlp import NoiseFreeMLP
    from sgm_lightning.sde import VPSDE
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager"))

    def module(loss, compile=True):
        torch.manual_seed(0)
        return ScoreLitModule(net=NoiseFreeMLP(dim=2, hidden_dim=8), sde=VPSDE(), loss=loss, prediction="score",
                              data_shape=(2,), compile=compile)
    for loss in (SlicedScoreMatchingLoss(), ImplicitScoreMatchingLoss()):
        with pytest.raises(ValueError, match=rf"compile=true cannot train {type(loss).__name__}.*double backward.*"
                                             r"model\.compile=false.*loss=fdsm"):
            module(loss)
        module(loss, compile=False)  # eager: accepted
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    compiled, eager = module(FDSMLoss()), module(FDSMLoss(), compile=False)
    compiled.configure_model()
    grads = []
    for m in (compiled, eager):
        m._generator = torch.Generator().manual_seed(1)
        losses, t = m.train_losses(x)
        assert t is None and losses.shape == (4,)
        losses.mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_model_fused_true_needs_an_optimizer_with_a_fused_implementation():
    """model.fused=true with an optimizer that has no `fused` argument (RMSprop) trained unfused without a
    word, and model.fused=yes counted as true: both refused when fit builds the optimizer (before any
    step; such a checkpoint still loads for sampling); null keeps the default."""
    rmsprop = functools.partial(torch.optim.RMSprop, lr=1e-3)
    with pytest.raises(ValueError, match=r"model\.fused=true, but RMSprop has no fused implementation.*model\.fused=null"):
        _module(optimizer=rmsprop, fused=True).configure_optimizers()
    with pytest.raises(ValueError, match=r"model\.fused must be true, false or null.*got 'yes'"):
        _module(fused="yes").configure_optimizers()
    assert not _module(optimizer=rmsprop, fused=None).configure_optimizers()["optimizer"].defaults.get("fused")
    assert _module(fused=True).configure_optimizers()["optimizer"].defaults["fused"] is True


@pytest.mark.parametrize("max_steps", [-1, 100])  # max_epochs only; shorter than the 5000 warm-up steps
def test_cosine_schedule_without_room_for_its_decay_names_the_settings_to_change(max_steps):
    """lr_schedule=cosine (warmup_steps 5000, total_steps = trainer.max_steps) with max_steps=-1 or 100: the
    error names trainer.max_steps / lr_schedule.total_steps and lr_schedule.warmup_steps (it said only that
    max_steps 'must then be set', also when it was set, below the warm-up)."""
    from conftest import compose_config
    from hydra.utils import instantiate
    cfg = compose_config("train", ["lr_schedule=cosine", f"trainer.max_steps={max_steps}", "trainer.max_epochs=1"])
    with pytest.raises(ValueError, match=rf"total_steps > warmup_steps \(5000\), got {max_steps}.*"
                                         r"set trainer\.max_steps.*lower lr_schedule\.warmup_steps"):
        instantiate(cfg.lr_schedule)(torch.optim.Adam([torch.zeros(1, requires_grad=True)]))


# ----------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("saved, resumed", [(False, True), (True, False)])
def test_resume_with_the_other_channels_last_setting_keeps_the_fused_adam_update(tmp_path, saved, resumed):
    """A checkpoint resumed with another model.channels_last: Adam's moments kept the saved memory layout,
    and the fused kernel (the default) pairs state and weights by memory position: the resumed steps
    moved the conv weights by ~3e-3 away from the uninterrupted run, silently. They now take the weights'
    layout on load and the run matches the uninterrupted one up to convolution rounding (~1e-7)."""
    full = _module(channels_last=saved)
    _trainer(tmp_path / "full", max_steps=4).fit(full, _loader(same_batches=True))
    first = _module(channels_last=saved)
    t1 = _trainer(tmp_path / "a", max_steps=2)
    t1.fit(first, _loader(same_batches=True))
    t1.save_checkpoint(tmp_path / "half.ckpt")
    second = _module(channels_last=resumed)
    t2 = _trainer(tmp_path / "b", max_steps=4)
    t2.fit(second, _loader(same_batches=True), ckpt_path=str(tmp_path / "half.ckpt"))
    opt = t2.optimizers[0]
    assert opt.defaults["fused"] is True
    convs = [p for p in second.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) == resumed for p in convs)
    for (k, a), b in zip(full.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert all(opt.state[p]["exp_avg"].stride() == p.stride() for p in convs)
