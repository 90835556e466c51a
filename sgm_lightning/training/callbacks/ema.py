"""Exponential moving average of the weights (Song et al. 2021, App. H; Ho et al. 2020, App. B;
by half-life in images: Karras et al. 2022, App. F.1).

The EMA object lives on the LightningModule (``pl_module.ema``, a torch-ema
``ExponentialMovingAverage``), which also saves and restores it as ``checkpoint["ema"]`` (shadow
weights, decay and update counter). The schedule is set by the module's hyperparameters only
(``ema_decay``, ``ema_warmup``, ``ema_halflife_img``, ``ema_rampup_ratio``, e.g.
``model.ema_halflife_img=500000 model.ema_rampup_ratio=0.05`` for EDM's 0.5 Mimg half-life in any
recipe); this callback decides *when*: it moves the shadow weights to the module's device, calls
``pl_module.ema_update`` after every optimizer step on every rank (weights are identical across
ranks under DDP, so the averages are too), and swaps them in for validation. With EMA disabled
(``ema_decay=0`` and no half-life: ``pl_module.ema`` is None) it does nothing.
"""

from __future__ import annotations

import lightning as L


class EMACallback(L.Callback):
    """Call ``pl_module.ema_update`` after each optimizer step.

    Args:
        validate_with_ema: swap the EMA weights in during validation.
    """

    def __init__(self, validate_with_ema: bool = True):
        super().__init__()
        self.validate_with_ema = bool(validate_with_ema)
        self._last_step = -1
        self._scope = None

    @staticmethod
    def _ema(pl_module):
        return getattr(pl_module, "ema", None)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._ema(pl_module) is not None:
            pl_module.ema.to(pl_module.device)
        self._last_step = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run restores global_step after on_fit_start: read it again, or the first batch
        # (a micro-batch that does not step, under gradient accumulation) would count as a step
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # with gradient accumulation an optimizer step happens only when global_step moves
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            if self._ema(pl_module) is not None:
                pl_module.ema_update(images_per_step=self._images_per_step(trainer, batch))

    @staticmethod
    def _images_per_step(trainer, batch) -> int | None:
        """Examples of one optimizer step over all ranks (this rank's batch x ranks x accumulation)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not hasattr(x, "shape"):
            return None
        return int(x.shape[0]) * int(getattr(trainer, "world_size", 1)) * \
            int(getattr(trainer, "accumulate_grad_batches", 1))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.validate_with_ema and not trainer.sanity_checking and self._ema(pl_module) is not None:
            self._scope = pl_module.ema_scope(True)
            self._scope.__enter__()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._scope is not None:
            self._scope.__exit__(None, None, None)
            self._scope = None
