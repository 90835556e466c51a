"""Draw samples from a trained checkpoint: ``python sample.py ckpt_path=... method=ode steps=... num_samples=64``.

Writes ``<out_dir>/<method>_grid.png`` and ``<out_dir>/<method>_samples.npz`` (``images``: uint8
N x H x W x C for image data, ``samples``: the raw float samples, ``settings``: a JSON string of the
call). The model is rebuilt from the checkpoint alone (``load_from_sgm_checkpoint``) and samples with
its EMA weights unless ``use_ema=false``. Other modes: ``eval.fid=true`` (sgm_lightning.evaluation),
``task=inpaint|colorize|superres|deblur`` (sgm_lightning.inverse; ``task=superres task_method=sr3``
for a checkpoint trained on SR3 pairs), ``guidance_scale=... class_label=...``
for class-conditional checkpoints. Configuration: ``configs/sample.yaml``.
"""

from __future__ import annotations

import json
import os

import hydra
from omegaconf import DictConfig, OmegaConf


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_images(x, data_range: str):
    """uint8 N x H x W x C images from samples in ``data_range`` (None for non-image data)."""
    import torch

    from sgm_lightning.training.data.ranges import to_unit
    if x.ndim != 4:
        return None
    u = to_unit(x.detach().float().cpu(), data_range).clamp(0, 1)
    return (u * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample_main(cfg: DictConfig) -> dict:
    """Sample (or evaluate / solve an inverse task) as configured; returns the written paths."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from sgm_lightning.training.callbacks.samples import samples_to_image
    from sgm_lightning.training.lit_module import load_from_sgm_checkpoint
    from sgm_lightning.cli import validate_sample_config
    from sgm_lightning.training.viz import save_image

    validate_sample_config(cfg)
    device = _device(cfg.device)
    module = load_from_sgm_checkpoint(str(cfg.ckpt_path), map_location=device)
    out_dir = os.path.abspath(cfg.out_dir or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    settings = OmegaConf.to_container(cfg, resolve=True)
    options = OmegaConf.to_container(cfg.options, resolve=True) if cfg.options else {}

    if cfg.eval.fid:
        return {"eval": _evaluate(cfg, module, out_dir, options)}
    if cfg.task is not None:
        return _inverse_task(cfg, module, out_dir, device)

    y = None
    if module.num_classes is not None:
        if cfg.class_label is not None:
            y = torch.full((int(cfg.num_samples),), int(cfg.class_label), dtype=torch.long)
        else:
            y = torch.arange(int(cfg.num_samples)) % module.num_classes
    elif cfg.guidance_scale is not None or cfg.class_label is not None:
        raise ValueError("guidance_scale / class_label need a class-conditional checkpoint "
                         "(trained with model.class_conditional=true); drop them for this one")
    g = torch.Generator(device=device)
    g.manual_seed(int(cfg.seed))
    bar = tqdm(total=int(cfg.num_samples), desc=f"sampling ({cfg.method})", unit="sample", position=0)
    step_bar = tqdm(desc="  steps of this batch", unit="step", position=1, leave=False)

    def progress(done, total):  # after each batch
        bar.update(done - bar.n)
        step_bar.reset()

    def on_step(i, t, x):  # the samplers' per-step callback(i, t, x)
        step_bar.set_postfix(t=f"{t:.4f}", refresh=False)
        step_bar.update(1)

    options.setdefault("callback", on_step)
    res = module.generate(int(cfg.num_samples), method=cfg.method, steps=cfg.steps, generator=g,
                          batch_size=cfg.batch_size, y=y, use_ema=bool(cfg.use_ema),
                          guidance_scale=cfg.guidance_scale, progress=progress, **options)
    step_bar.close()
    bar.close()
    x = res.samples.detach().float().cpu()
    stem = os.path.join(out_dir, f"{cfg.method}")
    nrow = None if cfg.grid_rows is None else int(num_samples_per_row(cfg))
    save_image(samples_to_image(x, data_range=module.hparams.data_range, nrow=nrow), stem + "_grid.png")
    settings.update(nfe=int(res.nfe), data_range=module.hparams.data_range)
    arrays = {"samples": x.numpy(), "settings": np.array(json.dumps(settings))}
    images = to_images(x, module.hparams.data_range)
    if images is not None:
        arrays["images"] = images
    if y is not None:
        arrays["labels"] = y.numpy()
    np.savez_compressed(stem + "_samples.npz", **arrays)
    print(f"[sample] {cfg.num_samples} samples, method={cfg.method}, NFE={res.nfe}")
    print(f"[sample] grid: {stem}_grid.png")
    print(f"[sample] samples: {stem}_samples.npz")
    return {"grid": stem + "_grid.png", "npz": stem + "_samples.npz"}


def _stored_datamodule(module, cfg):
    """The training data module, rebuilt from the checkpoint's stored data config."""
    from hydra.utils import instantiate
    data_cfg = dict(module.hparams.config["data"])
    if cfg.data_overrides:
        data_cfg.update(OmegaConf.to_container(cfg.data_overrides, resolve=True))
    return instantiate(data_cfg)


def _checkpoint_step(path: str) -> int | None:
    """The training step (``global_step``) stored in the checkpoint file, recorded with the figures."""
    from sgm_lightning.training.checkpoint import load_checkpoint
    step = load_checkpoint(str(path), map_location="cpu").get("global_step")
    return None if step is None else int(step)


def _evaluate(cfg, module, out_dir: str, options: dict) -> dict:
    """``eval.fid=true``: FID (or another Fréchet distance) of ``eval.num_samples`` samples (docs/evaluation.md)."""
    from hydra.utils import instantiate

    from sgm_lightning.evaluation.run import evaluate
    m = cfg.metrics
    result = evaluate(module, _stored_datamodule(module, cfg), num_samples=int(cfg.eval.num_samples),
                      method=cfg.method, steps=cfg.steps, seed=int(cfg.seed), batch_size=int(cfg.batch_size or 250),
                      extractor=instantiate(m.extractor), kid=bool(m.kid), use_ema=bool(cfg.use_ema),
                      out_dir=out_dir, reference_split=m.reference_split,
                      reference_num_samples=m.reference_num_samples, cache_dir=m.cache_dir,
                      sampler_options=options, checkpoint_step=_checkpoint_step(cfg.ckpt_path))
    print(f"[sample] evaluation: {result}")
    return result


def _inverse_task(cfg, module, out_dir: str, device) -> dict:
    """``task=...``: restore ``num_samples`` images from their measurement (docs/inverse.md).

    The images are the first ``num_samples`` of the validation split when the (stored, possibly
    overridden: ``data_overrides={val_fraction: 0.1}``) data config has one, else of the training set,
    in dataset order. Writes ``<task>_<method>_{truth,measurement,reconstruction}.png``, the 4-row grid
    ``<task>_<method>_grid.png`` (input / measurement / reconstruction / truth, one column per image)
    and ``<task>_<method>_metrics.json`` (per-image and mean PSNR / SSIM, NFE, settings).
    """
    import torch
    from torch.utils.data import DataLoader

    from sgm_lightning.evaluation.inverse_tasks import make_task_grid, run_inverse_task
    from sgm_lightning.training.viz import save_image
    from sgm_lightning.training.callbacks.samples import samples_to_image
    dm = _stored_datamodule(module, cfg)
    dm.setup("fit")
    split = "val" if getattr(dm, "val_dataset", None) is not None and len(dm.val_dataset) > 0 else "train"
    dataset = dm.val_dataset if split == "val" else dm.train_dataset
    images = []
    for batch in DataLoader(dataset, batch_size=256, shuffle=False):
        images.append(batch[0])  # (x, y) or, for SR3 data, (x, y, x_cond)
        if sum(len(i) for i in images) >= int(cfg.num_samples):
            break
    images = torch.cat(images)[: int(cfg.num_samples)].to(device)
    g = torch.Generator(device=device)
    g.manual_seed(int(cfg.seed))
    task_options = OmegaConf.to_container(cfg.task_options, resolve=True) if cfg.task_options else {}
    if str(cfg.task_method) == "sr3":
        task_options = {**_sr3_options(module), **task_options}
    with module.ema_scope(bool(cfg.use_ema)):
        out = run_inverse_task(module.score_model, module.sde, images, task=str(cfg.task),
                               method=str(cfg.task_method), steps=int(cfg.steps or 100), generator=g,
                               **task_options)
    stem = os.path.join(out_dir, f"{cfg.task}_{cfg.task_method}")
    paths = {}
    for key in ("truth", "measurement", "reconstruction"):
        paths[key] = f"{stem}_{key}.png"
        save_image(samples_to_image(out[key], data_range=module.hparams.data_range), paths[key])
    paths["grid"] = f"{stem}_grid.png"
    save_image(samples_to_image(make_task_grid(out), data_range=module.hparams.data_range, nrow=len(images)),
               paths["grid"])
    psnr, ssim = float(out["psnr"].mean()), float(out["ssim"].mean())
    summary = {"task": out["task"], "method": out["method"], "operator": out["operator"], "split": split,
               "num_images": len(images), "checkpoint_step": _checkpoint_step(cfg.ckpt_path), "nfe": int(out["nfe"]), "psnr_mean": psnr, "ssim_mean": ssim,
               "psnr": out["psnr"].tolist(), "ssim": out["ssim"].tolist(),
               "settings": OmegaConf.to_container(cfg, resolve=True)}
    paths["metrics"] = f"{stem}_metrics.json"
    with open(paths["metrics"], "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[sample] {cfg.task} with {cfg.task_method} on {len(images)} {split} images: PSNR {psnr:.2f} dB, "
          f"SSIM {ssim:.3f}, NFE {out['nfe']}; grid {paths['grid']}")
    return {"psnr": psnr, "ssim": ssim, **paths}


def _sr3_options(module) -> dict:
    """``factor`` and ``interpolation`` of the SR3 pairs a checkpoint was trained on (its stored data config)."""
    data = (module.hparams.get("config") or {}).get("data") or {}
    if not str(data.get("_target_", "")).endswith("SuperResDataModule"):
        raise ValueError("task_method=sr3 needs a checkpoint trained on SR3 pairs (experiment=sr3_digits, "
                         "data=digits_sr); use task_method=dps with an unconditional checkpoint")
    if data.get("downsample", "area") != "area":
        raise ValueError(f"this SR3 checkpoint was trained on downsample={data['downsample']!r} pairs, but "
                         "task=superres measures by average pooling (downsample=area)")
    return {"factor": int(data.get("factor", 2)), "interpolation": data.get("interpolation", "bicubic")}


def num_samples_per_row(cfg) -> int:
    """Images per grid row for ``grid_rows`` rows."""
    return -(-int(cfg.num_samples) // int(cfg.grid_rows))


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    from sgm_lightning.cli import run_cli
    run_cli(sample_main)(cfg)


if __name__ == "__main__":
    main()
