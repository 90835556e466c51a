"""Exponential moving average of the weights (Song et al. 2021, App. H; Ho et al. 2020, App. B).

The EMA object lives on the LightningModule (``pl_module.ema``, a torch-ema
``ExponentialMovingAverage``), which also saves and restores it as ``checkpoint["ema"]``; this
callback owns the schedule: it (re)configures the decay at setup, moves the shadow weights to the
module's device, updates them after every optimizer step on every rank (weights are identical
across ranks under DDP, so the averages are too), and swaps them in for validation.
"""

from __future__ import annotations

import lightning as L


class EMACallback(L.Callback):
    """Update ``pl_module.ema`` after each optimizer step.

    Args:
        decay: EMA decay (0.9999 for DDPM++ / DDPM, 0.999 for NCSN++ VE in Song et al. 2021).
        warmup: torch-ema's num_updates warm-up, decay_n = min(decay, (1 + n) / (10 + n)).
        validate_with_ema: swap the EMA weights in during validation.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, validate_with_ema: bool = True):
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.validate_with_ema = bool(validate_with_ema)
        self._last_step = -1
        self._scope = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        ema = getattr(pl_module, "ema", None)
        if ema is None:
            raise ValueError("EMACallback needs a module with an `ema` attribute (ScoreLitModule with ema_decay > 0)")
        ema.decay = self.decay
        if self.warmup and ema.num_updates is None:
            ema.num_updates = 0
        elif not self.warmup:
            ema.num_updates = None

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.ema.to(pl_module.device)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # with gradient accumulation an optimizer step happens only when global_step moves
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            pl_module.ema_update()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.validate_with_ema and not trainer.sanity_checking:
            self._scope = pl_module.ema_scope(True)
            self._scope.__enter__()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._scope is not None:
            self._scope.__exit__(None, None, None)
            self._scope = None
