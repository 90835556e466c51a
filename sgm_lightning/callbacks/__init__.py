"""Training callbacks: EMA, sample grids (and, from other modules, FID / likelihood)."""

from sgm_lightning.callbacks.ema import EMACallback
from sgm_lightning.callbacks.samples import SampleGridCallback

__all__ = ["EMACallback", "SampleGridCallback"]
