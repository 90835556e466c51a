"""Periodic evaluation callbacks (FID, bits/dim): schedule and logging of their figures."""

from __future__ import annotations

import copy
import logging
from typing import Mapping

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def log_evaluation(trainer: L.Trainer, pl_module: L.LightningModule, prefix: str, values: Mapping[str, float],
                   *, on_step: bool, prog_bar: str | None = None, to_loggers: bool = True) -> None:
    """Log ``{prefix}/{name}: value`` once, at the current global step, and expose it to ``monitor=``.

    The values are already reduced over ranks (every rank holds the same number, so ``sync_dist=False``).
    The figures go to the loggers directly (``Logger.log_metrics`` at ``trainer.global_step``, the
    number of optimizer steps the weights have seen) and ``pl_module.log(..., logger=False)`` puts them
    in ``trainer.callback_metrics`` (what ``ModelCheckpoint(monitor=...)`` / ``EarlyStopping`` read) and
    the progress bar. ``pl_module.log`` cannot write them: from a training hook it hands values to the
    loggers only on ``log_every_n_steps`` boundaries, and at the end of a validation epoch Lightning
    writes at ``global_step - 1`` (its counter is increased after the validation), so the figures of
    step N landed on the row of step N - 1, next to those of an evaluation at step N - 1.
    """
    metrics = {f"{prefix}/{name}": float(v) for name, v in values.items()}
    for key, value in metrics.items():
        pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, logger=False, sync_dist=False,
                      rank_zero_only=False, prog_bar=key == f"{prefix}/{prog_bar}")
    for logger in trainer.loggers if to_loggers else ():  # Lightning's loggers write on rank 0 only
        logger.log_metrics(metrics, step=trainer.global_step)


class PeriodicEvaluation(Callback):
    """Base of the evaluation callbacks: ``evaluate(trainer, pl_module) -> {name: value}`` runs every
    ``every_n_steps`` optimizer steps (on every rank: evaluations are collective) and/or at the end of
    each validation epoch, and its figures are logged as ``{prefix}/{name}`` by ``log_evaluation``.

    Subclasses set ``every_n_steps`` (int or None), ``at_validation``, ``prefix`` and ``prog_bar_key``.

    A step evaluation runs after the batch whose optimizer step reached the step: with gradient
    accumulation the other batches of that step see the same ``global_step`` (after a resume from a
    checkpoint of step N, the next batches still show N and evaluated step N a second time). A
    validation at a step that was just evaluated logs the same figures again without recomputing them
    (same weights, same seeds).
    """

    every_n_steps: int | None = None
    at_validation: bool = False
    prefix: str = "val"
    prog_bar_key: str | None = None
    _last_step: int = -1
    _step_at_batch_start: int | None = None
    _last_eval: tuple[int, dict] | None = None  # (global step, figures) of the latest evaluation

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        raise NotImplementedError

    def check_unconditioned(self, pl_module: L.LightningModule) -> None:
        """Refuse, at start-up, a network that needs an image condition (SR3): its samples and likelihoods
        need the low-resolution inputs, which these evaluations do not give (it failed at step N)."""
        if getattr(getattr(getattr(pl_module, "score_model", None), "net", None), "cond_channels", 0):
            raise ValueError(f"{type(self).__name__} evaluates unconditional samples / likelihoods, but this network "
                             f"is conditioned on an image (SR3): switch it off (e.g. callbacks.fid=null, "
                             f"callbacks.likelihood=null) and evaluate with sample.py mode=task task=superres")

    def _run_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, on_step: bool) -> None:
        out = self.evaluate(trainer, pl_module)
        self._last_eval = (trainer.global_step, dict(out))
        log_evaluation(trainer, pl_module, self.prefix, out, on_step=on_step, prog_bar=self.prog_bar_key)
        if trainer.is_global_zero:
            log.info("%s at step %d: %s", type(self).__name__, trainer.global_step, out)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """Restore the state of a checkpoint written when it was keyed by the class name (before the
        subclasses' ``state_key`` named their metric; Lightning only falls back to pre-1.5 keys)."""
        states = checkpoint.get("callbacks") or {}
        legacy = type(self).__qualname__
        if self.state_key not in states and legacy in states:
            self.load_state_dict(copy.deepcopy(states[legacy]))

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_eval = None  # figures of another fit (other weights) are never reused

    def on_train_end(self, trainer, pl_module) -> None:
        self._last_eval = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step \
                or step == self._step_at_batch_start:  # this batch made no optimizer step
            return
        self._last_step = step
        self._run_and_log(trainer, pl_module, on_step=True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.at_validation or trainer.sanity_checking:
            return
        if self._last_eval is not None and self._last_eval[0] == trainer.global_step:
            log_evaluation(trainer, pl_module, self.prefix, self._last_eval[1], on_step=False,
                           prog_bar=self.prog_bar_key, to_loggers=False)  # already written at this step
            return
        self._run_and_log(trainer, pl_module, on_step=False)
