"""Time/noise-level and class-label embeddings for score networks.

A score network is called ``net(x, label, y=None)``; ``label`` is a (B,) float tensor chosen by
``ScoreModel`` (999 t / T, log sigma, or EDM's log(sigma) / 4). The embeddings here assume nothing
about its range beyond "a real number of magnitude up to ~1000".

* ``sinusoidal_embedding`` -- the Transformer positional encoding (Vaswani et al. 2017, Sec. 3.5)
  used as the DDPM timestep embedding (Ho et al. 2020, App. B).
* ``GaussianFourierFeatures`` -- random Fourier features gamma(v) = [sin(2 pi W v), cos(2 pi W v)]
  with fixed W ~ N(0, s^2) (Tancik et al. 2020, Eq. 5; Song et al. 2021, NCSN++ with log sigma labels).
* ``TimeEmbedding`` -- either feature map followed by a two-layer SiLU MLP (Ho et al. 2020).
* ``LabelEmbedding`` -- a learned table with one extra "null" row for classifier-free guidance
  (Ho & Salimans 2022, Alg. 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sgm_lightning.utils import check_choice, check_int, check_positive

EMBEDDINGS = ("sinusoidal", "fourier")


def check_even(name: str, value: int) -> int:
    """``value`` as an int; a ValueError naming it unless it is an even positive integer (sin / cos halves)."""
    if check_int(name, value) % 2:
        raise ValueError(f"{name} must be an even positive integer (sin and cos halves), got {value!r}")
    return int(value)


def check_label(label: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return the time/noise label as a (B,) tensor in ``x``'s dtype (a scalar is broadcast to B)."""
    label = torch.as_tensor(label, device=x.device)
    if label.ndim == 0:
        label = label.expand(x.shape[0])
    if label.shape != (x.shape[0],):
        raise ValueError(f"label must have shape (B,) = ({x.shape[0]},), got {tuple(label.shape)}")
    return label.to(x.dtype if x.is_floating_point() else torch.float32)


def sinusoidal_embedding(label: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) label (Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020, App. B).

    With k = dim / 2 frequencies omega_i = max_period^(-i / k), i = 0..k-1, returns
    [sin(omega_i * label), cos(omega_i * label)] of shape (B, dim). The frequencies span
    [1/max_period, 1], so labels from ~1e-2 (log sigma / 4) up to ~1e3 (999 t) are resolved.
    Computed in float32 (or float64 for float64 labels) for accuracy at large labels.
    """
    half = check_even("dim", dim) // 2
    dtype = torch.float64 if label.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=label.device, dtype=dtype) / half)
    args = label.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class GaussianFourierFeatures(nn.Module):
    """Random Fourier features of a scalar (Tancik et al. 2020, Eq. 5; Song et al. 2021, App. H.2).

    gamma(v) = [sin(2 pi W v), cos(2 pi W v)], W ~ N(0, scale^2 I_{dim/2}) drawn once at
    construction and kept fixed (stored as a buffer: it is in the state dict but is not a
    trainable parameter, so every *parameter* of a network receives a gradient). Song et al. use
    scale = 16 with the label log sigma; with labels of magnitude ~1000 prefer a small scale or the
    sinusoidal embedding.
    """

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        dim = check_even("dim", dim)
        check_positive("fourier_scale", scale)
        self.dim = int(dim)
        self.scale = float(scale)
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if label.dtype == torch.float64 else torch.float32
        args = 2 * math.pi * label.to(dtype)[:, None] * self.W.to(dtype)[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeEmbedding(nn.Module):
    """Embed the (B,) time/noise label: feature map (``kind``) -> Linear -> SiLU -> Linear.

    Args:
        dim: size of the sinusoidal / Fourier feature vector (even).
        kind: "sinusoidal" (Ho et al. 2020) or "fourier" (Song et al. 2021, NCSN++).
        fourier_scale: standard deviation s of the Fourier frequencies W (``kind="fourier"``).
        out_dim: size of the embedding vector returned (default 4 * dim, as in DDPM).
    Returns (B, out_dim) in the label's floating dtype (float32 for integer labels).
    """

    def __init__(self, dim: int, kind: str = "sinusoidal", fourier_scale: float = 16.0,
                 out_dim: int | None = None):
        super().__init__()
        dim = check_even("dim", dim)
        check_choice("embedding", kind, EMBEDDINGS)
        out_dim = check_int("out_dim", 4 * dim if out_dim is None else out_dim)
        self.dim, self.kind, self.out_dim = int(dim), kind, int(out_dim)
        self.fourier = GaussianFourierFeatures(dim, fourier_scale) if kind == "fourier" else None
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        if label.ndim != 1:
            raise ValueError(f"label must have shape (B,), got {tuple(label.shape)}")
        feats = self.fourier(label) if self.fourier is not None else sinusoidal_embedding(label, self.dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """Learned class embedding with a "null" class for classifier-free guidance (Ho & Salimans 2022).

    The table has ``num_classes + 1`` rows; row ``num_classes`` is the null (unconditional) label.
    Class labels y (LongTensor (B,)) take values 0..num_classes-1 for a class, and either
    ``num_classes`` or -1 for "no label" (-1 is mapped to ``num_classes``). ``y=None`` means
    "unconditional" for the whole batch. Label dropout for classifier-free guidance training is done
    by the caller (replace a random subset of y by -1 or ``num_classes``).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        num_classes, dim = check_int("num_classes", num_classes), check_int("dim", dim)
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        """Index of the null (unconditional) class."""
        return self.num_classes

    def forward(self, y: torch.Tensor | None, batch: int | None = None, device=None) -> torch.Tensor:
        """(B, dim) embedding of class labels ``y``; ``y=None`` embeds the null class ``batch`` times."""
        if y is None:
            if batch is None:
                raise ValueError("LabelEmbedding needs batch= when y is None")
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device or self.table.weight.device)
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")
        if y.ndim != 1 or (batch is not None and y.shape[0] != batch):
            raise ValueError(f"y must have shape (B,) = ({batch},), got {tuple(y.shape)}")
        if bool(((y < -1) | (y > self.num_classes)).any()):
            raise ValueError(f"y must lie in 0..{self.num_classes - 1} (classes) or be {self.num_classes} / -1 "
                             f"(null label), got values in [{int(y.min())}, {int(y.max())}]")
        y = torch.where(y < 0, torch.full_like(y, self.num_classes), y).long()
        return self.table(y)


def embed_conditions(time_embed: nn.Module, label_embed: LabelEmbedding | None, label, x: torch.Tensor,
                     y: torch.Tensor | None) -> torch.Tensor:
    """SiLU(time embedding of ``label`` + class embedding of ``y``): the conditioning vector of a score
    network (``label_embed`` None: unconditional network, which refuses class labels)."""
    emb = time_embed(check_label(label, x))
    if label_embed is not None:
        emb = emb + label_embed(y, batch=x.shape[0], device=x.device)
    elif y is not None:
        raise ValueError("class labels y were given but the network has num_classes=None; "
                         "build it with num_classes=K for class conditioning")
    return nn.functional.silu(emb)
