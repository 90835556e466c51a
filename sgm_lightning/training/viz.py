"""Image grids and 2-D scatter images as uint8 arrays (for sample-grid callbacks, sample.py, W&B).

Everything returns ``uint8`` numpy arrays of shape (H, W, C) (C = 1 or 3); Pillow writes PNGs.
No matplotlib.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Sequence

import numpy as np
import torch
from einops import rearrange

from sgm_lightning.training.data.ranges import to_unit
from sgm_lightning.utils import check_int


def to_uint8(x: torch.Tensor, data_range: str = "[-1,1]") -> torch.Tensor:
    """Values in ``data_range`` -> uint8 in [0, 255] (clipped, rounded), same shape (the one converter)."""
    return (to_unit(x.detach().to(torch.float32), data_range).clamp(0, 1) * 255).round().to(torch.uint8)


def to_images(x: torch.Tensor, data_range: str = "[-1,1]") -> np.ndarray:
    """A batch as a numpy array to store: images (B, C, H, W) -> uint8 (B, H, W, C) via ``to_uint8``;
    other data (2-D points, ...) -> float32 as is."""
    if x.ndim != 4:
        return x.detach().float().cpu().numpy()
    return to_uint8(x.cpu(), data_range).permute(0, 2, 3, 1).numpy()


def make_grid(
    x: torch.Tensor, nrow: int | None = None, padding: int = 1, data_range: str = "[-1,1]", pad_value: int = 0
) -> np.ndarray:
    """Tile a batch (B, C, H, W) in ``data_range`` into one uint8 image (rows, cols) -> (H', W', C).

    ``nrow`` images per row (default: ceil(sqrt(B))); ``padding`` pixels of ``pad_value`` between and
    around the tiles.
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    padding = check_int("padding", padding, min=0)
    b, c = x.shape[:2]
    nrow = check_int("nrow", nrow) if nrow is not None else max(1, math.ceil(math.sqrt(b)))
    ncol_rows = math.ceil(b / nrow)
    img = to_uint8(x.cpu(), data_range)
    if ncol_rows * nrow > b:  # fill the last row with blank tiles
        blank = torch.full((ncol_rows * nrow - b, *img.shape[1:]), pad_value, dtype=torch.uint8)
        img = torch.cat([img, blank])
    img = torch.nn.functional.pad(img, (padding, 0, padding, 0), value=pad_value)  # top/left of each tile
    grid = rearrange(img, "(r n) c h w -> (r h) (n w) c", n=nrow)
    grid = torch.nn.functional.pad(grid, (0, 0, 0, padding, 0, padding), value=pad_value)  # bottom/right edge
    return grid.numpy()


def save_image(image: np.ndarray, path: str | os.PathLike) -> str:
    """Write a uint8 (H, W, C) array as an image file atomically (temp file + os.replace)."""
    from PIL import Image

    path = os.fspath(path)
    arr = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(arr)).save(f, format=Image.registered_extensions().get(suffix, "PNG"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 1,
              data_range: str = "[-1,1]") -> np.ndarray:
    """``make_grid`` + ``save_image``; returns the grid."""
    grid = make_grid(x, nrow=nrow, padding=padding, data_range=data_range)
    save_image(grid, path)
    return grid


def picturable(shape: Sequence[int]) -> bool:
    """Whether ``samples_to_image`` draws data of this per-example shape: images (C, H, W) with 1 or 3
    channels, or 2-D points (2,)."""
    shape = tuple(int(s) for s in shape)
    return (len(shape) == 3 and shape[0] in (1, 3)) or shape == (2,)


def samples_to_image(x: torch.Tensor, data_range: str = "[-1,1]", nrow: int | None = None,
                     min_size: int = 256) -> np.ndarray:
    """uint8 HWC picture of a batch: an image grid for images, a scatter plot for 2-D points.

    Small grids (e.g. of 8x8 digits) are enlarged by an integer factor (nearest neighbour) to at
    least ``min_size`` pixels so that they are readable. Other data (``picturable`` is False): ValueError.
    """
    if not picturable(x.shape[1:]):
        raise ValueError(f"no picture for data of shape {tuple(x.shape[1:])} per example: grids draw images "
                         "(C, H, W) with C = 1 or 3 and scatter plots of 2-D points only")
    x = x.detach().float().cpu()
    if x.ndim == 2:
        return scatter_image(x)
    grid = make_grid(x, nrow=nrow or math.ceil(math.sqrt(x.shape[0])), data_range=data_range)
    factor = max(1, -(-min_size // max(grid.shape[:2])))
    return np.ascontiguousarray(grid.repeat(factor, axis=0).repeat(factor, axis=1))


def scatter_image(
    points: torch.Tensor, size: int = 256, range: Sequence[float] | None = (-3.0, 3.0), gamma: float = 0.5
) -> np.ndarray:
    """A 2-D histogram of ``points`` (B, 2) as a uint8 (size, size, 1) image: dark = many points.

    ``range`` = (lo, hi) of both axes (None: the points' extent). The first coordinate is the
    horizontal axis, the second grows upwards. Counts are normalised by the maximum and raised to
    ``gamma`` so that sparse regions stay visible.
    """
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (B, 2), got {tuple(points.shape)}")
    size = check_int("size", size)
    p = points.detach().to(torch.float64).cpu()
    if range is None:
        lo, hi = float(p.min()), float(p.max())
        hi = hi if hi > lo else lo + 1.0
    else:
        lo, hi = float(range[0]), float(range[1])
        if not hi > lo:
            raise ValueError(f"range must be (lo, hi) with hi > lo, got {tuple(range)}")
    ij = ((p - lo) / (hi - lo) * size).floor().long()
    keep = ((ij >= 0) & (ij < size)).all(1)
    ij = ij[keep]
    counts = torch.zeros(size * size, dtype=torch.float64)
    row = size - 1 - ij[:, 1]  # y grows upwards
    counts.index_add_(0, row * size + ij[:, 0], torch.ones(len(ij), dtype=torch.float64))
    counts = counts.reshape(size, size)
    intensity = (counts / counts.max()).pow(gamma) if counts.max() > 0 else counts
    return (255 - (intensity * 255).round()).to(torch.uint8).numpy()[:, :, None]
