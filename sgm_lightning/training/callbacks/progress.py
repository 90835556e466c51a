"""A progress bar that reads the training loss only when it redraws.

Lightning turns every ``prog_bar=True`` metric into a Python number after each batch, which makes
the host wait for the GPU at every step. ``ScoreLitModule`` therefore logs ``train/loss`` without
``prog_bar``, and this bar fetches it (one sync) only on the steps it redraws: every
``refresh_rate`` steps, set to ``trainer.log_every_n_steps`` in ``configs/callbacks/default.yaml``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` showing ``metric`` (default ``train/loss``) as ``loss``."""

    def __init__(self, refresh_rate: int = 1, metric: str = "train/loss", **kwargs):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.metric = metric

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            items["loss"] = f"{float(value):.4g}"
        return items
