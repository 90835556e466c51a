"""Draw samples from a trained checkpoint: ``python sample.py ckpt_path=... method=ode steps=... num_samples=64``.

Four modes (``mode=``), each with its own options (``configs/sample.yaml``; an option of another
mode is an error):

* ``grid`` (default): writes ``<out_dir>/<method>_grid.png`` and ``<out_dir>/<method>_samples.npz``
  (a call never overwrites an earlier one's files: when they exist it writes ``<method>-v1_grid.png``, ...)
  (``images``: uint8 N x H x W x C for image data, ``samples``: the raw float samples, ``settings``: a
  JSON string of the call; ``labels`` for class-conditional checkpoints, ``guidance_scale=...
  class_label=...``, and for classifier guidance of any checkpoint by a ``train_classifier.py`` run,
  ``classifier_ckpt=... classifier_scale=... class_label=...``);
* ``eval``: FID (or another Fréchet distance) of ``eval.num_samples`` samples (docs/evaluation.md);
* ``task``: ``task=inpaint|colorize|superres|deblur`` restores images of the training data
  (docs/inverse.md; ``task=superres task_method=sr3`` for a checkpoint trained on SR3 pairs);
* ``interpolate``: encodes ``interpolate.pairs`` pairs of dataset images to their probability-flow
  latents, interpolates spherically (``interpolate.n`` points per pair) and decodes: a grid with one
  row per pair, ``interpolate_grid.png`` (+ ``interpolate_samples.npz``).

The model is rebuilt from the checkpoint alone (``load_from_sgm_checkpoint``) and samples with its EMA
weights unless ``use_ema=false``.
"""

from __future__ import annotations

import functools
import json
import os

import hydra
from omegaconf import DictConfig

from sgm_lightning.cli import plain
from sgm_lightning.utils import unused_stem

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def sample_main(cfg: DictConfig) -> dict:
    """Run the configured mode; returns the written paths (and figures)."""
    from sgm_lightning.cli import (ConfigError, check_noise_level, config_defaults, sample_checkpoint,
                                   validate_sample_config)
    from sgm_lightning.training.lit_module import load_from_sgm_checkpoint

    defaults = config_defaults(CONFIG_DIR, "sample")
    mode = validate_sample_config(cfg, defaults)
    _refuse_ignored(cfg, mode, defaults)
    cfg.ckpt_path = sample_checkpoint(cfg.ckpt_path)  # a run dir -> its checkpoints/last.ckpt
    device = _device(str(cfg.device))
    module = load_from_sgm_checkpoint(str(cfg.ckpt_path), map_location=device)
    check_noise_level(getattr(module.loss_fn, "noise_free", False), False, f"sample.py mode={mode}")
    if getattr(module.score_model.net, "cond_channels", 0) and (mode, cfg.task_method) not in (
            ("task", "sr3"), ("task", "bicubic")):
        given = f"mode={mode}" + (f" task_method={cfg.task_method}" if mode == "task" else "")
        raise ConfigError(f"this checkpoint is an SR3 model: its network needs a low-resolution image as condition "
                          f"(net.cond_channels={module.score_model.net.cond_channels}), so {given} cannot sample "
                          "it; use mode=task task=superres task_method=sr3 (docs/sr3.md)")
    if mode == "task" and len(module.data_shape) != 3:
        raise ConfigError(f"mode=task restores images (C, H, W), but this checkpoint models data of shape "
                          f"{tuple(module.data_shape)}; use an image checkpoint (mode=grid / interpolate take any "
                          "data)")
    out_dir = os.path.abspath(cfg.out_dir or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    task = functools.partial(_task, default_method=defaults["method"])
    return {"grid": _grid, "eval": _evaluate, "task": task, "interpolate": _interpolate}[mode](cfg, module, out_dir)


def _refuse_ignored(cfg, mode: str, defaults: dict) -> None:
    """Options every mode reads, except these: ``mode=task`` restores all ``num_samples`` images in one
    batch with the solver of ``task_method`` (an SR3 checkpoint takes ``method`` / ``options`` as its
    sampler); ``mode=interpolate`` integrates the PF-ODE (``options``: its solver) in one batch. They were
    silently ignored."""
    from sgm_lightning.cli import ConfigError
    ignored = {"task": ("batch_size",) + (() if cfg.task_method == "sr3" else ("method", "options")),
               "interpolate": ("batch_size", "method")}.get(mode, ())
    for key in ignored:
        if plain({key: cfg.get(key)}) != plain({key: defaults.get(key)}):
            how = {"method": " (it runs its own reverse process; its settings go in task_options, docs/inverse.md)"
                   if mode == "task" else " (it always integrates the probability-flow ODE; solver options go in "
                   "options={solver: rk45, rtol: ...})", "options": ": solver settings go in task_options",
                   "batch_size": ": it processes all its images in one batch"}[key]
            given = f"task_method={cfg.task_method}" if mode == "task" else f"mode={mode}"
            raise ConfigError(f"{key}={cfg.get(key)} is not used by {given}{how}; drop {key}")


def _device(name: str):
    """``device=auto|cpu|cuda|cuda:<i>|...`` as a torch.device that exists here (clear error otherwise:
    a CUDA device on a machine without one failed as a 'corrupt or truncated' checkpoint)."""
    import torch

    from sgm_lightning.cli import ConfigError
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device: use device=auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        visible = torch.cuda.device_count()
        raise ConfigError(f"device={name} but {'no CUDA GPU is' if not visible else f'only {visible} CUDA GPU(s) are'} "
                          "visible here: use device=auto (a GPU when there is one) or device=cpu")
    return device


def _grid(cfg, module, out_dir: str) -> dict:
    """``mode=grid``: ``num_samples`` samples as a grid PNG and an .npz."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from sgm_lightning.training.viz import picturable, samples_to_image, save_image, to_images
    n = int(cfg.num_samples)
    y = None
    if module.num_classes is not None:
        k = module.num_classes
        label = cfg.class_label
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):  # 2.5 became class 2
            raise ValueError(f"class_label={label!r} must be a whole class number 0..{k - 1} (or null to cycle "
                             "through the classes)")
        if cfg.class_label is not None and not -1 <= int(cfg.class_label) <= k:
            raise ValueError(f"class_label={cfg.class_label} is not a class of this checkpoint ({k} classes: "
                             f"0..{k - 1}; {k} or -1: the null label); use class_label=0..{k - 1}, or null to cycle "
                             "through them")
        if cfg.class_label is not None and int(cfg.class_label) in (-1, k) and module.hparams.cond_drop_prob == 0:
            raise ValueError(f"class_label={cfg.class_label} is the null (unconditional) label, which this checkpoint "
                             f"never trained (model.cond_drop_prob=0): use class_label=0..{k - 1}, or retrain with "
                             "model.cond_drop_prob > 0")
        y = torch.full((n,), int(cfg.class_label)) if cfg.class_label is not None else torch.arange(n) % module.num_classes
    elif cfg.guidance_scale is not None or (cfg.class_label is not None and cfg.classifier_ckpt is None):
        raise ValueError("guidance_scale / class_label need a class-conditional checkpoint "
                         "(trained with model.class_conditional=true), or class_label a noisy classifier "
                         "(classifier_ckpt=...); drop them for this one")
    guide = None
    if cfg.classifier_ckpt is not None:
        guide, y = _classifier_guide(cfg, module, y, n)
    elif cfg.classifier_scale is not None:
        raise ValueError("classifier_scale needs classifier_ckpt=<a train_classifier.py run dir or checkpoint>")
    g = torch.Generator(device=module.device).manual_seed(int(cfg.seed))
    bar = tqdm(total=n, desc=f"sampling ({cfg.method})", unit="sample", position=0)
    step_bar = tqdm(desc="  steps of this batch", unit="step", position=1, leave=False)

    def progress(done, total):  # after each batch
        bar.update(done - bar.n)
        step_bar.reset()

    def on_step(i, t, x):  # the samplers' per-step callback(i, t, x)
        step_bar.set_postfix(t=f"{t:.4f}", refresh=False)
        step_bar.update(1)

    options = {"callback": on_step, **plain(cfg.options)}
    try:
        res = module.generate(n, method=cfg.method, steps=cfg.steps, generator=g, batch_size=cfg.batch_size, y=y,
                              use_ema=bool(cfg.use_ema), guidance_scale=cfg.guidance_scale, progress=progress,
                              guide=guide, **options)
    finally:  # also on an error: its "Error: ..." line then starts a line of its own
        step_bar.close()
        bar.close()
    x, data_range = res.samples.detach().float().cpu(), module.hparams.data_range
    stem = new_stem(out_dir, str(cfg.method))
    settings = dict(plain(cfg), nfe=int(res.nfe), data_range=data_range)
    arrays = {"samples": x.numpy(), "settings": np.array(json.dumps(settings))}
    if x.ndim == 4:
        arrays["images"] = to_images(x, data_range)
    if y is not None:
        arrays["labels"] = y.numpy()
    np.savez_compressed(stem + "_samples.npz", **arrays)  # first: the samples are kept whatever follows
    print(f"[sample] {n} samples, method={cfg.method}, NFE={res.nfe}\n[sample] samples: {stem}_samples.npz")
    if not picturable(x.shape[1:]):
        print(f"[sample] no grid: a picture needs images with 1 or 3 channels or 2-D points, not {tuple(x.shape[1:])}")
        return {"grid": None, "npz": stem + "_samples.npz"}
    nrow = None if cfg.grid_rows is None else -(-n // int(cfg.grid_rows))
    save_image(samples_to_image(x, data_range=data_range, nrow=nrow), stem + "_grid.png")
    print(f"[sample] grid: {stem}_grid.png")
    return {"grid": stem + "_grid.png", "npz": stem + "_samples.npz"}


def _classifier_guide(cfg, module, y, n: int):
    """Classifier guidance (``classifier_ckpt``, ``classifier_scale``): the noisy classifier of a
    ``train_classifier.py`` run, checked against the score model (same SDE, same data shape), and the labels
    of the ``n`` samples. Returns ``(guide, y)`` for ``ScoreLitModule.generate``."""
    import torch

    from sgm_lightning.cli import ConfigError, sample_checkpoint
    from sgm_lightning.guidance import classifier_guidance_score_fn
    from sgm_lightning.training.lit_classifier import load_classifier_checkpoint
    path = sample_checkpoint(cfg.classifier_ckpt)
    clf = load_classifier_checkpoint(path, map_location=module.device)
    ours, theirs = (type(module.sde).__name__, module.sde.hparams()), (type(clf.sde).__name__, clf.sde.hparams())
    if ours != theirs:
        raise ConfigError(f"classifier_ckpt={cfg.classifier_ckpt} was trained on x_t of {theirs[0]}{theirs[1]}, but "
                          f"this score model's SDE is {ours[0]}{ours[1]}: train the classifier with the same sde "
                          "(python train_classifier.py sde=... with the score run's sde settings)")
    probe = torch.zeros((1, *module.data_shape), device=module.device)
    try:
        with torch.no_grad():
            k = int(clf(probe, torch.full((1,), 0.5, device=module.device)).shape[-1])
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"classifier_ckpt={cfg.classifier_ckpt} does not take this model's data of shape "
                          f"{tuple(module.data_shape)} ({str(e).splitlines()[0]}): train it on the same data") from None
    if y is not None and module.num_classes != k:
        raise ConfigError(f"the classifier has {k} classes but this class-conditional model {module.num_classes}: "
                          "train both on the same labels")
    if y is None:
        label = cfg.class_label
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < k):
            raise ConfigError(f"class_label={label!r} is not a class of the classifier ({k} classes): use "
                              f"class_label=0..{k - 1}, or null to cycle through them")
        y = torch.full((n,), int(label)) if label is not None else torch.arange(n) % k
    scale = 1.0 if cfg.classifier_scale is None else cfg.classifier_scale
    return (lambda score, yb: classifier_guidance_score_fn(score, clf, yb, scale, label_fn=clf.label)), y


def new_stem(out_dir: str, name: str) -> str:
    """``<out_dir>/<name>``, or ``<name>-v1``, ``<name>-v2``, ... when an earlier call wrote its grid or .npz
    there: re-running into the same ``out_dir`` (or a sweep over seeds) never overwrites earlier samples."""
    return unused_stem(os.path.join(out_dir, name), ("_grid.png", "_samples.npz"))


def _stored_datamodule(module, cfg):
    """The training data module, rebuilt from the checkpoint's stored data config (+ ``data_overrides``)."""
    from sgm_lightning.cli import ConfigError, build
    stored = module.hparams.config["data"]
    try:
        return build({**stored, **plain(cfg.data_overrides)})
    except ConfigError as e:  # a key the stored data module does not take
        raise ConfigError(f"data_overrides={plain(cfg.data_overrides)} does not fit this checkpoint's data config "
                          f"(keys: {', '.join(stored)}): {e}") from None


def _checkpoint_step(path: str) -> int | None:
    """The training step (``global_step``) stored in the checkpoint file, recorded with the figures."""
    from sgm_lightning.training.checkpoint import load_checkpoint
    step = load_checkpoint(str(path), map_location="cpu").get("global_step")
    return None if step is None else int(step)


def _evaluate(cfg, module, out_dir: str) -> dict:
    """``mode=eval``: FID (or another Fréchet distance) of ``eval.num_samples`` samples (docs/evaluation.md)."""
    from hydra.utils import instantiate

    from sgm_lightning.evaluation.run import evaluate
    from sgm_lightning.cli import ConfigError
    m, n = cfg.metrics, int(cfg.eval.num_samples)
    batch = int(cfg.batch_size or min(250, n))  # chunks of batch_size samples, one seed each
    if n % batch:
        divisor = max(d for d in range(1, min(250, n) + 1) if n % d == 0)
        raise ConfigError(f"eval.num_samples={n} must be a multiple of batch_size={batch}"
                          f"{' (the default of mode=eval)' if cfg.batch_size is None else ''}: the samples are "
                          f"drawn in chunks of batch_size; use e.g. batch_size={divisor}, or eval.num_samples="
                          f"{n - n % batch or batch}")
    result = evaluate(module, _stored_datamodule(module, cfg), num_samples=n,
                      method=cfg.method, steps=cfg.steps, seed=int(cfg.seed), batch_size=batch,
                      extractor=instantiate(m.extractor), kid=bool(m.kid), use_ema=bool(cfg.use_ema),
                      kid_subset_size=int(m.get("kid_subset_size", 1000)),
                      out_dir=out_dir, reference_split=m.reference_split,
                      reference_num_samples=m.reference_num_samples, cache_dir=m.cache_dir,
                      sampler_options=plain(cfg.options), checkpoint_step=_checkpoint_step(cfg.ckpt_path))
    print(f"[sample] evaluation: {result}")
    return {"eval": result}


def _task(cfg, module, out_dir: str, default_method: str = "unipc") -> dict:
    """``mode=task``: restore ``num_samples`` images from their measurement (docs/inverse.md)."""
    from sgm_lightning.evaluation.inverse_tasks import restore_dataset_images
    settings = {"checkpoint_step": _checkpoint_step(cfg.ckpt_path), "settings": plain(cfg)}
    task_options = plain(cfg.task_options)
    if str(cfg.task_method) == "sr3":
        trained = _sr3_options(module)
        for key, value in task_options.items():  # the network only knows the pairs it was trained on
            if key in trained and value != trained[key]:
                raise ValueError(f"task_options.{key}={value!r}, but this SR3 checkpoint was trained on pairs with "
                                 f"{key}={trained[key]!r}: drop task_options.{key} (it is read from the checkpoint)")
        task_options = {**trained, **task_options}
        if cfg.method != default_method:  # the SR3 sampler: method= as task_options.sampler
            if task_options.get("sampler", cfg.method) != cfg.method:
                raise ValueError(f"method={cfg.method} and task_options.sampler={task_options['sampler']} disagree: "
                                 "give the SR3 sampler once")
            task_options["sampler"] = str(cfg.method)
        task_options = {**plain(cfg.options), **task_options}  # the SR3 sampler's options
    return restore_dataset_images(module, _stored_datamodule(module, cfg), task=str(cfg.task),
                                  method=str(cfg.task_method), num_images=int(cfg.num_samples),
                                  steps=int(cfg.steps or 100), seed=int(cfg.seed), use_ema=bool(cfg.use_ema),
                                  out_dir=out_dir, settings=settings, **task_options)


def _interpolate(cfg, module, out_dir: str) -> dict:
    """``mode=interpolate``: PF-ODE latent interpolation between pairs of dataset images."""
    import numpy as np

    from sgm_lightning.evaluation.inverse_tasks import first_images
    from sgm_lightning.sampling import interpolate
    from sgm_lightning.training.viz import samples_to_image, save_image
    from sgm_lightning.utils import check_int
    pairs = check_int("interpolate.pairs", cfg.interpolate.pairs)  # 0 pairs: the PF-ODE on no images never ended
    n = check_int("interpolate.n (points per row, both ends included)", cfg.interpolate.n, min=2)
    images, split = first_images(_stored_datamodule(module, cfg), 2 * pairs)
    if len(images) < 2 * pairs:
        raise ValueError(f"interpolate.pairs={pairs} needs {2 * pairs} images, the {split} split has {len(images)}")
    images = images.to(module.device)
    options = plain(cfg.options)
    if cfg.steps is not None:
        options["steps"] = int(cfg.steps)
    with module.ema_scope(bool(cfg.use_ema)):
        res = interpolate(module.score_fn(), module.sde, images[:pairs], images[pairs:], n=n, **options)
    x = res.samples.detach().float().cpu().reshape(pairs * n, *images.shape[1:])
    data_range = module.hparams.data_range
    stem = new_stem(out_dir, "interpolate")
    save_image(samples_to_image(x, data_range=data_range, nrow=n), stem + "_grid.png")
    np.savez_compressed(stem + "_samples.npz", samples=x.numpy(),
                        settings=np.array(json.dumps(dict(plain(cfg), nfe=int(res.nfe), split=split))))
    print(f"[sample] interpolation: {pairs} pairs of {split} images, {n} points each, NFE={res.nfe}")
    print(f"[sample] grid: {stem}_grid.png")
    return {"grid": stem + "_grid.png", "npz": stem + "_samples.npz", "nfe": int(res.nfe)}


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


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    from sgm_lightning.cli import run_cli
    run_cli(sample_main)(cfg)


if __name__ == "__main__":
    main()
