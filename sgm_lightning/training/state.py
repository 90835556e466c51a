"""Resumable training state of ``ScoreLitModule``: the training-noise generator, the RNG states and
loop state written into checkpoints, and the EMA of the weights.

Randomness of the training objective (noise eps and times t) comes from a per-rank
``torch.Generator`` seeded with (seed, rank). Every checkpoint holds the state of that generator and
of the global CPU (and CUDA) RNG (dropout) of EVERY rank (gathered from all ranks when the
checkpoint is written), together with the EMA shadow weights and update counter
(``checkpoint["ema"]``), so that a resumed run on the same number of ranks continues bitwise
identically; on another number of ranks, ranks without a saved state are reseeded from
(seed, global step, rank).

The EMA schedule is set by the module's hyperparameters only (``ema_decay``, ``ema_warmup``, or
``ema_halflife_img`` + ``ema_rampup_ratio``); ``EMACallback`` decides when ``ema_update`` runs.
"""

from __future__ import annotations

import contextlib

import torch

_SEED_STRIDE = 1_000_003  # per-rank generator seed = seed + stride * (rank + 1)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s generator for ``seed`` (distinct per rank)."""
    return (int(seed) + _SEED_STRIDE * (int(rank) + 1)) % (2**63 - 1)


def ema_halflife_beta(step: int, images_per_step: int, halflife_img: float,
                      rampup_ratio: float | None = None) -> float:
    """EMA decay of optimizer step ``step`` (0-based) for a half-life in images (Karras et al. 2022,
    EDM training loop): with ``cur = step * images_per_step`` images seen before this step,
    ``h = min(halflife_img, cur * rampup_ratio)`` (no ramp-up when ``rampup_ratio`` is None) and
    ``beta = 0.5 ** (images_per_step / max(h, 1e-8))``: the average forgets half of its content
    every ``h`` images."""
    h = float(halflife_img)
    if rampup_ratio is not None:
        h = min(h, int(step) * int(images_per_step) * float(rampup_ratio))
    return 0.5 ** (int(images_per_step) / max(h, 1e-8))


class TrainingStateMixin:
    """Generator, checkpointed RNG / loop state and EMA of a LightningModule with ``hparams.seed``,
    ``score_model`` and ``ema`` (a torch-ema ``ExponentialMovingAverage`` or None)."""

    # ------------------------------------------------------------------ randomness
    @property
    def generator(self) -> torch.Generator:
        """Per-rank generator of the training noise (created on the module's device)."""
        if self._generator is None or self._generator.device.type != self.device.type:
            g = torch.Generator(device=self.device)
            g.manual_seed(rank_seed(self.hparams.seed, self.global_rank))
            if self._pending_rng is not None:
                self._restore_rng(g, self._pending_rng)
                self._pending_rng = None
            self._generator = g
        return self._generator

    def _restore_rng(self, g: torch.Generator, rng: dict) -> None:
        state = rng.get("generator", {}).get(self.global_rank)
        if state is not None:
            g.set_state(state.cpu().clone())
        else:  # no state saved for this rank (the run had fewer ranks): reseed deterministically
            g.manual_seed(rank_seed(self.hparams.seed + int(rng.get("global_step", 0)), self.global_rank))

    def _gather_rng_state(self, state: torch.Tensor) -> dict[int, torch.Tensor]:
        """{rank: state} of every rank (a collective under DDP: every rank writes the checkpoint dict)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return {self.global_rank: state.cpu()}
        gathered = trainer.strategy.all_gather(state.to(trainer.strategy.root_device))  # (world, n) uint8
        # clone: a row of the gathered tensor is a view, and torch.save would store the whole buffer
        # under every rank (the RNG setters read a view's storage from its start)
        return {r: gathered[r].cpu().clone() for r in range(trainer.world_size)}

    # ------------------------------------------------------------------ EMA
    @contextlib.contextmanager
    def ema_scope(self, use_ema: bool = True):
        """Temporarily swap the EMA weights into the model (no-op without EMA or when use_ema=False)."""
        if not use_ema or self.ema is None or self.__dict__.get("_in_ema_scope"):  # nested: already swapped in
            yield
            return
        self.ema.to(self.device)
        self.__dict__["_in_ema_scope"] = True
        try:
            with self.ema.average_parameters(self.score_model.parameters()):
                yield
        finally:
            self.__dict__["_in_ema_scope"] = False
            # the raw weights are back: torch-ema's copy of them would ride along in every checkpoint
            self.ema.collected_params = None

    def ema_update(self, images_per_step: int | None = None) -> None:
        """One EMA step on the current weights (called by ``EMACallback`` after each optimizer step).

        ``images_per_step``: images of one optimizer step over all ranks (needed by the half-life
        schedule, whose step counter is ``ema.num_updates`` and travels in ``checkpoint["ema"]``).
        """
        if self.ema is None:
            return
        if self.ema.shadow_params and self.ema.shadow_params[0].device != self.device:
            self.ema.to(self.device)  # once (EMACallback moves it at fit start), not ~500 .to() per step
        halflife = self.hparams.get("ema_halflife_img")
        if halflife is None:
            decay = self.ema.decay
            if self.ema.num_updates is not None:  # torch-ema's warm-up: min(decay, (1 + n) / (10 + n))
                self.ema.num_updates += 1
                decay = min(decay, (1 + self.ema.num_updates) / (10 + self.ema.num_updates))
        else:
            if images_per_step is None:
                raise ValueError("ema_halflife_img needs images_per_step (the global batch of one optimizer step)")
            n = int(self.ema.num_updates or 0)
            decay = ema_halflife_beta(n, images_per_step, halflife, self.hparams.get("ema_rampup_ratio"))
            self.ema.decay, self.ema.num_updates = decay, n + 1
        # torch-ema's update, s <- s - (1 - decay)(s - w), as one foreach kernel instead of a Python
        # loop of three kernels per parameter (~1,500 launches per step on the CIFAR U-Net)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema.shadow_params, self._ema_targets(), 1.0 - decay)

    def _ema_targets(self) -> list[torch.Tensor]:
        """The score model's parameters, in the shadow weights' order, listed once and reused: walking
        the module tree every step costs ~500 generator steps on the CIFAR U-Net, host time that a
        compiled GPU step cannot hide. The list is rebuilt after ``_apply`` (``to``, ``cuda``,
        ``half``, ...) and whenever its length no longer matches the shadow weights."""
        cached = self.__dict__.get("_ema_target_cache")
        if cached is None or len(cached) != len(self.ema.shadow_params):
            cached = list(self.score_model.parameters())
            self.__dict__["_ema_target_cache"] = cached
        return cached

    # per-process caches of the hot path (``_ema_targets``, ``gradients.GradientMixin.grad_norm``):
    # rebuilt on demand, never pickled (ddp_spawn, deepcopy of a module) nor kept across a device
    # conversion
    _TRANSIENT_CACHES = ("_ema_target_cache", "_grad_norm_cache")

    def _apply(self, fn, *args, **kwargs):
        for key in self._TRANSIENT_CACHES:
            self.__dict__.pop(key, None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        for key in self._TRANSIENT_CACHES:
            state.pop(key, None)
        state["_step_end_loops"] = None  # refers to a trainer's loops: meaningless in a copy
        return state

    # ------------------------------------------------------------------ checkpoints
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._step_end_loops is None:
            from sgm_lightning.training.loop_state import StepEndLoopState
            self._step_end_loops = StepEndLoopState()
        self._step_end_loops.capture(self.trainer)  # see on_save_checkpoint

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from sgm_lightning.training.loop_state import use_step_end_loop_state
        if self._trainer is not None:  # a file written after fit ended resumes like one of its last step
            use_step_end_loop_state(self.trainer, checkpoint, self._step_end_loops)
        checkpoint["sgm_config"] = self.hparams.get("config")
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["rng"] = {
            "generator": self._gather_rng_state(self.generator.get_state()),
            "torch": self._gather_rng_state(torch.get_rng_state()),
            "global_step": self.global_step,
        }
        if self.device.type == "cuda":
            checkpoint["rng"]["cuda"] = self._gather_rng_state(torch.cuda.get_rng_state(self.device))
        # the running train/loss interval (ScoreLitModule._track_loss): a resumed run logs the same means
        total = getattr(self, "_interval_loss", None)
        checkpoint["train_loss_interval"] = {"sum": 0.0 if total is None else float(total),
                                             "steps": int(getattr(self, "_interval_steps", 0))}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from sgm_lightning.training.loop_state import resume_between_epochs
        # before Lightning restores its loops from it; the logger step is put back at the first batch
        self._resume_logger_step = resume_between_epochs(checkpoint)
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
            if self.hparams.get("ema_halflife_img") is None:
                self.ema.decay = float(self.hparams.ema_decay)  # this run's setting, not the file's
        elif self.ema is not None and "state_dict" in checkpoint:
            # a file without EMA (ema_decay=0): the average starts at its weights, not at this run's init
            weights = checkpoint["state_dict"]
            with torch.no_grad():
                for shadow, (name, _) in zip(self.ema.shadow_params, self.score_model.named_parameters()):
                    if f"score_model.{name}" in weights:
                        shadow.copy_(weights[f"score_model.{name}"])
        interval = checkpoint.get("train_loss_interval")
        if interval is not None and hasattr(self, "_interval_steps"):
            self._interval_loss = torch.tensor(float(interval["sum"]), dtype=torch.float32)
            self._interval_steps = int(interval["steps"])
        rng = checkpoint.get("rng")
        if rng is not None:
            self._pending_torch_rng = {k: _rank_state(rng.get(k), self.global_rank) for k in ("torch", "cuda")}
            self._generator = None
            self._pending_rng = rng

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        step = self.__dict__.get("_resume_logger_step")
        if step is not None:  # the first batch after a resume between two epochs (resume_between_epochs)
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = step
            self._resume_logger_step = None

    def on_train_start(self) -> None:
        # Lightning creates the training dataloader iterator (which draws a base seed from the global
        # RNG) after restoring the checkpoint; restoring the global RNG here, after that draw, makes a
        # resumed run continue the uninterrupted run's global RNG stream bitwise.
        cpu = cuda = None
        if self._pending_torch_rng is not None:
            cpu, cuda = self._pending_torch_rng["torch"], self._pending_torch_rng["cuda"]
            self._pending_torch_rng = None
        if cpu is not None:
            torch.set_rng_state(cpu)
            if cuda is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda, self.device)
        elif self.global_rank > 0:
            # seed_everything gave every rank the same global stream: dropout masks (and any other draw
            # from it) repeated on every rank. Ranks > 0 get their own, from (seed, step, rank); rank 0
            # keeps seed_everything's, so a one-process run is unchanged.
            torch.manual_seed(rank_seed(self.hparams.seed + self.global_step, self.global_rank))


def _rank_state(saved, rank: int) -> torch.Tensor | None:
    """This rank's RNG state from a checkpoint entry ({rank: state}, or one tensor in older files)."""
    state = saved if saved is None or torch.is_tensor(saved) else saved.get(rank)
    return None if state is None else state.cpu().clone()  # own storage (see _gather_rng_state)
