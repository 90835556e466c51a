"""LightningDataModules: embedded digits, 2-D toys, Hugging Face datasets / image folders, any Dataset.

Classes are imported on first access (PEP 562), so ``import sgm_lightning.training.data.ranges`` stays light.
"""

from importlib import import_module

_EXPORTS = {
    "BaseDataModule": "base",
    "NO_LABEL": "base",
    "split_indices": "base",
    "DigitsDataModule": "embedded",
    "MNISTEmbeddedDataModule": "embedded",
    "ToyDataModule": "toy",
    "TOY_NAMES": "toy",
    "SuperResDataModule": "superres",
    "HFImageDataModule": "hub",
    "MapDataModule": "hub",
    "HUB_ALIASES": "hub",
    "ResumableBatchSampler": "sampler",
    "EpochPermutation": "sampler",
    "DATA_RANGES": "ranges",
    "from_unit": "ranges",
    "to_unit": "ranges",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
