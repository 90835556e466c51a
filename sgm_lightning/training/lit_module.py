"""``ScoreLitModule``: the Lightning wiring of a score-based generative model.

The module only wires the pieces together: the network is wrapped in a ``ScoreModel`` (the
parametrization turns its output into score / eps / x0, Song et al. 2021, Eq. 7), the loss callable
returns one loss per example (e.g. the denoising score-matching objective, Song et al. 2021, Eq. 7 /
Ho et al. 2020, Eq. 14), and ``generate`` hands the model's score to ``sgm_lightning.sampling``.

Randomness, checkpointed RNG / loop state and the EMA live in ``training/state.py``
(``TrainingStateMixin``): a resumed run continues bitwise identically at any step.

Checkpoints hold state dicts and plain hyperparameters only: the resolved Hydra configs of the
network, SDE and loss are stored in ``checkpoint["sgm_config"]`` and ``load_from_sgm_checkpoint``
rebuilds the module from the checkpoint alone with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch import nn
from torch_ema import ExponentialMovingAverage

from sgm_lightning.losses import ImplicitScoreMatchingLoss, SlicedScoreMatchingLoss, dsm_grid_loss
from sgm_lightning.parametrization import ScoreModel
from sgm_lightning.sde import SDE
from sgm_lightning.training.gradients import GradientMixin
from sgm_lightning.training.state import TrainingStateMixin, rank_seed
from sgm_lightning.training.step_metrics import StepMetricsMixin
from sgm_lightning.training.optim import (LEGACY_OPTIM_KEYS, accepts, check_compile_options, check_fused,
                                          check_optimizer, from_legacy_hparams, with_state_in_param_layout)
from sgm_lightning.utils import check_choice, check_int

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TRUE_PRECISION_DTYPES = {"64-true": torch.float64, "bf16-true": torch.bfloat16, "16-true": torch.float16}


class ScoreLitModule(TrainingStateMixin, StepMetricsMixin, GradientMixin, L.LightningModule):
    """Train a score model with a per-example loss; sample from it with any sampler.

    Args:
        net: network ``net(x, label, y=None)`` (its optional attribute ``num_classes`` enables labels).
        sde: forward process.
        loss: callable ``loss(model, x0, generator=None, return_t=False, **cond)`` -> (B,) or ((B,), t).
        prediction, label: parametrization of ``ScoreModel`` (see ``parametrization.py``).
        data_shape: shape of one example (C, H, W) or (D,), used by ``generate``.
        data_range: range of the data, "[-1,1]" or "[0,1]" (see ``training/data/ranges.py``).
        optimizer: ``params -> torch.optim.Optimizer`` (``configs/optim/``; default Adam, lr 2e-4).
        lr_scheduler: ``optimizer -> LR scheduler`` stepped every optimizer step (``configs/lr_schedule/``,
            e.g. ``training.optim.warmup_schedule``: Song et al. 2021, App. H, 5000 warm-up steps); None:
            constant rate.
        fused: pass ``fused`` to the optimizer (None: fused when it accepts it). Gradient clipping works
            with it under every precision (``configure_gradient_clipping``).
        compile: ``torch.compile`` the network's forward for training steps (with ``compile_mode``);
            sampling and evaluation run it eagerly, and state-dict keys are unchanged.
        compile_options: inductor options for that compile (``torch.compile(options=...)``, e.g.
            ``{"triton.cudagraphs": true}``, ``{"cpp_wrapper": true}``, ``{"combo_kernels": true}``;
            names from ``torch._inductor.list_options()``); torch takes them instead of a mode, so
            ``compile_mode`` must stay ``default``.
        channels_last: keep conv weights and training inputs in channels-last memory format.
        ema_decay: decay of the exponential moving average of the weights (Song et al. 2021,
            App. H: 0.9999 DDPM++, 0.999 NCSN++). 0 disables EMA (no shadow weights, nothing in
            checkpoints, sampling and evaluation use the raw weights) unless ``ema_halflife_img``
            is set.
        ema_warmup: use torch-ema's num_updates warm-up, decay_n = min(decay, (1 + n) / (10 + n)).
        ema_halflife_img: EMA by half-life (Karras et al. 2022, App. F.1: 0.5M images): the decay of
            step n is ``training.state.ema_halflife_beta``; replaces ema_decay /
            ema_warmup when set.
        ema_rampup_ratio: half-life ramp-up of ``ema_halflife_img`` (EDM: 0.05; None: no ramp-up).
        use_ema_for_eval: validation / sampling use the EMA weights unless told otherwise (the swap
            during validation is done by ``EMACallback``).
        cond_drop_prob: label dropout for classifier-free guidance (Ho & Salimans 2022); the null
            label has index ``num_classes``.
        num_loss_buckets: the training loss is also logged per noise level, in this many t buckets.
        seed: seed of the per-rank generator of the training noise.
        config: the resolved configs {"net", "sde", "loss", ...} needed to rebuild the module.
    """

    def __init__(self, net: nn.Module, sde: SDE, loss: Callable, prediction: str = "eps",
                 label: str | None = None, data_shape: Sequence[int] = (1, 8, 8),
                 data_range: str = "[-1,1]", optimizer: Callable | None = None,
                 lr_scheduler: Callable | None = None, fused: bool | None = None, compile: bool = False,
                 compile_mode: str | None = None, compile_options: dict | None = None, channels_last: bool = False,
                 ema_decay: float = 0.9999, ema_warmup: bool = True,
                 ema_halflife_img: float | None = None, ema_rampup_ratio: float | None = None,
                 use_ema_for_eval: bool = True, cond_drop_prob: float = 0.1, num_loss_buckets: int = 10,
                 seed: int = 0, config: dict | None = None):
        super().__init__()
        optimizer = optimizer if optimizer is not None else functools.partial(torch.optim.Adam, lr=2e-4)
        check_optimizer(optimizer, lr_scheduler)
        check_choice("compile_mode", compile_mode, COMPILE_MODES)
        check_compile_options(compile_options, compile_mode)
        if compile and isinstance(loss, (SlicedScoreMatchingLoss, ImplicitScoreMatchingLoss)):  # failed at step 1
            raise ValueError(f"model.compile=true cannot train {type(loss).__name__}: its gradient in x (create_graph) "
                             "needs a double backward, which torch.compile does not support; use model.compile=false "
                             "or loss=fdsm (finite differences, no double backward)")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 disables EMA), got {ema_decay!r}")
        if ema_halflife_img is not None and not ema_halflife_img > 0:
            raise ValueError(f"ema_halflife_img must be > 0 images (or null), got {ema_halflife_img!r}")
        if ema_rampup_ratio is not None and not ema_rampup_ratio > 0:
            raise ValueError(f"ema_rampup_ratio must be > 0 (or null), got {ema_rampup_ratio!r}")
        if not 0 <= cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob!r}")
        check_int("num_loss_buckets", num_loss_buckets)
        if not callable(loss):
            raise ValueError(f"loss must be a callable loss(model, x0, ...), got {type(loss).__name__}")
        # the optimizer / schedule configs travel in config["optim"] / config["lr_schedule"]
        self.save_hyperparameters(ignore=["net", "sde", "loss", "optimizer", "lr_scheduler"])
        self._optimizer_factory, self._scheduler_factory = optimizer, lr_scheduler
        self._compiled_forward: Callable | None = None
        self.score_model = ScoreModel(net, sde, prediction=prediction, label=label)
        self.sde = sde
        self.loss_fn = loss
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = getattr(net, "num_classes", None)
        self.ema: ExponentialMovingAverage | None = None
        if ema_decay > 0 or ema_halflife_img is not None:
            # the half-life schedule keeps its step counter in num_updates (see ema_update)
            self.ema = ExponentialMovingAverage(self.score_model.parameters(), decay=ema_decay,
                                                use_num_updates=ema_warmup or ema_halflife_img is not None)
        self._generator: torch.Generator | None = None
        self._pending_rng: dict | None = None
        self._pending_torch_rng: dict | None = None
        self._step_end_loops = None  # loop_state.StepEndLoopState, created at the first step end
        self._init_step_metrics()

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.score_model(x, t, **cond)

    def _cond(self, y: torch.Tensor | None, drop: bool) -> dict:
        if self.num_classes is None or y is None:
            return {}
        if drop and self.hparams.cond_drop_prob > 0:
            u = torch.rand(y.shape, generator=self.generator, device=y.device)
            y = torch.where(u < self.hparams.cond_drop_prob, torch.full_like(y, self.num_classes), y)
        return {"y": y}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, cond = self._unpack(batch, drop=True)
        losses, t = self.train_losses(x, cond)
        loss = losses.mean()
        self._track_loss(loss)
        self._images_since_log += x.shape[0]
        if self._interval_end() and self._ends_optimizer_step(batch_idx):
            # not prog_bar: Lightning would read it every step (callbacks/progress.py)
            # the mean over ranks too (every rank ends the interval on the same step)
            self.log("train/loss", self._interval_loss / self._interval_steps, sync_dist=True)
            self._interval_loss.zero_()
            self._interval_steps = 0
        if self._logging_step():  # the rest needs the host: only on steps whose metrics reach the logger
            if t is not None:  # noise-free losses have no noise level
                self._log_buckets(losses.detach(), t.detach())
            self._log_throughput()
        return loss

    def train_losses(self, x: torch.Tensor, cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-example training losses and their times t (None for noise-free losses): the work of a
        step, without logging. ``cond``: conditioning kwargs of the network (``_unpack``)."""
        if self.hparams.get("channels_last") and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._compiled_net():
            return self.loss_fn(self.score_model, x, generator=self.generator, return_t=True, **(cond or {}))

    def configure_model(self) -> None:
        """Lightning hook (once per fit, before the optimizer): the dtype of a "true" precision,
        channels-last weights, compiled forward."""
        self._convert_to_true_precision()
        if self.hparams.get("channels_last"):
            self.score_model.to(memory_format=torch.channels_last)
        if self.hparams.get("compile") and self._compiled_forward is None:
            mode, options = self.hparams.get("compile_mode"), self.hparams.get("compile_options")
            kwargs = {"options": dict(options)} if options else {"mode": None if mode == "default" else mode}
            self._compiled_forward = torch.compile(self.score_model.net.forward, **kwargs)

    def _convert_to_true_precision(self) -> None:
        """``trainer.precision=64-true``: weights and EMA in float64 before a checkpoint is restored (Lightning converts
        after restoring: a resume rounded the weights). ``bf16-true`` / ``16-true`` weights cannot carry an EMA."""
        trainer = self._trainer
        precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
        dtype = TRUE_PRECISION_DTYPES.get(precision)
        if dtype is None:
            return
        if dtype != torch.float64 and self.ema is not None:
            raise ValueError(
                f"trainer.precision={precision} keeps the weights in {str(dtype)[6:]}, where the EMA of the weights "
                "cannot be averaged (updates of (1 - ema_decay) x the difference are below its resolution). Use "
                f"trainer.precision={precision.split('-')[0]}-mixed (float32 weights, half-precision compute), or "
                "switch the EMA off with model.ema_decay=0 (and no model.ema_halflife_img).")
        self.score_model.to(dtype)
        if self.ema is not None:
            self.ema.to(dtype=dtype)

    @contextlib.contextmanager
    def _compiled_net(self):
        # The compiled forward shadows the network's own only inside a training step: sampling (which
        # holds outputs across calls, unsafe with CUDA graphs) and evaluation stay eager, and the
        # parameters keep their names (no `_orig_mod.` in state dicts).
        if self._compiled_forward is None:
            yield
            return
        if self.hparams.get("compile_mode") in ("reduce-overhead", "max-autotune") \
                or (self.hparams.get("compile_options") or {}).get("triton.cudagraphs"):
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: a new training iteration starts
        net = self.score_model.net
        net.forward = self._compiled_forward
        try:
            yield
        finally:
            del net.forward

    def configure_optimizers(self):
        kwargs = {}
        fused = self.hparams.get("fused")
        check_fused(self._optimizer_factory, fused)  # at fit start: a checkpoint still loads for sampling
        if fused is not False and accepts(self._optimizer_factory, "fused") \
                and "fused" not in getattr(self._optimizer_factory, "keywords", {}):
            kwargs["fused"] = True  # one kernel per step; legal with clipping (configure_gradient_clipping)
        opt = with_state_in_param_layout(self._optimizer_factory(self.score_model.parameters(), **kwargs))  # resume
        if self._scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._scheduler_factory(opt), "interval": "step"}}

    # ------------------------------------------------------------------ validation
    def _unpack(self, batch, drop: bool) -> tuple[torch.Tensor, dict]:
        """(x, conditioning kwargs) of a batch ``x`` or ``(x, y[, x_cond])``: class labels for
        class-conditional networks (label dropout when ``drop``), and SR3's image condition ``x_cond``
        (``training.data.superres``)."""
        if not isinstance(batch, (tuple, list)):
            return batch, {}
        cond = self._cond(batch[1] if len(batch) > 1 else None, drop)
        if len(batch) > 2:
            cond["x_cond"] = batch[2]
        return batch[0], cond

    def val_times(self) -> torch.Tensor:
        """The fixed t grid of the validation loss (float64): the midpoints of the
        ``num_loss_buckets`` equal buckets of [0, T] (the buckets of ``train/loss_t*``)."""
        k, T = self.hparams.num_loss_buckets, self.sde.T
        return ((torch.arange(k, dtype=torch.float64) + 0.5) * (T / k)).clamp_min(self.sde.default_eps)

    def validation_losses(self, batch, batch_idx: int) -> torch.Tensor:
        """Validation losses of one batch, (K, B) on the ``val_times`` grid (or (1, B) for noise-free losses).

        The denoising score-matching loss || eps_theta(x_t, t_k) - z ||^2 (``losses.dsm_grid_loss``) at
        fixed times with noise z from a generator seeded by (batch_idx, rank) alone: two evaluations of
        the same weights agree exactly and runs with other objectives or seeds are comparable. The
        training generator and the global RNG are not touched, so exact resume is unaffected.
        Noise-free models are evaluated with their own (sliced / finite-difference) objective.
        """
        x, cond = self._unpack(batch, drop=False)
        g = torch.Generator(device=x.device)
        g.manual_seed(rank_seed(batch_idx, self.global_rank))
        if getattr(self.loss_fn, "noise_free", False):
            with torch.inference_mode(False), torch.enable_grad():  # these losses differentiate in x
                return self.loss_fn(self.score_model, x.clone(), generator=g).detach()[None]
        return dsm_grid_loss(self.sde, self.score_model, x, self.val_times().to(x.device), g, **cond)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = None  # (sum of the example means, sums per t, count) of this rank, float64

    def validation_step(self, batch, batch_idx: int) -> None:
        losses = self.validation_losses(batch, batch_idx).double()
        sums = torch.cat([losses.mean(0).sum()[None], losses.sum(1), losses.new_tensor([losses.shape[1]])])
        self._val_sums = sums if getattr(self, "_val_sums", None) is None else self._val_sums + sums

    def on_validation_epoch_end(self) -> None:
        # reduced here, once, as float64 sums and counts: Lightning's sync_dist mean of the batch-size
        # weights is an integer mean (floored) on gloo, wrong when ranks hold different numbers of examples
        sums = self._val_sums
        if sums is None:
            return
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum") if self.trainer.world_size > 1 else sums
        count = sums[-1]
        self.log("val/loss", (sums[0] / count).float(), prog_bar=True)
        k = sums.shape[0] - 2
        if k > 1:
            T = self.sde.T
            for b in range(k):
                self.log(f"val/loss_t{b / k * T:.1f}-{(b + 1) / k * T:.1f}", (sums[1 + b] / count).float())
        self._val_sums = None

    # ------------------------------------------------------------------ sampling
    def score_fn(self, y: torch.Tensor | None = None, guidance_scale: float | None = None) -> Callable:
        """The score function handed to samplers (current weights; wrap in ``ema_scope`` for EMA)."""
        if guidance_scale is not None:
            if self.num_classes is None or y is None:
                raise ValueError("guidance_scale needs a class-conditional model and class labels y")
            from sgm_lightning.guidance import cfg_score_fn
            score = cfg_score_fn(self.score_model, y, guidance_scale, self.num_classes)  # checks the scale
            if self.hparams.cond_drop_prob == 0 and float(guidance_scale) != 1.0:
                raise ValueError(
                    f"guidance_scale={guidance_scale} mixes in the unconditional score of the null class "
                    f"(label {self.num_classes}), which this model never trained (model.cond_drop_prob=0): "
                    "retrain with model.cond_drop_prob > 0 (e.g. 0.1), or sample conditionally with "
                    "guidance_scale=null (or 1)")
            return score
        cond = {} if y is None else {"y": y}
        return lambda x, t: self.score_model.score(x, t, **cond)

    @torch.no_grad()
    def generate(self, num_samples: int, method: str = "pc", steps: int | None = None,
                 generator: torch.Generator | None = None, batch_size: int | None = None,
                 y: torch.Tensor | None = None, use_ema: bool = True, guidance_scale: float | None = None,
                 progress: Callable[[int, int], Any] | None = None, guide: Callable | None = None, **options):
        """Draw ``num_samples`` samples with ``sgm_lightning.sampling.sample`` in batches.

        No collective operations happen here, so one rank may call it alone. ``progress(done, total)``
        is called after each batch; ``guide(score_fn, y_batch) -> score_fn`` wraps each batch's score
        (classifier guidance: ``guidance.classifier_guidance_score_fn``). Returns a ``SampleResult``
        (samples on this module's device, nfe of one batch's trajectory).
        """
        from sgm_lightning.sampling import sample
        num_samples = check_int("num_samples", num_samples)
        batch_size = int(batch_size or num_samples)
        if y is not None:
            y = torch.as_tensor(y, device=self.device)
            if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():  # 1.7 became class 1
                raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
            y = y.long().expand(num_samples) if y.ndim == 0 else y.long()
            if y.shape != (num_samples,):  # a longer y was cut, a shorter one failed after the first chunks
                raise ValueError(f"y must be one label or num_samples={num_samples} labels, got shape {tuple(y.shape)}")
        if "x_T" not in options:  # default dtype: the weights' (a 64-true run samples in float64)
            options.setdefault("dtype", next(self.score_model.parameters()).dtype)
        was_training = self.training
        self.eval()
        chunks, result = [], None
        try:
            with self.ema_scope(use_ema):
                for start in range(0, num_samples, batch_size):
                    n = min(batch_size, num_samples - start)
                    yb = None if y is None else y[start:start + n]
                    # an unconditional model guided by a classifier: the labels are the guide's only
                    score = self.score_fn(None if guide is not None and self.num_classes is None else yb,
                                          guidance_scale)
                    result = sample(score if guide is None else guide(score, yb), self.sde, (n, *self.data_shape),
                                    method, steps=steps, generator=generator, device=self.device, **options)
                    chunks.append(result.samples)
                    if progress is not None:
                        progress(start + n, num_samples)
        finally:
            self.train(was_training)
        samples = torch.cat(chunks)
        return _with_samples(result, samples)


def _with_samples(result, samples: torch.Tensor):
    """A copy of a sampler result with its samples replaced (dataclass or named tuple)."""
    import dataclasses
    if dataclasses.is_dataclass(result):
        return dataclasses.replace(result, samples=samples)
    if hasattr(result, "_replace"):
        return result._replace(samples=samples)
    result.samples = samples
    return result


def load_from_sgm_checkpoint(path: str, map_location: str | torch.device = "cpu") -> ScoreLitModule:
    """Rebuild a ``ScoreLitModule`` (weights and EMA) from a checkpoint file alone.

    The network, SDE and loss are instantiated with ``hydra.utils.instantiate`` from the resolved
    configs stored in ``checkpoint["sgm_config"]``; the file is read with ``weights_only=True``.
    """
    from hydra.utils import instantiate

    from sgm_lightning.training.checkpoint import load_checkpoint, stored_config
    ckpt = load_checkpoint(path, map_location=map_location, require_sgm=True)  # weights_only=True
    cfg = stored_config(ckpt)
    if not all(k in cfg for k in ("net", "sde", "loss")):
        raise ValueError(f"checkpoint {path} has no sgm_config with net/sde/loss entries; pass a checkpoint written "
                         "by sgm_lightning's train.py (a train_classifier.py one goes in sample.py classifier_ckpt=)")
    sde = instantiate(cfg["sde"])
    net = instantiate(cfg["net"])
    loss = instantiate(cfg["loss"], sde=sde)
    hp = dict(ckpt["hyper_parameters"])
    if hp.get("config") is not None:
        hp["config"] = cfg
    if cfg.get("optim") is not None:
        optim = {"optimizer": instantiate(cfg["optim"], _convert_="all"),
                 "lr_scheduler": instantiate(cfg["lr_schedule"]) if cfg.get("lr_schedule") else None}
    elif any(k in hp for k in LEGACY_OPTIM_KEYS):  # written before the optim / lr_schedule groups
        optim = dict(zip(("optimizer", "lr_scheduler"), from_legacy_hparams(hp)))
    else:
        optim = {}
    module = ScoreLitModule(net=net, sde=sde, loss=loss, **hp, **optim)
    module.load_state_dict(ckpt["state_dict"])
    if module.ema is not None and ckpt.get("ema") is not None:
        module.ema.load_state_dict(ckpt["ema"])
    module.to(map_location if not isinstance(map_location, dict) else "cpu")
    if module.ema is not None:
        module.ema.to(module.device)
    module.eval()
    return module
