"""Runs that survive: preemption checkpoints and a guard against NaN/Inf losses and gradients.

Preemption (``PreemptionCheckpoint``)
    Lightning 2.6 already installs a SIGTERM handler (``_SignalConnector``): it sets
    ``trainer.received_sigterm``, forwards the signal to DDP children, and the training loop raises
    ``SIGTERMException`` (a ``SystemExit``) at the end of the step (single process) or at the start of
    the next one (DDP, after broadcasting the flag from rank 0). It does not save anything unless
    ``OnExceptionCheckpoint`` is used. SIGUSR1 is only handled under ``SLURMEnvironment(auto_requeue=True)``,
    where Lightning saves ``hpc_ckpt_<n>.ckpt`` *inside the signal handler* (possibly mid-step) and
    calls ``scontrol requeue``.
    We build on this: our SIGUSR1 handler (installed only when Lightning's SLURM requeue handler is
    not active) just sets a flag; so does our SIGTERM handler, which replaces Lightning's while
    training runs (Lightning's runs a ``dist.broadcast`` inside the signal handler, which can
    interleave with a DDP step's collectives and hang). At the next step boundary
    (``on_train_batch_end`` of a batch that ends an optimizer step: under gradient accumulation not
    between two micro-batches, whose gradients no checkpoint holds; flag OR-reduced over ranks so
    that all of them agree) the callback writes
    ``<checkpoints>/last.ckpt`` through the trainer (atomically, see ``checkpoint.AtomicCheckpointIO``)
    and raises ``Preempted``. A SIGTERM that surfaces as Lightning's own ``SIGTERMException`` (before
    training starts) is caught in ``on_exception`` and the checkpoint is written there.
    ``run_cli`` (``sgm_lightning/cli.py``) turns both into exit code ``PREEMPTED_EXIT_CODE`` = 143
    (128 + SIGTERM, what a scheduler reports for a job ended by SIGTERM): the process ends cleanly,
    and a requeued job resumes with ``ckpt_path=last``.

Non-finite values (``NaNGuard``)
    The loss (``on_before_backward``) and the gradients (``on_before_optimizer_step``, one fused
    norm, one host sync per step) are checked before the optimizer step, so a NaN never reaches the
    weights. ``on_nan="stop"`` raises ``NonFiniteError`` naming the global step and the culprit (the
    loss or the first parameter with a non-finite gradient); no checkpoint is written, so
    ``last.ckpt`` stays the last good one. ``on_nan="skip"`` drops the gradients (the optimizer skips
    parameters without a gradient) and continues, stopping after ``max_skips`` skipped steps.
    ``on_save_checkpoint`` refuses to write a checkpoint whose weights are not finite.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from sgm_lightning.training.gradients import optimizer_grads, total_norm
from sgm_lightning.training.step_metrics import ends_optimizer_step
from sgm_lightning.utils import check_choice, check_int, check_positive

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM


class Preempted(SIGTERMException):
    """Raised at a step boundary after a preemption signal; ``last.ckpt`` has been written."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient stopped the run (``NaNGuard``)."""


def _checkpoint_dir(trainer: Trainer, dirpath: Optional[str]) -> str:
    if dirpath:
        return str(dirpath)
    cb = trainer.checkpoint_callback
    if cb is not None and getattr(cb, "dirpath", None):
        return str(cb.dirpath)
    return os.path.join(str(trainer.default_root_dir), "checkpoints")


def _slurm_requeue_active(trainer: Trainer) -> bool:
    env = getattr(trainer.strategy, "cluster_environment", None)
    return bool(getattr(env, "auto_requeue", False)) and type(env).__name__ == "SLURMEnvironment"


class PreemptionCheckpoint(Callback):
    """Save ``last.ckpt`` at the next step boundary after SIGTERM / SIGUSR1, then exit with code 143;
    and save it when training ends (``max_steps`` reached between two periodic checkpoints), so that
    ``last.ckpt`` always holds the final weights and ``ckpt_path=last`` never goes back in time.

    Args:
        dirpath: folder of the checkpoint (default: the ModelCheckpoint's ``dirpath``).
        filename: file name without ``.ckpt`` (default ``"last"``, what ``ckpt_path=last`` resumes).
        handle_sigusr1: install a flag-setting SIGUSR1 handler (SLURM's ``--signal=USR1@<sec>``
            warning) unless Lightning's SLURM auto-requeue handler owns the signal.
        save_on_train_end: also write the checkpoint when ``fit`` finishes normally.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "last", handle_sigusr1: bool = True,
                 save_on_train_end: bool = True):
        if not filename or filename.endswith(".ckpt"):
            raise ValueError(f"filename must be a non-empty name without '.ckpt', got {filename!r}")
        self.dirpath = dirpath
        self.filename = filename
        self.handle_sigusr1 = bool(handle_sigusr1)
        self.save_on_train_end = bool(save_on_train_end)
        self._signal: Optional[str] = None
        self._saved = False
        self._previous_handler: Any = None
        self._previous_sigterm: Any = None

    # -------------------------------------------------------------- signal plumbing
    def _on_sigusr1(self, signum, frame) -> None:  # runs in the signal handler: set a flag only
        self._signal = "SIGUSR1"

    def _on_sigterm(self, signum, frame) -> None:  # runs in the signal handler: set a flag only
        self._signal = "SIGTERM"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's SIGTERM handler (registered just before training) runs a dist.broadcast *inside*
        # the signal handler; under DDP that collective can interleave with the step's collectives
        # and hang. While training, a flag-only handler replaces it; the flag is OR-reduced over the
        # ranks at the next step boundary (on_train_batch_end). Lightning's teardown restores the
        # handlers that were installed before fit.
        try:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: keep Lightning's handler
            self._previous_sigterm = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._signal, self._saved = None, False
        if (stage == "fit" and self.handle_sigusr1 and hasattr(signal, "SIGUSR1")
                and not _slurm_requeue_active(trainer)):
            try:
                self._previous_handler = signal.signal(signal.SIGUSR1, self._on_sigusr1)
            except ValueError:  # not the main thread
                self._previous_handler = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for sig, previous in ((getattr(signal, "SIGUSR1", None), self._previous_handler),
                              (signal.SIGTERM, self._previous_sigterm)):
            if sig is not None and previous is not None:
                try:
                    signal.signal(sig, previous)
                except ValueError:  # not the main thread
                    pass
        self._previous_handler = self._previous_sigterm = None

    @property
    def ckpt_name(self) -> str:
        return self.filename + ".ckpt"

    def _save(self, trainer: Trainer, why: str) -> str:
        path = os.path.join(_checkpoint_dir(trainer, self.dirpath), self.ckpt_name)
        trainer.save_checkpoint(path, weights_only=False)  # collective: every rank calls it, rank 0 writes
        self._saved = True
        rank_zero_info(f"[sgm_lightning] {why}: saved {path} at global step {trainer.global_step}.")
        return path

    # -------------------------------------------------------------- hooks
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        flag = self._signal is not None or bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        if flag and not self._saved and ends_optimizer_step(trainer, batch_idx):
            why = f"received {self._signal or 'SIGTERM'}"
            path = self._save(trainer, why)
            rank_zero_info(f"[sgm_lightning] exiting with code {PREEMPTED_EXIT_CODE}; resume with ckpt_path=last.")
            raise Preempted(f"{why}; checkpoint {path} written at global step {trainer.global_step}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not reached after an exception (NaN stop, preemption): the last good checkpoint stays.
        if self.save_on_train_end and not self._saved and trainer.global_step > 0 \
                and not self._last_saved_by_model_checkpoint(trainer):
            self._save(trainer, "training finished")

    def _last_saved_by_model_checkpoint(self, trainer: Trainer) -> bool:
        """True when a ModelCheckpoint already wrote this file at the current step (skip a second write)."""
        folder = os.path.abspath(_checkpoint_dir(trainer, self.dirpath))
        for cb in trainer.checkpoint_callbacks:
            if (getattr(cb, "save_last", False) and cb.dirpath and os.path.abspath(cb.dirpath) == folder
                    and getattr(cb, "CHECKPOINT_NAME_LAST", "last") == self.filename
                    and getattr(cb, "_last_global_step_saved", -1) == trainer.global_step):
                return True
        return False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not isinstance(exception, Preempted) and not self._saved:
            self._save(trainer, "received SIGTERM")

    def state_dict(self) -> dict:
        return {}


CHECK_EVERY_WITHOUT_LOGGING = 50  # NaNGuard's read interval when logging is off (Lightning's default interval)


class NaNGuard(Callback):
    """Stop (or skip the step) when the loss or a gradient is NaN/Inf.

    The finiteness test runs on the device every step; the host reads its result (a sync) every
    ``check_every_n_steps`` steps (default: on logging steps, ``trainer.log_every_n_steps``), before a
    checkpoint is written and at the last step, so that other steps never wait for the GPU. With
    ``check_every_n_steps=1`` (and always with ``"skip"``) a bad step is caught before its optimizer
    step; otherwise up to n - 1 more steps run on non-finite weights before the stop, and the
    checkpoint check below keeps them out of every checkpoint. Under fp16 mixed precision only the
    loss is checked: the grad scaler itself skips steps with non-finite gradients.

    Args:
        on_nan: ``"stop"`` raises ``NonFiniteError`` naming the global step and the culprit;
            ``"skip"`` drops the step's gradients and continues.
        max_skips: with ``"skip"``, raise after this many skipped steps (counted over the run and
            kept in checkpoints).
        check_every_n_steps: how often the host reads the result (None: ``trainer.log_every_n_steps``, or
            ``CHECK_EVERY_WITHOUT_LOGGING`` when that is 0).
    """

    def __init__(self, on_nan: str = "stop", max_skips: int = 10, check_every_n_steps: Optional[int] = None):
        check_choice("on_nan", on_nan, ("stop", "skip"))
        check_positive("max_skips", max_skips, integer=True)
        if check_every_n_steps is not None:
            check_positive("check_every_n_steps", check_every_n_steps, integer=True)
        self.on_nan = on_nan
        self.max_skips = int(max_skips)
        self.check_every_n_steps = check_every_n_steps
        self.skipped = 0
        self._losses: list[torch.Tensor] = []
        self._pending: list[tuple[int, torch.Tensor]] = []  # (global step, [loss ok, gradients ok]) on the device

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._losses = []

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())  # shares storage: checked (no sync) before the optimizer step

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        grad_ok = None
        if getattr(trainer.precision_plugin, "scaler", None) is None:  # fp16: the scaler skips bad steps
            grad_ok = self._grads_finite(pl_module, optimizer)
        loss_ok = torch.stack([torch.isfinite(v).all() for v in self._losses]).all() if self._losses else None
        self._losses = []
        if grad_ok is not None or loss_ok is not None:
            ref = grad_ok if grad_ok is not None else loss_ok
            ok = torch.stack([(loss_ok if loss_ok is not None else torch.ones_like(ref)).to(ref.device),
                              grad_ok if grad_ok is not None else torch.ones_like(ref)])
            self._pending.append((trainer.global_step, ok))
        step = trainer.global_step
        # log_every_n_steps=0 (logging off): read every CHECK_EVERY_WITHOUT_LOGGING steps
        every = 1 if self.on_nan == "skip" else (self.check_every_n_steps or trainer.log_every_n_steps
                                                 or CHECK_EVERY_WITHOUT_LOGGING)
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step + 1
        if (step + 1) % every == 0 or last or trainer.should_stop:
            self._check(trainer, pl_module)

    @staticmethod
    def _grads_finite(pl_module: LightningModule, optimizer) -> torch.Tensor | None:
        """Device-side test that every gradient the optimizer will apply is finite (None: no gradients).

        A non-finite entry makes the global 2-norm non-finite. ``gradients.GradientMixin.grad_norm``
        (``ScoreLitModule``) computes that norm once per step and its clipping reuses it; other
        modules get it from the same foreach kernels here. Either way the gradients come from the optimizer's parameter list, not
        from a walk of the module tree."""
        shared = getattr(pl_module, "grad_norm", None)
        if callable(shared):
            norm = shared(optimizer)
        else:
            grads = optimizer_grads(optimizer)
            norm = total_norm(grads) if grads else None
        return None if norm is None else torch.isfinite(norm)

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Read the pending results (one host sync); act on the first non-finite step."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        oks = torch.stack([ok.to(pending[-1][1].device) for _, ok in pending])
        if trainer.world_size > 1:  # a rank-local failure (the loss; all of it under fp16) stops every rank
            oks = trainer.strategy.reduce((~oks).float(), reduce_op="sum") == 0
        if bool(oks.all()):
            return
        i = int(torch.nonzero(~oks.all(dim=1))[0, 0])
        bad_step, now = pending[i][0], trainer.global_step
        if not bool(oks[i, 0]):
            what = "the loss is NaN/Inf"
        elif bad_step == now:
            bad = next((n for n, p in pl_module.named_parameters()
                        if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "<unknown>")
            what = f"the gradient of parameter '{bad}' is NaN/Inf"
        else:
            what = "a gradient is NaN/Inf"
        if bad_step == now and self.on_nan == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            rank_zero_warn(f"[sgm_lightning] NaNGuard: {what} at global step {now}; skipping the optimizer "
                           f"step ({self.skipped}/{self.max_skips} skips).")
            for p in pl_module.parameters():
                p.grad = None
            pl_module.log("train/nan_skips", float(self.skipped), on_step=True, sync_dist=False)
            return
        extra = f" after {self.skipped} skipped steps (max_skips={self.max_skips})" if self.on_nan == "skip" else ""
        when = "stopping before the optimizer step" if bad_step == now else (
            f"found at step {now}, when the device-side check was read (callbacks.nan_guard.check_every_n_steps=1 "
            "stops before the bad step)")
        raise NonFiniteError(
            f"{what} at global step {bad_step}{extra}; {when}, no checkpoint written "
            f"(the last good one is kept: resume with ckpt_path=last). Try a lower learning rate, "
            f"gradient clipping (trainer.gradient_clip_val), fp32 precision, or callbacks.nan_guard.on_nan=skip.")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._check(trainer, pl_module)
        for name, t in checkpoint.get("state_dict", {}).items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"refusing to write a checkpoint at global step {trainer.global_step}: "
                                     f"weight '{name}' is NaN/Inf (the previous checkpoint is kept).")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class InjectNaN(Callback):
    """Test hook: multiply the loss by NaN at global step ``at_step`` (exercise ``NaNGuard``).

    Add it from the command line, e.g. ``+callbacks.inject_nan._target_=sgm_lightning.training.fault_tolerance.InjectNaN
    +callbacks.inject_nan.at_step=3``.
    """

    def __init__(self, at_step: int, times: int = 1):
        check_int("at_step", at_step, min=0)
        check_int("times", times)
        self.at_step, self.times = int(at_step), int(times)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.at_step <= trainer.global_step < self.at_step + self.times:
            loss.mul_(float("nan"))
