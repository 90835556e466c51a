"""Training callbacks: EMA, sample grids, FID and bits/dim during training."""

from sgm_lightning.callbacks.ema import EMACallback
from sgm_lightning.callbacks.fid import FIDCallback
from sgm_lightning.callbacks.likelihood import LikelihoodCallback
from sgm_lightning.callbacks.samples import SampleGridCallback

__all__ = ["EMACallback", "FIDCallback", "LikelihoodCallback", "SampleGridCallback"]
