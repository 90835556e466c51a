"""Periodic evaluation callbacks (FID, bits/dim): schedule and logging of their figures."""

from __future__ import annotations

import logging
from typing import Mapping

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def log_evaluation(trainer: L.Trainer, pl_module: L.LightningModule, prefix: str, values: Mapping[str, float],
                   *, on_step: bool, prog_bar: str | None = None) -> None:
    """Log ``{prefix}/{name}: value`` once, at the current global step, and expose it to ``monitor=``.

    The values are already reduced over ranks (every rank holds the same number, so ``sync_dist=False``).
    At the end of a validation epoch ``pl_module.log`` does both. From a training hook (``on_step``),
    ``pl_module.log`` would hand the value to the loggers only on ``log_every_n_steps`` boundaries, so
    the figures go to the loggers directly (``Logger.log_metrics`` at ``trainer.global_step``) and
    ``pl_module.log(..., logger=False)`` puts them in ``trainer.callback_metrics`` (what
    ``ModelCheckpoint(monitor=...)`` / ``EarlyStopping`` read) and the progress bar.
    """
    metrics = {f"{prefix}/{name}": float(v) for name, v in values.items()}
    for key, value in metrics.items():
        pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, logger=not on_step, sync_dist=False,
                      rank_zero_only=False, prog_bar=key == f"{prefix}/{prog_bar}")
    if on_step:
        for logger in trainer.loggers:  # Lightning's loggers write on rank 0 only
            logger.log_metrics(metrics, step=trainer.global_step)


class PeriodicEvaluation(Callback):
    """Base of the evaluation callbacks: ``evaluate(trainer, pl_module) -> {name: value}`` runs every
    ``every_n_steps`` optimizer steps (on every rank: evaluations are collective) and/or at the end of
    each validation epoch, and its figures are logged as ``{prefix}/{name}`` by ``log_evaluation``.

    Subclasses set ``every_n_steps`` (int or None), ``at_validation``, ``prefix`` and ``prog_bar_key``.
    """

    every_n_steps: int | None = None
    at_validation: bool = False
    prefix: str = "val"
    prog_bar_key: str | None = None
    _last_step: int = -1

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        raise NotImplementedError

    def _run_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, on_step: bool) -> None:
        out = self.evaluate(trainer, pl_module)
        log_evaluation(trainer, pl_module, self.prefix, out, on_step=on_step, prog_bar=self.prog_bar_key)
        if trainer.is_global_zero:
            log.info("%s at step %d: %s", type(self).__name__, trainer.global_step, out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        self._run_and_log(trainer, pl_module, on_step=True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.at_validation and not trainer.sanity_checking:
            self._run_and_log(trainer, pl_module, on_step=False)
