"""Real-data feature statistics (mu, Sigma, n), computed once and cached on disk.

A cache entry is keyed by a sha256 of (dataset_id, resolution, split, extractor name, num_samples,
format version) and, for a datamodule that holds out a validation split, of the split that defines
the "train" / "val" examples (``val_fraction``, ``seed``), so statistics of one dataset / split /
feature space can never be reused for another. An unreadable (corrupt, truncated) file is recomputed.
Files are ``<cache_dir>/<dataset_id>_<split>_<key>.npz`` holding ``mu`` (F,), ``sigma`` (F, F)
(unbiased, float64), ``n`` and the key fields; with ``keep_features=True`` also the raw ``features``
(N, F) float32 (needed by KID). Writes are atomic (temporary file + ``os.replace``), so concurrent
processes never read a half-written file.

Cache folder: the ``cache_dir`` argument (config ``metrics.cache_dir``), else ``$SGM_FID_CACHE``,
else ``~/.cache/sgm_lightning/fid_stats``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from sgm_lightning.evaluation.features import extractor_name, signed_images
from sgm_lightning.evaluation.fid import _num_features, make_fid_metric, real_statistics, seeded_global_rng
from sgm_lightning.training.data.ranges import to_signed
from sgm_lightning.utils import check_int

log = logging.getLogger(__name__)

CACHE_ENV = "SGM_FID_CACHE"
CACHE_FORMAT_VERSION = 2  # 2: reference images are never augmented (version 1 flipped them with random_flip)
_STAGES = {"train": "fit", "val": "validate", "test": "test"}


def default_cache_dir() -> Path:
    """``$SGM_FID_CACHE`` or ``~/.cache/sgm_lightning/fid_stats``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/sgm_lightning/fid_stats").expanduser()


def reference_key(dataset_id: str, resolution, split: str, extractor: str, num_samples: int | None,
                  split_spec: dict | None = None) -> str:
    """Hash (16 hex digits) identifying a set of reference statistics; ``split_spec`` (what selects the
    split's examples, see ``split_spec``) enters it when given."""
    fields = {"dataset_id": str(dataset_id), "resolution": list(resolution) if isinstance(resolution, (tuple, list))
              else resolution, "split": str(split), "extractor": str(extractor),
              "num_samples": None if num_samples is None else int(num_samples), "version": CACHE_FORMAT_VERSION}
    if split_spec:
        fields["split_spec"] = dict(split_spec)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ReferenceStats:
    """Cached real statistics. Unpacks as ``mu, sigma, n = stats``; ``hit`` tells whether the cache served it."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int
    key: str
    path: Path
    hit: bool
    features: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.mu, self.sigma, self.n))


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch: a tensor, the first item of a tuple/list, or dict['image'|'x'|'images']."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for k in ("image", "images", "x", "pixel_values"):
            if k in batch:
                return batch[k]
    raise ValueError(f"cannot find the images in a batch of type {type(batch).__name__}; "
                     "yield tensors, (x, y) tuples or dicts with an 'image' key")


def _dataloader(data: Any, split: str, batch_size: int, num_samples: int | None) -> Iterable:
    """Batches of ``split`` in dataset order on this process alone (never a rank's shard)."""
    if split == "train" and hasattr(data, "reference_dataloader"):
        return data.reference_dataloader(batch_size, num_samples)
    dataset = getattr(data, f"{split}_dataset", None)
    if dataset is None and hasattr(data, "setup") and hasattr(data, f"{split}_dataloader"):
        data.setup(_STAGES.get(split, split))
        dataset = getattr(data, f"{split}_dataset", None)
    if dataset is not None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if hasattr(data, f"{split}_dataloader"):
        return getattr(data, f"{split}_dataloader")()
    if isinstance(data, Iterable):
        return data
    raise ValueError(f"data must be a DataLoader (iterable of batches) or a datamodule with {split}_dataloader(), "
                     f"got {type(data).__name__}")


def split_spec(data: Any, split: str) -> dict | None:
    """What selects the examples of ``split`` beyond ``dataset_id``: a datamodule holding out
    ``val_fraction`` of its training data (chosen with ``seed``) has other "train" / "val" examples for
    another fraction or seed (its ``dataset_id`` does not say so). None when there is no such split."""
    fraction = getattr(data, "val_fraction", None)
    if split not in ("train", "val") or not isinstance(fraction, (int, float)) or float(fraction) == 0.0:
        return None
    return {"val_fraction": float(fraction), "seed": getattr(data, "seed", None)}


def _load_cached(path: Path, key: str, keep_features: bool):
    """(mu, sigma, n, features) of a valid cache file for ``key``; None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if str(z["key"]) != key or (keep_features and "features" not in z.files):
                return None
            feats = torch.from_numpy(z["features"]) if keep_features else None
            return torch.from_numpy(z["mu"]), torch.from_numpy(z["sigma"]), int(z["n"]), feats
    except Exception as err:  # truncated / corrupt / foreign file: never a wrong number, recompute it
        log.warning("reference statistics: cannot read %s (%s: %s); recomputing it", path, type(err).__name__, err)
        return None


def _resolution(data: Any, resolution):
    if resolution is not None:
        return resolution
    shape = getattr(data, "data_shape", None)
    if shape is None:
        raise ValueError("resolution is needed for the cache key: pass resolution=(C, H, W) or a datamodule "
                         "with a data_shape attribute")
    return tuple(int(s) for s in shape)


class _TooFewImages(ValueError):
    """Fewer than 2 images to estimate a covariance from."""


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "data"


def _atomic_save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Given(nn.Module):
    """The "extractor" of features computed beforehand: returns them as they are."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def compute_features_statistics(extractor: nn.Module, batches: Iterable, num_samples: int | None = None,
                                device: torch.device | str | None = None, keep_features: bool = False,
                                data_range: str = "[-1,1]"):
    """Accumulate (mu, Sigma, n) of ``extractor`` features over the first ``num_samples`` images of
    ``batches`` (all when None, values in ``data_range`` or uint8 pixels, mapped to the extractors' [-1, 1]) with
    ``FrechetInceptionDistance``'s float64 running sums. Returns (mu, sigma, n, features or None).
    With ``keep_features`` the extractor runs once per batch (it ran twice: for the metric and the copy)."""
    metric = make_fid_metric(_Given(_num_features(extractor)) if keep_features else extractor)
    if device is not None:
        metric, extractor = metric.to(device), extractor.to(device)
    dev = metric.real_features_sum.device
    kept, seen = [], 0
    for batch in batches:
        x = batch_images(batch)
        if num_samples is not None:
            x = x[: num_samples - seen]
        if x.shape[0] == 0:
            break
        # uint8 pixels are not values in data_range (to_signed clipped them all to 1)
        x = signed_images(x.to(dev)) if x.dtype == torch.uint8 else to_signed(signed_images(x.to(dev)), data_range)
        if keep_features:
            f = extractor(x)
            metric.update(f, real=True)
            kept.append(f.float().cpu())
        else:
            metric.update(x, real=True)
        seen += x.shape[0]
        if num_samples is not None and seen >= num_samples:
            break
    if seen < 2:
        raise _TooFewImages(f"need at least 2 reference images, the data gave {seen}")
    if num_samples is not None and seen < num_samples:
        log.warning("reference statistics: asked for %d samples, the data has only %d", num_samples, seen)
    mu, sigma, n = real_statistics(metric)
    return mu.cpu(), sigma.cpu(), n, (torch.cat(kept) if keep_features else None)


def reference_statistics(extractor: nn.Module, data: Any, dataset_id: str, split: str = "train",
                         num_samples: int | None = 50_000, cache_dir: str | os.PathLike | None = None, *,
                         resolution=None, keep_features: bool = False,
                         device: torch.device | str | None = None, batch_size: int = 250,
                         data_range: str | None = None) -> ReferenceStats:
    """Real statistics of ``extractor`` features on ``split`` of a dataset, cached on disk.

    Args:
        extractor: feature network (its ``name`` enters the key).
        data: a DataLoader (use an unshuffled one, so the first ``num_samples`` images are always the
            same), or a datamodule: its ``reference_dataloader`` for "train", else its
            ``<split>_dataset`` read in order with ``batch_size``, else ``<split>_dataloader()``.
        dataset_id: identifies the dataset (and its preprocessing) in the key.
        split: "train" | "val" | "test" (any string is allowed as a key field).
        num_samples: number of images (None = the whole split).
        cache_dir: folder; None -> ``$SGM_FID_CACHE`` or ``~/.cache/sgm_lightning/fid_stats``.
        resolution: data shape for the key; default ``data.data_shape``.
        keep_features: also store / return the raw features (for KID). A cached entry without them
            is recomputed.
        data_range: range of the data's values (default: ``data.data_range``, else "[-1,1]"); the
            images are mapped to [-1, 1] first, so the statistics (and key) do not depend on it.
    """
    if num_samples is not None:
        check_int("num_samples (None: whole split)", num_samples, min=2)
    resolution = _resolution(data, resolution)
    name = extractor_name(extractor)
    spec = split_spec(data, split)
    key = reference_key(dataset_id, resolution, split, name, num_samples, spec)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"{_sanitize(dataset_id)}_{_sanitize(split)}_{key}.npz"
    meta = {"dataset_id": str(dataset_id), "resolution": str(tuple(resolution) if isinstance(resolution, (list, tuple))
            else resolution), "split": str(split), "extractor": name, "num_samples": -1 if num_samples is None
            else int(num_samples), "key": key, **({"split_spec": json.dumps(spec, sort_keys=True)} if spec else {})}
    cached = _load_cached(path, key, keep_features)
    if cached is not None:
        log.info("reference statistics: cache hit %s", path)
        return ReferenceStats(*cached[:3], key, path, True, cached[3], meta)
    log.info("reference statistics: computing %s (%s)", path, meta)
    fix = (f"the reference images come from the {split!r} split of {type(data).__name__}: use a split with data "
           "(FIDCallback(reference_split=...), config metrics.reference_split=train)")
    try:  # under a fixed seed: a dataset drawing augmentations from the global RNG (the Hub datamodules'
        # random flips) gave other statistics on every computation and moved training's random stream
        # only when the cache missed
        with seeded_global_rng(0):
            mu, sigma, n, feats = compute_features_statistics(
                extractor, _dataloader(data, split, batch_size, num_samples), num_samples, device=device,
                keep_features=keep_features, data_range=data_range or getattr(data, "data_range", "[-1,1]"))
    except (MisconfigurationException, NotImplementedError) as err:  # Lightning's stub of a missing split
        raise ValueError(f"{err}; {fix}") from err
    except _TooFewImages as err:
        raise ValueError(f"{err}; {fix}") from err
    arrays = {"mu": mu.numpy(), "sigma": sigma.numpy(), "n": np.int64(n), **{k: np.asarray(v) for k, v in meta.items()}}
    if feats is not None:
        arrays["features"] = feats.numpy()
    _atomic_save_npz(path, **arrays)
    return ReferenceStats(mu, sigma, n, key, path, False, feats, meta)
