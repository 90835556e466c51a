"""Image restoration tasks on top of the posterior samplers: inpainting, colorization,
super-resolution and deblurring, with PSNR / SSIM (torchmetrics, images mapped to [0, 1]).

``run_inverse_task`` builds the operator of the task, measures the ground-truth images, runs the
chosen solver with ``score_model.score`` (posterior sampling with an unconditional prior: DPS,
replacement, RePaint; or, for super-resolution, a conditional SR3 model, ``inverse.sr3``, and the
plain bicubic upsampling baseline) and returns everything needed for a grid (``make_task_grid``:
rows input / measurement / reconstruction / truth) and a JSON summary; ``restore_dataset_images`` is
``sample.py mode=task``: it restores the first images of a data module's split and writes the files.
"""

from __future__ import annotations

import json
import os

import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from sgm_lightning.inverse.operators import (AvgPoolDownsample, BoxInpainting, GaussianBlur, Grayscale,
                                             HalfInpainting, LinearOperator, RandomInpainting)
from sgm_lightning.inverse.solvers import dps_sample, repaint_sample, replacement_sample
from sgm_lightning.inverse.sr3 import sr3_sample, upsample
from sgm_lightning.training.data.ranges import range_bounds, to_unit
from sgm_lightning.utils import check_choice, unused_stem

TASKS = ("inpaint", "colorize", "superres", "deblur")
METHODS = ("dps", "replacement", "repaint", "sr3", "bicubic")
SUPERRES_ONLY = ("sr3", "bicubic")  # conditional model / interpolation baseline of task="superres"
MASKS = ("box", "random", "half")
_OPERATOR_KEYS = {"mask", "box", "fraction", "seed", "side", "weights", "factor", "kernel_size", "blur_sigma",
                  "padding", "sigma_y"}
_SOLVERS = {"dps": dps_sample, "replacement": replacement_sample, "repaint": repaint_sample}


def make_operator(task: str, channels: int = 3, *, mask: str = "box", box=None, fraction: float = 0.5,
                  seed: int = 0, side: str = "right", weights: str = "mean", factor: int = 2,
                  kernel_size: int = 9, blur_sigma: float = 2.0, padding: str = "reflect",
                  sigma_y: float = 0.0) -> LinearOperator:
    """The measurement operator of ``task`` (one of TASKS) with its options."""
    check_choice("task", task, TASKS)
    if task == "inpaint":
        check_choice("mask", mask, MASKS)
        if mask == "box":
            return BoxInpainting(box=box, sigma_y=sigma_y)
        if mask == "random":
            return RandomInpainting(fraction=fraction, seed=seed, sigma_y=sigma_y)
        return HalfInpainting(side=side, sigma_y=sigma_y)
    if task == "colorize":
        return Grayscale(weights=weights, channels=channels, sigma_y=sigma_y)
    if task == "superres":
        return AvgPoolDownsample(factor=factor, sigma_y=sigma_y)
    return GaussianBlur(kernel_size=kernel_size, sigma=blur_sigma, padding=padding, sigma_y=sigma_y)


def image_metrics(reconstruction: torch.Tensor, truth: torch.Tensor,
                  data_range: str = "[-1,1]") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM (B,) of images in ``data_range`` ("[-1,1]" or "[0,1]"), computed on
    [0, 1] (data_range 1).

    SSIM's Gaussian window is 11 pixels with std 1.5 (Wang et al. 2004), shrunk to the largest odd size k
    that fits small images, with std 1.5 k / 11 (torchmetrics sizes a Gaussian window by its std alone:
    2 int(3.5 std + 0.5) + 1 pixels, and ignores ``kernel_size``).
    """
    p = to_unit(reconstruction.float(), data_range).clamp(0, 1)
    q = to_unit(truth.float(), data_range).clamp(0, 1)
    psnr = peak_signal_noise_ratio(p, q, data_range=1.0, reduction="none", dim=(1, 2, 3))
    k = min(11, min(p.shape[-2:]))
    k = k if k % 2 else k - 1
    ssim = structural_similarity_index_measure(p, q, data_range=1.0, kernel_size=k, sigma=1.5 * k / 11,
                                               reduction="none")
    return psnr, ssim


def run_inverse_task(score_model, sde, images: torch.Tensor, task: str, method: str, steps: int,
                     generator: torch.Generator | None = None, data_range: str = "[-1,1]", **task_options) -> dict:
    """Restore ``images`` (B, C, H, W in ``data_range``) from their measurement with ``method``.

    Args:
        score_model: a ``ScoreModel`` (its ``score`` is the prior score; differentiable for DPS).
        sde: its forward SDE.
        task: "inpaint" | "colorize" | "superres" | "deblur".
        method: "dps" | "replacement" | "repaint" (the last two need an operator with a
            pseudo-inverse, i.e. not "deblur"); for task="superres" also "sr3" (``score_model`` was
            trained on SR3 pairs: its network takes ``x_cond``, the low-res measurement upsampled
            with ``interpolation``, and ``sampler`` draws from p(x | y)) and "bicubic" (the
            upsampled measurement itself, no model).
        steps: number of solver steps.
        generator: randomness of the measurement noise and the solver.
        data_range: the images' range, "[-1,1]" or "[0,1]" (the model's): outputs are clipped to it
            and PSNR / SSIM computed on it mapped to [0, 1].
        task_options: operator options (mask, box, fraction, seed, side, weights, factor,
            kernel_size, blur_sigma, padding, sigma_y) and solver options (zeta, guidance, snr,
            corrector_steps, jump_length, resamplings, eps, denoise; for sr3: interpolation
            (default "bicubic"), sampler (default "ddpm") and that sampler's options).
    Returns:
        dict with "reconstruction", "measurement" (y shown in image space: A^+ y, the upsampled
        low-resolution or replicated gray image, the blurred image), "input" (the noise-free
        degraded truth A^+ A x; the blurred truth for deblurring), "truth", "psnr" (B,), "ssim" (B,),
        "nfe", "task", "method", "operator" (repr).
    """
    check_choice("task", task, TASKS)
    check_choice("method", method, METHODS)
    lo, hi = range_bounds(data_range)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    op_kwargs = {k: v for k, v in task_options.items() if k in _OPERATOR_KEYS}
    solver_kwargs = {k: v for k, v in task_options.items() if k not in _OPERATOR_KEYS}
    if method in SUPERRES_ONLY and task != "superres":
        raise ValueError(f"method={method!r} solves task='superres' only, got task={task!r}")
    operator = make_operator(task, channels=images.shape[1], **op_kwargs)
    if method != "dps" and not operator.has_pinv:
        raise ValueError(f"method={method!r} needs a pseudo-inverse, which task={task!r} lacks; use method='dps'")
    y = operator.measure(images, generator=generator)
    if method in SUPERRES_ONLY:
        x_cond = upsample(y, tuple(images.shape[-2:]), solver_kwargs.pop("interpolation", "bicubic"))
        sampler = solver_kwargs.pop("sampler", "ddpm")
        if method == "bicubic":
            recon, nfe = x_cond.clamp(lo, hi), 0
        else:
            with torch.no_grad():
                result = sr3_sample(score_model, sde, x_cond, method=sampler, steps=steps, generator=generator,
                                    **solver_kwargs)
            recon, nfe = result.samples.detach().clamp(lo, hi), result.nfe
    else:
        result = _SOLVERS[method](score_model.score, sde, operator, y, steps=steps, shape=tuple(images.shape),
                                  generator=generator, **solver_kwargs)
        recon, nfe = result.samples.detach().clamp(lo, hi), result.nfe
    with torch.no_grad():
        degraded = operator.forward(images)
        shown_input = operator.pinv(degraded) if operator.has_pinv else degraded
        measurement = operator.to_image(y)
    psnr, ssim = image_metrics(recon, images, data_range)
    return {"reconstruction": recon, "measurement": measurement.clamp(lo, hi), "input": shown_input.clamp(lo, hi),
            "truth": images, "psnr": psnr, "ssim": ssim, "nfe": nfe, "task": task, "method": method,
            "operator": repr(operator)}


def make_task_grid(result: dict) -> torch.Tensor:
    """Stack rows input / measurement / reconstruction / truth into a (4B, C, H, W) tensor."""
    rows = [result[k] for k in ("input", "measurement", "reconstruction", "truth")]
    C = rows[-1].shape[1]
    rows = [r.expand(-1, C, -1, -1) if r.shape[1] == 1 else r for r in rows]
    return torch.cat([r.detach().to(rows[-1].dtype) for r in rows], dim=0)


def first_images(datamodule, num_images: int) -> tuple[torch.Tensor, str]:
    """The first ``num_images`` images of the validation split (the training set when there is none),
    in dataset order, and the split's name."""
    datamodule.setup("fit")
    val = getattr(datamodule, "val_dataset", None)
    split = "val" if val is not None and len(val) > 0 else "train"
    images, n = [], 0
    for batch in DataLoader(val if split == "val" else datamodule.train_dataset, batch_size=256, shuffle=False):
        images.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
        n += len(images[-1])
        if n >= num_images:
            break
    return torch.cat(images)[:num_images], split


def restore_dataset_images(module, datamodule, *, task: str, method: str, num_images: int, steps: int, seed: int,
                           use_ema: bool, out_dir: str, settings: dict | None = None, **task_options) -> dict:
    """Restore the ``first_images`` of ``datamodule`` with ``module`` (a ``ScoreLitModule``, its EMA weights
    when ``use_ema``) and write ``<task>_<method>_{truth,measurement,reconstruction,grid}.png`` (the grid:
    input / measurement / reconstruction / truth, one column per image) and ``<task>_<method>_metrics.json``
    (per-image and mean PSNR / SSIM, NFE, ``settings``). Returns the mean PSNR / SSIM and the paths."""
    from sgm_lightning.training.viz import samples_to_image, save_image

    images, split = first_images(datamodule, num_images)
    images = images.to(module.device)
    g = torch.Generator(device=module.device).manual_seed(int(seed))
    data_range = module.hparams.data_range
    keys = ("truth", "measurement", "reconstruction", "grid")
    # an earlier call's files in out_dir are kept: this one writes <task>_<method>-v1_*, ...
    stem = unused_stem(os.path.join(out_dir, f"{task}_{method}"), [f"_{k}.png" for k in keys] + ["_metrics.json"])
    with module.ema_scope(use_ema):
        out = run_inverse_task(module.score_model, module.sde, images, task=task, method=method, steps=steps,
                               generator=g, data_range=data_range, **task_options)
    paths = {key: f"{stem}_{key}.png" for key in keys}
    for key in ("truth", "measurement", "reconstruction"):
        save_image(samples_to_image(out[key], data_range=data_range), paths[key])
    save_image(samples_to_image(make_task_grid(out), data_range=data_range, nrow=len(images)), paths["grid"])
    psnr, ssim = float(out["psnr"].mean()), float(out["ssim"].mean())
    summary = {"task": out["task"], "method": out["method"], "operator": out["operator"], "split": split,
               "num_images": len(images), "nfe": int(out["nfe"]), "psnr_mean": psnr, "ssim_mean": ssim,
               "psnr": out["psnr"].tolist(), "ssim": out["ssim"].tolist(), **(settings or {})}
    paths["metrics"] = f"{stem}_metrics.json"
    with open(paths["metrics"], "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[sample] {task} with {method} on {len(images)} {split} images: PSNR {psnr:.2f} dB, "
          f"SSIM {ssim:.3f}, NFE {out['nfe']}; grid {paths['grid']}")
    return {"psnr": psnr, "ssim": ssim, **paths}
