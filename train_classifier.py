"""Train a noisy classifier p(y | x_t, t) for classifier guidance: ``python train_classifier.py [overrides]``.

It sees x_t drawn from the same SDE as the score model it will guide (Song et al. 2021, App. I.1;
Dhariwal & Nichol 2021, Sec. 4; ``training.lit_classifier``). With no arguments it trains on the
embedded 8x8 digits under the VP SDE. Then guide an unconditional score model with it::

    python train_classifier.py trainer.max_steps=500
    python sample.py ckpt_path=<score run dir> classifier_ckpt=<this run dir> classifier_scale=2 class_label=3

Same conventions as ``train.py`` (``configs/classifier.yaml``): Hydra overrides, ``ckpt_path=last`` resumes
``<run_dir>/checkpoints/last.ckpt`` exactly, W&B offline without a network, SIGTERM / SIGUSR1 write
``last.ckpt`` and exit with code 143, config errors are one ``Error:`` line with exit code 2.
"""

from __future__ import annotations

import math
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from sgm_lightning.cli import ConfigError, build, plain, resolve_ckpt_path, run_cli
from sgm_lightning.launch import start_run, trainer_plugins


def classifier_net_config(net_cfg: dict, data_shape, num_classes) -> dict:
    """The classifier's network config with its data-dependent fields (null in configs/classifier_net/*.yaml)."""
    net = dict(net_cfg)
    if num_classes is None:
        raise ConfigError("a noisy classifier needs a labelled dataset, but the data module reports num_classes=None; "
                          "use labelled data (data=digits, data=mnist, data=toy data.name=gaussian_mixture, ...)")
    image = len(data_shape) == 3
    if "in_channels" in net and not image:
        raise ConfigError(f"classifier_net={net['_target_'].rsplit('.', 1)[-1]} classifies images (C, H, W), but the "
                          f"data has shape {tuple(data_shape)}: use classifier_net=mlp")
    if "dim" in net and image:
        raise ConfigError(f"classifier_net=mlp classifies (B, D) data, but the data are images {tuple(data_shape)}: "
                          "use classifier_net=unet")
    fields = {"num_classes": num_classes, **({"in_channels": data_shape[0], "image_size": data_shape[-1]} if image
                                             else {"dim": math.prod(data_shape)})}
    for key, value in fields.items():
        if net.get(key) is None:
            net[key] = int(value)
    return net


def train_classifier(cfg: DictConfig):
    """Build data, SDE, classifier, module, logger, callbacks and trainer from ``cfg``; fit."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from sgm_lightning.training.fault_tolerance import PreemptionCheckpoint
    from sgm_lightning.training.lit_classifier import NoisyClassifierModule

    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed={cfg.get('seed')!r} must be an integer, e.g. seed=42")
    run_dir = start_run(cfg, "train_classifier.py")  # seeds, threads, checked run dir
    datamodule = build(cfg.data)
    net_cfg = classifier_net_config(plain(cfg.classifier_net), tuple(datamodule.data_shape),
                                    getattr(datamodule, "num_classes", None))
    stored = {"net": net_cfg, "sde": plain(cfg.sde), "data": plain(cfg.data)}
    module = NoisyClassifierModule(build(net_cfg), build(cfg.sde), **plain(cfg.model), seed=int(cfg.seed),
                                   config=stored)
    ckpt = resolve_ckpt_path(cfg.ckpt_path, run_dir, current=stored)  # same net and SDE, or an error
    logger = None
    if cfg.get("logger") and "_target_" in cfg.logger:
        logger = build(cfg.logger, _partial_=True)(run_config=OmegaConf.to_container(cfg, resolve=True))
    every = (cfg.get("checkpoint") or {}).get("every_n_train_steps")
    callbacks = [ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), filename="step{step:07d}",
                                 auto_insert_metric_name=False, save_last=True, save_top_k=-1,
                                 every_n_train_steps=every, enable_version_counter=False),
                 PreemptionCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"))]
    plugins, overrides = trainer_plugins(cfg.trainer)  # atomic checkpoints; fp16 on a CPU as asked
    trainer = build(cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks,
                    plugins=plugins, **overrides)
    if trainer.is_global_zero:
        print(f"[train_classifier] run dir: {run_dir}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    if trainer.is_global_zero:
        print(f"[train_classifier] done at step {trainer.global_step}; checkpoint: "
              f"{os.path.join(run_dir, 'checkpoints', 'last.ckpt')}")
    return trainer


@hydra.main(version_base="1.3", config_path="configs", config_name="classifier")
def main(cfg: DictConfig) -> None:
    run_cli(train_classifier)(cfg)


if __name__ == "__main__":
    main()
