"""Training callbacks: EMA and sample grids (FID / bits-per-dim callbacks: ``sgm_lightning.evaluation``)."""

from sgm_lightning.training.callbacks.ema import EMACallback
from sgm_lightning.training.callbacks.samples import SampleGridCallback

__all__ = ["EMACallback", "SampleGridCallback"]
