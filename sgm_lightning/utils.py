"""Shared tensor utilities (the one helper module of the math layer: one formula, one place)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to a per-example tensor ``v`` (shape (B,)) until it has ``ndim`` dims.

    Used to broadcast per-example scalars (alpha(t), sigma(t), beta(t), ...) against data of any
    shape (B, ...): 2-D points, images, sequences.
    """
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor with {v.ndim} dims to {ndim} dims")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast the per-example tensor ``v`` (B,) against ``like`` (B, ...)."""
    return append_dims(v, like.ndim)


def batch_dim_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def batch_dim_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def num_dims(x: torch.Tensor) -> int:
    """Number of data dimensions per example, D = prod(shape[1:])."""
    n = 1
    for s in x.shape[1:]:
        n *= int(s)
    return n


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` drawn from ``generator`` (global RNG when None)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def rand_like_batch(x: torch.Tensor, generator: torch.Generator | None = None, dtype=None) -> torch.Tensor:
    """Uniform U(0, 1) draws of shape (B,) on ``x``'s device."""
    return torch.rand(x.shape[0], generator=generator, device=x.device, dtype=dtype or x.dtype)


def rademacher_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rademacher (+-1) noise shaped like ``x`` (Hutchinson 1989 trace probes)."""
    return torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def time_tensor(t, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """Turn a python float or a 0-d / (B,) tensor ``t`` into a (B,) tensor."""
    t = torch.as_tensor(t, device=device, dtype=dtype)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


def check_choice(name: str, value, allowed: Iterable) -> None:
    """Raise a ValueError naming the argument and its allowed values when ``value`` is not allowed."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


def check_positive(name: str, value, *, integer: bool = False) -> None:
    """Raise a ValueError naming the argument when ``value`` is not > 0 (or not an integer when asked)."""
    if integer and (isinstance(value, bool) or int(value) != value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_shape(name: str, tensor: torch.Tensor, shape: Sequence[int]) -> None:
    """Raise a ValueError when ``tensor`` does not have exactly ``shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def make_generator(seed: int | None, device="cpu") -> torch.Generator | None:
    """A torch.Generator on ``device`` seeded with ``seed`` (None when seed is None)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
