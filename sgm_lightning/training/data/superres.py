"""(high-res, low-res) pairs for SR3 super-resolution (Saharia et al. 2022) from any image DataModule.

``SuperResDataModule(base=<an image DataModule>, factor=4)`` loads ``base``'s train / val split and
returns batches ``(x, y, x_cond)``: x the high-res image, y its label, x_cond the low-res image
(``inverse.sr3.downsample``, average pooling by default) upsampled back to x's size
(``inverse.sr3.upsample``, bicubic by default). ``ScoreLitModule`` passes the third element to the
network as ``x_cond`` (``nets.unet.UNet(cond_channels=C)``). The condition is a deterministic
function of x, computed on the fly.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from sgm_lightning.inverse.sr3 import DOWNSAMPLE_MODES, UPSAMPLE_MODES, sr3_condition
from sgm_lightning.training.data.base import BaseDataModule
from sgm_lightning.utils import check_choice, check_int


class SuperResDataset(Dataset):
    """Items ``(x, y, sr3_condition(x))`` of a map-style dataset of ``(x, y)`` images (C, H, W)."""

    def __init__(self, base: Dataset, factor: int, downsample: str = "area", interpolation: str = "bicubic"):
        self.base, self.factor, self.downsample, self.interpolation = base, int(factor), downsample, interpolation

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i][:2]
        cond = sr3_condition(x.unsqueeze(0), self.factor, self.downsample, self.interpolation)[0]
        return x, y, cond


class SuperResDataModule(BaseDataModule):
    """Wrap an image DataModule into (high-res, label, upsampled low-res) batches.

    Args:
        base: the image DataModule (its batch size, seed, validation split and data range are used).
        factor: downsampling factor (must divide the image size).
        downsample: "area" (average pooling, the degradation of ``AvgPoolDownsample``), "bilinear"
            or "bicubic" (antialiased).
        interpolation: upsampling of the condition, "bicubic" (SR3), "bilinear" or "nearest".
    """

    def __init__(self, *, base: BaseDataModule, factor: int = 2, downsample: str = "area",
                 interpolation: str = "bicubic"):
        super().__init__(batch_size=base.batch_size, num_workers=base.num_workers, pin_memory=base.pin_memory,
                         persistent_workers=base.persistent_workers, seed=base.seed, val_fraction=base.val_fraction,
                         data_range=base.data_range, val_batch_size=base.val_batch_size)
        factor = check_int("factor", factor)  # 2.0 from YAML is 2 (and the dataset id says sr2x)
        check_choice("downsample", downsample, DOWNSAMPLE_MODES)
        check_choice("interpolation", interpolation, UPSAMPLE_MODES)
        shape = tuple(base.data_shape)
        if len(shape) != 3:
            raise ValueError(f"SR3 pairs need images (C, H, W), but the base data has examples of shape {shape}; "
                             "use an image data module as base (e.g. DigitsDataModule)")
        if shape[1] % factor or shape[2] % factor:
            fits = [f for f in range(2, min(shape[1:]) + 1) if shape[1] % f == 0 and shape[2] % f == 0]
            hint = f"use factor={' or '.join(map(str, fits[:4]))}" if fits else "no factor > 1 divides it"
            raise ValueError(f"factor={factor} must divide the image size {shape[1]}x{shape[2]} of the base data "
                             f"(shape {shape}): {hint}, or resize the images")
        self.base = base
        self.factor, self.downsample, self.interpolation = int(factor), downsample, interpolation
        self.data_shape = shape
        self.cond_shape = shape
        self.num_classes = base.num_classes
        self.dataset_id = f"{base.dataset_id}-sr{factor}x-{downsample}-{interpolation}"

    def _load(self):
        self.base.setup("fit")
        train, val = self.base.train_dataset, self.base.val_dataset
        wrap = lambda d: None if d is None else SuperResDataset(d, self.factor, self.downsample,  # noqa: E731
                                                                self.interpolation)
        return wrap(train), wrap(val)

    def reference_dataloader(self, batch_size: int, num_samples: int | None = None):
        return self.base.reference_dataloader(batch_size, num_samples)

