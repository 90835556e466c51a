"""Conditional super-resolution with a diffusion model trained on (high-res, low-res) pairs (SR3,
Saharia et al. 2022, "Image Super-Resolution via Iterative Refinement", Sec. 2).

The network sees the low-resolution image upsampled to the target size, concatenated to x_t along
channels: eps_theta(x_t, y_LR, t) (``nets.unet.UNet(cond_channels=C)``, condition ``x_cond``). It is
trained with the usual denoising loss on p(x | y_LR) and sampled with any sampler of
``sgm_lightning.sampling`` through a score function with the condition bound
(``sr3_score_fn``), so no measurement operator or guidance term is involved.

``downsample`` / ``upsample`` are the degradation and the condition's interpolation; the data
wrapper (``training.data.superres``) and the evaluation (``evaluation.inverse_tasks``) share them,
so the condition at test time is made exactly as in training. ``downsample(mode="area")`` is the
average pooling of ``operators.AvgPoolDownsample`` (the operator DPS inverts).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sgm_lightning.utils import check_choice, check_int

DOWNSAMPLE_MODES = ("area", "bilinear", "bicubic")
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


def downsample(x: torch.Tensor, factor: int, mode: str = "area") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H / factor, W / factor); "area" = average pooling over factor x factor
    blocks, "bilinear" / "bicubic" are antialiased."""
    factor = check_int("factor", factor)  # 2.0 (YAML / JSON) is 2: torch takes no float kernel size
    check_choice("downsample", mode, DOWNSAMPLE_MODES)
    _check_images(x)
    H, W = x.shape[-2:]
    if H % factor or W % factor:
        raise ValueError(f"factor={factor} must divide the image size {H}x{W}: crop or resize the images to "
                         f"multiples of {factor}")
    if mode == "area":
        return F.avg_pool2d(x, factor)
    return F.interpolate(x, size=(H // factor, W // factor), mode=mode, align_corners=False, antialias=True)


def _check_images(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a batch of images of shape (B, C, H, W), got {shape}; add the batch "
                         f"dimension of one image with {name}[None]")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating-point images in the data range, got dtype {x.dtype}; convert "
                         "them first (e.g. x.float() / 127.5 - 1 for uint8 images in [-1, 1])")


def upsample(y: torch.Tensor, size: int | tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Interpolate (B, C, h, w) to ``size`` (SR3's condition: bicubic upsampling of the low-res image)."""
    check_choice("interpolation", mode, UPSAMPLE_MODES)
    _check_images(y, "y")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if mode == "nearest":
        return F.interpolate(y, size=size, mode="nearest")
    return F.interpolate(y, size=size, mode=mode, align_corners=False)


def sr3_condition(x: torch.Tensor, factor: int, down: str = "area", interpolation: str = "bicubic") -> torch.Tensor:
    """The condition of high-res images x: ``upsample(downsample(x))`` back to x's size."""
    return upsample(downsample(x, factor, down), tuple(x.shape[-2:]), interpolation)


def sr3_score_fn(score_model, x_cond: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``score_fn(x, t)`` of a model trained with an image condition, with ``x_cond`` bound
    (any sampler of ``sgm_lightning.sampling`` then draws from p(x | y_LR))."""
    return lambda x, t: score_model.score(x, t, x_cond=x_cond)


def sr3_sample(score_model, sde, x_cond: torch.Tensor, method: str = "ddpm", steps: int | None = None,
               generator: torch.Generator | None = None, **options):
    """Sample high-res images given their upsampled low-res condition ``x_cond`` (B, C, H, W).

    Returns the ``SampleResult`` of ``sgm_lightning.sampling.sample`` (samples shaped like x_cond, on
    its device; a ``device`` option must name that device).
    """
    from sgm_lightning.sampling import sample
    _check_images(x_cond, "x_cond")
    device = options.pop("device", None)
    if device is not None and torch.device(device) != x_cond.device and not (
            torch.device(device).type == x_cond.device.type and torch.device(device).index is None):
        raise ValueError(f"device={device} but x_cond is on {x_cond.device}: the samples are drawn on the "
                         f"condition's device; move it with x_cond.to({str(device)!r}) (or drop device=)")
    return sample(sr3_score_fn(score_model, x_cond), sde, tuple(x_cond.shape), method, steps=steps,
                  generator=generator, device=x_cond.device, **options)
