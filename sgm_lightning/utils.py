"""Shared tensor utilities (the one helper module of the math layer: one formula, one place)."""

from __future__ import annotations

import math
import numbers
import os
from typing import Iterable

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


def check_choice(name: str, value, allowed: Iterable) -> None:
    """Raise a ValueError naming the argument and its allowed values when ``value`` is not allowed."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


def check_positive(name: str, value, *, integer: bool = False) -> None:
    """Raise a ValueError naming the argument when ``value`` is not > 0 (``integer=True``: ``check_int``)."""
    if integer:
        check_int(name, value)
        return
    try:
        positive = bool(value > 0)
    except (TypeError, RuntimeError, ValueError):  # a string, None, a tensor of several numbers: not a number
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not positive:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_int(name: str, value, min: int = 1) -> int:
    """``value`` as an int; a ValueError naming the argument unless it is an integer >= ``min``.

    Integral floats (``4.0``, ``1e4`` from YAML) are accepted; bools, strings and ``4.5`` are not.
    """
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < min:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(min, f"an integer >= {min}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def unused_stem(stem: str, suffixes: Iterable[str]) -> str:
    """``stem``, or ``stem-v1``, ``stem-v2``, ...: the first for which no file ``<stem><suffix>`` exists, so that
    a new call's output files never overwrite an earlier call's."""
    suffixes, version, out = tuple(suffixes), 0, stem
    while any(os.path.exists(out + suffix) for suffix in suffixes):
        version += 1
        out = f"{stem}-v{version}"
    return out


def check_flag(name: str, value) -> bool:
    """``value`` as a bool; a ValueError naming the option unless it is True / False (or 1 / 0).

    ``bool("False")`` is True: a string must not silently turn an option on.
    """
    try:
        ok = not isinstance(value, (str, bytes)) and value in (True, False)
    except (TypeError, RuntimeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_number(name: str, value, lo: float = -math.inf, hi: float = math.inf, *, open_ends: bool = False,
                 hi_open: bool = False, what: str = "") -> float:
    """``value`` as a float; a ValueError naming the option unless it is a real number (Python or NumPy
    scalar, not a bool, not NaN) with lo <= value <= hi (strict at both ends with ``open_ends``, at
    ``hi`` with ``hi_open``). ``what`` states the range in the message."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        lo < value < hi if open_ends else lo <= value and (value < hi if hi_open else value <= hi))
    if not ok:
        raise ValueError(f"{name} must be a number{what}, got {value!r}")
    return float(value)
