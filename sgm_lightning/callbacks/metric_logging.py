"""Logging of evaluation figures (FID, bits/dim) computed inside callbacks."""

from __future__ import annotations

from typing import Mapping

import lightning as L
import torch


def log_evaluation(trainer: L.Trainer, pl_module: L.LightningModule, prefix: str, values: Mapping[str, float],
                   *, on_step: bool, prog_bar: str | None = None) -> None:
    """Log ``{prefix}/{name}: value`` once, at the current global step, and expose it to ``monitor=``.

    The values are already reduced over ranks (every rank holds the same number). From a training
    hook (``on_step``) they go straight to the loggers at ``trainer.global_step`` and into
    ``trainer.callback_metrics`` (what ``ModelCheckpoint(monitor=...)`` / ``EarlyStopping`` read):
    ``self.log`` from ``on_train_batch_end`` would keep the value in the step results and log it again,
    stale, at the next step. At the end of a validation epoch ``self.log`` is the right tool.
    """
    metrics = {f"{prefix}/{name}": float(v) for name, v in values.items()}
    if not on_step:
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=False,
                          prog_bar=key == f"{prefix}/{prog_bar}")
        return
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(value)
    if prog_bar is not None:
        trainer.progress_bar_metrics[f"{prefix}/{prog_bar}"] = metrics[f"{prefix}/{prog_bar}"]
    for logger in trainer.loggers:  # Lightning's loggers write on rank 0 only
        logger.log_metrics(metrics, step=trainer.global_step)
