"""What a training step logs, and when: the hot path reads nothing from the device.

``StepMetricsMixin`` sums the step losses on the device and logs ``train/loss`` (their mean) once per
logging interval; on logging steps only it logs the loss per noise-level bucket, the throughput and
the learning rate. ``_logging_step()`` tells the other hooks (clipping: ``train/grad_norm``) whether
this step's metrics reach a logger. The module sets ``hparams.num_loss_buckets`` and ``sde`` and calls
``_init_step_metrics()`` in its constructor.
"""

from __future__ import annotations

import time

import torch


def ends_optimizer_step(trainer, batch_idx: int) -> bool:
    """Whether training batch ``batch_idx`` is the last of its optimizer step (``trainer.accumulate_grad_batches``
    batches per step, fewer at the end of an epoch). With gradient accumulation every batch of a step has the
    same ``global_step``; between two micro-batches the accumulated gradients are in no checkpoint."""
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    return accumulate == 1 or (batch_idx + 1) % accumulate == 0 or batch_idx + 1 >= trainer.num_training_batches


class StepMetricsMixin:
    """Per-step metric bookkeeping of a LightningModule (see the module docstring)."""

    def _init_step_metrics(self) -> None:
        self._last_log_time: float | None = None
        self._images_since_log = 0
        self._interval_loss: torch.Tensor | None = None  # sum of the step losses since the last log
        self._interval_steps = 0

    def _track_loss(self, loss: torch.Tensor) -> None:
        """Add a step's loss to the interval sum, on the device. ``train/loss`` is the mean loss of
        the steps since the last logging step, logged once per interval: a ``self.log`` call costs
        ~1,700 Python calls of bookkeeping (its ``to(device)`` walk), too much for every step."""
        value = loss.detach().float()
        if self._interval_loss is None:
            self._interval_loss = torch.zeros((), device=value.device)
        elif self._interval_loss.device != value.device:
            self._interval_loss = self._interval_loss.to(value.device)  # restored from a checkpoint
        self._interval_loss.add_(value)
        self._interval_steps += 1

    def _ends_optimizer_step(self, batch_idx: int) -> bool:
        """``ends_optimizer_step`` of this module's trainer: ``train/loss`` is logged once per optimizer step."""
        return ends_optimizer_step(self.trainer, batch_idx)

    def _interval_end(self) -> bool:
        """Whether this step ends a logging interval (every ``trainer.log_every_n_steps`` steps, and
        the step at which the trainer stops), whether or not a logger is attached; never when
        ``log_every_n_steps`` is 0 (logging off, as in Lightning)."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer
            return False
        every = trainer.log_every_n_steps
        return bool(every) and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)

    def _logging_step(self) -> bool:
        """Whether this step's metrics reach a logger (every ``trainer.log_every_n_steps`` steps)."""
        try:
            loggers = self.trainer.loggers
        except RuntimeError:  # not attached to a Trainer
            return False
        return bool(loggers) and self._interval_end()

    def _log_buckets(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        """``train/loss_t<lo>-<hi>``: the mean loss of this step's examples (over all ranks) whose t falls in
        each of ``num_loss_buckets`` equal bins of [0, T]. A bin without examples is logged as NaN (a gap in the
        charts): not logging it made Lightning repeat its last value."""
        k = self.hparams.num_loss_buckets
        idx = (t.double() / self.sde.T * k).long().clamp(0, k - 1)
        sums = torch.zeros(2, k, dtype=torch.float64, device=losses.device)
        sums[0].index_add_(0, idx, losses.double())
        sums[1].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        if self.trainer.world_size > 1:  # every rank reaches this on the same (logging) step
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = torch.where(sums[1] > 0, sums[0] / sums[1].clamp(min=1), torch.full_like(sums[0], float("nan")))
        for b, value in enumerate(means.float().unbind()):
            lo, hi = b / k * self.sde.T, (b + 1) / k * self.sde.T
            self.log(f"train/loss_t{lo:.1f}-{hi:.1f}", value)

    def _log_throughput(self) -> None:
        # images over the wall time between two logging steps (the host runs ahead of the GPU by at
        # most a few steps, so over log_every_n_steps steps this is the device's rate)
        now = time.perf_counter()
        if self._last_log_time is not None and now > self._last_log_time:
            self.log("train/img_per_sec", self._images_since_log * self.trainer.world_size / (now - self._last_log_time))
        self._last_log_time, self._images_since_log = now, 0

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._logging_step():  # the one learning-rate metric (no LearningRateMonitor needed)
            self.log("train/lr", float(optimizer.param_groups[0]["lr"]))
