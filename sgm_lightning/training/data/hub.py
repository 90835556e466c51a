"""Real image datasets through Hugging Face ``datasets`` (no torchvision), and any map-style Dataset.

``HFImageDataModule(name=...)`` accepts

* a known alias (``HUB_ALIASES``), mapped to a commonly used Hub dataset id:
  mnist -> ylecun/mnist, fashion_mnist -> zalando-datasets/fashion_mnist, cifar10 -> uoft-cs/cifar10,
  celeba -> nielsr/CelebA-faces (202,599 aligned faces, no labels), lsun_bedroom -> pcuenq/lsun-bedrooms,
  lsun_church -> tglcourse/lsun_church_train, ffhq -> merkol/ffhq-256;
* any Hub id ``"user/name"`` (downloaded to ``root`` or ``cache_dir`` when online);
* ``"imagefolder"``: ``root`` is a folder of image files, optionally in class sub-folders (-> labels),
  read with ``datasets.load_dataset("imagefolder", data_dir=root)``;
* ``"parquet"``: ``root`` is a folder of Parquet files with an image column (``Dataset.to_parquet``, the
  Hub's own format), read with ``datasets.load_dataset("parquet", data_dir=root)``;
* any name with ``root`` pointing at a dataset written by ``Dataset.save_to_disk`` /
  ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``).

Images are converted to L/RGB, optionally centre-cropped to a square, resized (PIL bicubic) to
``image_size``, turned into tensors with numpy and mapped to ``data_range``; 16-bit grey images (Pillow
modes "I;16*") are scaled by 1/65535 in float32 instead. ``datasets`` is imported lazily.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sgm_lightning.training.data.base import NO_LABEL, BaseDataModule, split_indices
from sgm_lightning.training.data.labels import hf_num_classes
from sgm_lightning.training.data.ranges import check_data_range, from_unit, to_unit
from sgm_lightning.utils import check_int


@dataclass(frozen=True)
class HubSpec:
    hub_id: str
    channels: int
    image_size: int  # default resolution
    num_classes: int | None
    center_crop: bool = False


HUB_ALIASES = {
    "mnist": HubSpec("ylecun/mnist", 1, 28, 10),
    "fashion_mnist": HubSpec("zalando-datasets/fashion_mnist", 1, 28, 10),
    "cifar10": HubSpec("uoft-cs/cifar10", 3, 32, 10),
    "celeba": HubSpec("nielsr/CelebA-faces", 3, 64, None, center_crop=True),
    "lsun_bedroom": HubSpec("pcuenq/lsun-bedrooms", 3, 256, None, center_crop=True),
    "lsun_church": HubSpec("tglcourse/lsun_church_train", 3, 256, None, center_crop=True),
    "ffhq": HubSpec("merkol/ffhq-256", 3, 256, None),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Hugging Face packaged builders that read the files of a local folder (``root``) -> their file extensions
FOLDER_BUILDERS = {"imagefolder": IMAGE_EXTENSIONS, "parquet": (".parquet",)}
_IMAGE_KEYS = ("img", "image")
_LABEL_KEYS = ("label", "labels")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _has_files(root: Path, extensions: tuple[str, ...]) -> bool:
    return any(f.lower().endswith(extensions) for _, _, files in os.walk(root) for f in files)


def _is_16bit(mode: str) -> bool:
    return mode.startswith("I;16")  # ("I", 32-bit, has no fixed range: converted by Pillow's rules)


def is_grey(mode: str) -> bool:
    """Whether a PIL image mode holds one intensity per pixel (with or without alpha)."""
    return mode in ("1", "L", "LA", "La", "I", "F") or _is_16bit(mode)


def pil_to_tensor(image, channels: int, image_size: int | None, center_crop: bool) -> torch.Tensor:
    """PIL image -> float32 (C, H, W) in [0, 1]: convert to L/RGB, centre-crop, bicubic resize.

    16-bit grey images (modes "I;16", "I;16B", ...) are scaled by 1/65535 and
    resized in float32 (``convert("L")`` would clip every value above 255 to white)."""
    from PIL import Image

    wide = _is_16bit(image.mode)
    if wide:
        image = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0)  # mode "F"
    else:
        image = image.convert("L" if channels == 1 else "RGB")
    if center_crop:
        w, h = image.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    if wide:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).clamp(0.0, 1.0)[None]
        return x.expand(channels, -1, -1).contiguous()
    a = np.asarray(image, dtype=np.uint8)
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(a.copy()).permute(2, 0, 1).to(torch.float32) / 255.0


class HFImageDataset(Dataset):
    """``(x, y)`` items from a Hugging Face image dataset (optionally restricted to ``indices``)."""

    def __init__(self, hf, image_key, label_key, channels, image_size, center_crop, random_flip, data_range,
                 indices=None):
        self.hf, self.image_key, self.label_key = hf, image_key, label_key
        self.channels, self.image_size, self.center_crop = channels, image_size, center_crop
        self.random_flip, self.data_range = random_flip, data_range
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.hf)

    def __getitem__(self, i: int):
        row = self.hf[int(self.indices[i]) if self.indices is not None else int(i)]
        x = pil_to_tensor(row[self.image_key], self.channels, self.image_size, self.center_crop)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        y = int(row[self.label_key]) if self.label_key is not None else NO_LABEL
        return from_unit(x, self.data_range), y


class HFImageDataModule(BaseDataModule):
    """Image datasets from the Hugging Face Hub, an image folder, or a ``save_to_disk`` directory.

    Args:
        name: alias (``HUB_ALIASES``), Hub id "user/name", "imagefolder", "parquet", or anything with
            ``root`` pointing at a ``save_to_disk`` directory.
        root: data on disk (image / Parquet folder, saved dataset); for Hub ids the download cache directory.
        split: training split name.
        val_split: split used for validation (e.g. "test"); None: hold out ``val_fraction`` of ``split``.
        image_key, label_key: columns (auto: "img"/"image" and "label"/"labels"; no label column -> y = -1).
        image_size: output side (default: the alias's resolution, else the first image's size).
        channels: 1 (L) or 3 (RGB) (default: the alias's, else from the first image's mode).
        random_flip: random horizontal flips of training images.
        center_crop: crop the central square before resizing (default: the alias's setting, else False).
        cache_dir: Hugging Face cache directory (default: ``root`` for Hub ids, else the HF default).
        loader_options: batch_size (default 128), num_workers, pin_memory, persistent_workers, seed,
            val_fraction (default 0), data_range, val_batch_size of
            :class:`~sgm_lightning.training.data.base.BaseDataModule`.
    """

    def __init__(
        self,
        *,
        name: str,
        root: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        image_key: str | None = None,
        label_key: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        random_flip: bool = False,
        center_crop: bool | None = None,
        cache_dir: str | None = None,
        **loader_options,
    ):
        super().__init__(**{"batch_size": 128, "val_fraction": 0.0, **loader_options})
        self.save_hyperparameters(logger=False)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a dataset alias ({', '.join(HUB_ALIASES)}), a Hub id, or 'imagefolder'")
        if channels is not None and channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not supported; allowed values: 1 (L), 3 (RGB), None (auto)")
        if image_size is not None:
            check_int("image_size", image_size, min=2)
        self.name, self.split, self.val_split = name, split, val_split
        self.root = Path(root).expanduser() if root is not None else None
        if name in FOLDER_BUILDERS and self.root is None:  # (load_dataset would read the working directory)
            raise ValueError(f"name={name!r} needs root=DIR, a folder of {name} files "
                             f"({', '.join(FOLDER_BUILDERS[name])}; for images, class sub-folders -> labels)")
        spec = HUB_ALIASES.get(name)
        self.hub_id = spec.hub_id if spec is not None else name
        self.cache_dir = cache_dir if cache_dir is not None else (str(self.root) if self.root is not None else None)
        self.image_key, self.label_key = image_key, label_key
        self.random_flip = bool(random_flip)
        self.center_crop = bool(center_crop) if center_crop is not None else bool(spec and spec.center_crop)
        self._image_size = int(image_size) if image_size is not None else (spec.image_size if spec else None)
        self._channels = channels if channels is not None else (spec.channels if spec else None)
        self._num_classes = spec.num_classes if spec is not None else None
        self._inspected = False
        self._hf_cache: dict = {}

    # ------------------------------------------------------------------ opening
    def _source(self) -> str:
        if self.root is not None and _is_saved_dataset(self.root):
            return "disk"
        return self.name if self.name in FOLDER_BUILDERS else "hub"

    def _open(self, split: str):
        """The Hugging Face ``Dataset`` of ``split`` (cached), with a clear error when it is not there."""
        if split in self._hf_cache:
            return self._hf_cache[split]
        import datasets

        source = self._source()
        if source == "disk":
            ds = datasets.load_from_disk(str(self.root))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"split={split!r} is not in the saved dataset at {self.root}; splits: {list(ds)}")
                ds = ds[split]
            elif split != self.split:
                raise ValueError(f"the dataset saved at {self.root} has a single split; set val_split=None")
        elif source in FOLDER_BUILDERS:
            kind = "image" if source == "imagefolder" else source
            if not self.root.is_dir():
                raise FileNotFoundError(
                    f"{kind} folder root={str(self.root)!r} does not exist: put {kind} files there "
                    f"(class sub-folders give labels) or point data.root at the folder"
                )
            if not _has_files(self.root, FOLDER_BUILDERS[source]):
                raise ValueError(
                    f"no {kind} files ({', '.join(FOLDER_BUILDERS[source])}) found under root={str(self.root)!r}"
                )
            ds = datasets.load_dataset(source, data_dir=str(self.root), split=split, cache_dir=self.cache_dir)
        else:
            try:
                ds = datasets.load_dataset(self.hub_id, split=split, cache_dir=self.cache_dir)
            except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
                where = self.cache_dir or datasets.config.HF_DATASETS_CACHE
                raise FileNotFoundError(
                    f"could not load Hub dataset {self.hub_id!r} (name={self.name!r}, split={split!r}) from the cache "
                    f"at {str(where)!r} (offline={datasets.config.HF_HUB_OFFLINE}): {err}\n"
                    f"To get it, run once while online: python -c \"import datasets; datasets.load_dataset("
                    f"'{self.hub_id}', cache_dir={str(where)!r})\"; or save it with Dataset.save_to_disk(DIR) and "
                    f"pass root=DIR; or put image (Parquet) files in DIR and use name=imagefolder (parquet) root=DIR."
                ) from err
        self._hf_cache[split] = ds
        return ds

    def _inspect(self) -> None:
        """Find the image / label columns, channels, size and number of classes from the metadata
        and the first image (memory-mapped; cheap)."""
        if self._inspected:
            return
        import datasets

        ds = self._open(self.split)
        cols = list(ds.features)
        if self.image_key is None:
            found = [k for k in _IMAGE_KEYS if k in cols] or [k for k in cols if isinstance(ds.features[k], datasets.Image)]
            if not found:
                raise ValueError(f"no image column found in {self.hub_id!r}: columns {cols}; set image_key")
            self.image_key = found[0]
        elif self.image_key not in cols:
            raise ValueError(f"image_key={self.image_key!r} is not a column of {self.hub_id!r}; columns: {cols}")
        if self.label_key is None:
            self.label_key = next((k for k in _LABEL_KEYS if k in cols), None)
        elif self.label_key not in cols:
            raise ValueError(f"label_key={self.label_key!r} is not a column of {self.hub_id!r}; columns: {cols}")
        if self._num_classes is None and self.label_key is not None:
            self._num_classes = hf_num_classes(ds, self.label_key, self.hub_id)
        if self._channels is None or self._image_size is None:
            first = ds[0][self.image_key]
            self._channels = self._channels or (1 if is_grey(first.mode) else 3)
            if self._image_size is None:
                w, h = first.size
                if w != h and not self.center_crop:
                    raise ValueError(f"images of {self.hub_id!r} are {w}x{h}: set image_size and/or center_crop=True")
                self._image_size = min(w, h)
        self._inspected = True

    # ------------------------------------------------------------------ cheap attributes
    @property
    def data_shape(self) -> tuple[int, int, int]:
        if self._channels is None or self._image_size is None:
            self._inspect()
        return (self._channels, self._image_size, self._image_size)

    @property
    def num_classes(self) -> int | None:
        if self._num_classes is None and self.name not in HUB_ALIASES:
            self._inspect()
        return self._num_classes

    @property
    def dataset_id(self) -> str:
        if self._source() == "hub":
            base = self.name if self.name in HUB_ALIASES else self.hub_id.replace("/", "--")
        else:
            digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
            base = f"{self._source()}-{self.root.name}-{digest}"
        c, s, _ = self.data_shape
        return f"hf_{base}-{self.split}-{c}x{s}x{s}-{'crop' if self.center_crop else 'resize'}-bicubic"

    # ------------------------------------------------------------------ datasets
    def reference_dataset(self) -> HFImageDataset:  # the training images without random flips
        return self._wrap(self.train_dataset.hf, False, self.train_dataset.indices)

    def _wrap(self, hf, train: bool, indices=None) -> HFImageDataset:
        return HFImageDataset(hf, self.image_key, self.label_key, self._channels, self._image_size, self.center_crop,
                              self.random_flip and train, self.data_range, indices)

    def _load(self):
        self._inspect()
        hf = self._open(self.split)
        if self.val_split is not None:
            return self._wrap(hf, True), self._wrap(self._open(self.val_split), False)
        if self.val_fraction == 0.0:
            return self._wrap(hf, True), None
        tr, va = split_indices(len(hf), self.val_fraction, self.seed)
        return self._wrap(hf, True, tr), self._wrap(hf, False, va)


class MapDataModule(BaseDataModule):
    """Any map-style ``torch.utils.data.Dataset`` (e.g. a torchvision dataset built by Hydra).

    Items may be ``(x, y)`` pairs, bare ``x`` or dicts (keys x / img / image, y / label / labels); ``x`` a
    tensor or numpy array (values in ``input_range``; uint8 ones are pixels 0..255, as torchvision's
    ``read_image`` / ``PILToTensor`` give) or a PIL image; ``y`` missing -> -1.

    Args:
        dataset: training dataset.
        val_dataset: validation dataset (default: hold out ``val_fraction`` of ``dataset``).
        data_shape: shape of one example (default: inferred from the first item).
        num_classes: number of classes (None: unconditional / unknown).
        dataset_id: cache key for reference statistics (default: the dataset's class name and shape).
        input_range: range of float tensor / array items, "[0,1]" (torchvision ToTensor) or "[-1,1]";
            None: keep as is.
        loader_options: as for :class:`HFImageDataModule` (batch_size 128, val_fraction 0 by default).
    """

    def __init__(
        self,
        *,
        dataset: Dataset,
        val_dataset: Dataset | None = None,
        data_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        dataset_id: str | None = None,
        input_range: str | None = "[0,1]",
        **loader_options,
    ):
        super().__init__(**{"batch_size": 128, "val_fraction": 0.0, **loader_options})
        self.save_hyperparameters(ignore=["dataset", "val_dataset"], logger=False)
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(f"dataset must be a map-style Dataset (with __getitem__ and __len__), got {type(dataset)}")
        self.input_range = check_data_range(input_range) if input_range is not None else None
        self._raw, self._raw_val = dataset, val_dataset
        first = _MapView(dataset, self.input_range, self.data_range)[0][0] if data_shape is None else None
        self.data_shape = tuple(data_shape) if data_shape is not None else tuple(first.shape)
        self.num_classes = num_classes
        shape = "x".join(map(str, self.data_shape))
        self.dataset_id = dataset_id or f"map_{type(dataset).__module__}.{type(dataset).__qualname__}-{shape}"

    def _load(self):
        train = _MapView(self._raw, self.input_range, self.data_range)
        if self._raw_val is not None:
            return train, _MapView(self._raw_val, self.input_range, self.data_range)
        return self._split(train)


def _pil_native(image) -> torch.Tensor:
    """PIL image -> float32 (C, H, W) in [0, 1] with its own channels (L, LA, RGB, RGBA); other modes
    are converted first (palette -> RGB / RGBA, "1" -> L, CMYK / YCbCr -> RGB; 16-bit grey scaled by 1/65535)."""
    if _is_16bit(image.mode):
        return pil_to_tensor(image, 1, None, False)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("L" if is_grey(image.mode) else "RGB")
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    return (x[None] if x.ndim == 2 else x.permute(2, 0, 1)).to(torch.float32) / 255.0


class _MapView(Dataset):
    """``(x, y)`` items of any map-style dataset, x float32 in ``data_range``, y int (-1 if absent)."""

    def __init__(self, dataset: Dataset, input_range: str | None, data_range: str):
        self.dataset, self.input_range, self.data_range = dataset, input_range, data_range

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if isinstance(item, dict):  # e.g. a Hugging Face Dataset: {"image": PIL image, "label": int}
            keys = [k for k in ("x", *_IMAGE_KEYS) if k in item]
            if not keys:
                raise ValueError(f"dataset items are dicts with keys {list(item)} but none of 'x', 'img', 'image': "
                                 "return (x, y) pairs, or use HFImageDataModule (image_key=...) for such datasets")
            item = (item[keys[0]], next((item[k] for k in ("y", *_LABEL_KEYS) if k in item), NO_LABEL))
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) >= 2 else (item, NO_LABEL)
        if hasattr(x, "convert"):  # PIL image
            x = from_unit(_pil_native(x), self.data_range)
        else:  # tensors, numpy arrays (same layout, same ranges), lists
            x = torch.as_tensor(x)
            if x.dtype == torch.uint8:  # pixel intensities 0..255
                x = from_unit(x.to(torch.float32) / 255.0, self.data_range)
            elif self.input_range is not None:
                x = from_unit(to_unit(x.to(torch.float32), self.input_range), self.data_range)
        return x.to(torch.float32), int(y)
