"""Conversions between pixel intensities in [0, 1] and the model's data range (one place for both ways)."""

from __future__ import annotations

import torch

DATA_RANGES = ("[-1,1]", "[0,1]")


def check_data_range(data_range: str) -> str:
    """Return ``data_range`` when it is one of ``DATA_RANGES``; raise a ValueError naming it otherwise."""
    if data_range not in DATA_RANGES:
        raise ValueError(f"data_range={data_range!r} is not supported; allowed values: {', '.join(DATA_RANGES)}")
    return data_range


def range_bounds(data_range: str) -> tuple[float, float]:
    """(low, high) of ``data_range``."""
    return (-1.0, 1.0) if check_data_range(data_range) == "[-1,1]" else (0.0, 1.0)


def from_unit(x01: torch.Tensor, data_range: str) -> torch.Tensor:
    """Map intensities in [0, 1] to ``data_range`` (x -> 2x - 1 for "[-1,1]")."""
    lo, hi = range_bounds(data_range)
    return x01 * (hi - lo) + lo


def to_unit(x: torch.Tensor, data_range: str) -> torch.Tensor:
    """Map values in ``data_range`` back to [0, 1] (no clipping)."""
    lo, hi = range_bounds(data_range)
    return (x - lo) / (hi - lo)


def to_signed(x: torch.Tensor, data_range: str) -> torch.Tensor:
    """Map values in ``data_range`` to [-1, 1], clipped: the range the feature networks of the
    evaluation layer expect, whatever range the model was trained in."""
    return from_unit(to_unit(x, data_range).clamp(0.0, 1.0), "[-1,1]")
