"""Train a score-based generative model: ``python train.py [group=option ...] [key=value ...]``.

With no arguments it trains the embedded default (8x8 digits, VP SDE, small U-Net) on CPU, logs to
W&B offline, and writes sample grids to ``<run_dir>/samples``. Examples::

    python train.py data=cifar10 sde=vp trainer=ddp trainer.max_steps=1000 ckpt_path=last
    python train.py experiment=ddpmpp_vp_cifar10
    python train.py logger=csv seed=1

Config errors (ValueError from any constructor, cross-component checks of ``validation.py``) are
printed as one paragraph and exit with code 2 (``validation.run_cli``); set HYDRA_FULL_ERROR=1 to
see the traceback. A preemption (SIGTERM / SIGUSR1) writes last.ckpt and exits with code 143.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def net_config(cfg: DictConfig, data_shape, num_classes) -> dict:
    """The network config with its data-dependent fields (null in configs/net/*.yaml) filled in."""
    net = _plain(cfg.net)
    if len(data_shape) == 3:
        for key, value in (("in_channels", data_shape[0]), ("image_size", data_shape[-1])):
            if key in net and net[key] is None:
                net[key] = int(value)
    elif "dim" in net and net["dim"] is None:
        net["dim"] = int(data_shape[0])
    if cfg.model.class_conditional:
        if not num_classes:
            raise ValueError("model.class_conditional=true needs a labelled dataset (the data module "
                             "reports num_classes=None); use a labelled dataset or class_conditional=false")
        net["num_classes"] = int(num_classes)
    return net


def resolve_ckpt_path(ckpt_path, run_dir: str, current: dict | None = None):
    """null -> None; "last" -> <run_dir>/checkpoints/last.ckpt (None, i.e. a fresh start, when absent)."""
    from sgm_lightning.validation import check_checkpoint, resolve_ckpt_path as resolve
    path = resolve(ckpt_path, run_dir)
    if path is None:
        if ckpt_path == "last":
            print(f"[train] ckpt_path=last: no checkpoint in {run_dir}/checkpoints yet, starting fresh")
        return None
    path = os.path.abspath(path)
    check_checkpoint(path, current)  # clear error when missing / corrupt / not ours / other net or sde config
    return path


def build(node, **kwargs):
    """hydra.utils.instantiate, re-raising a constructor's ValueError itself (clear one-line message)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        raise


def _inherit_wandb_id(ckpt: str | None, run_dir: str) -> None:
    """Resuming another run dir's checkpoint continues that run's W&B run (same id)."""
    from sgm_lightning.logging_utils import RUN_ID_FILE
    if ckpt is None or os.path.exists(os.path.join(run_dir, RUN_ID_FILE)):
        return
    src = os.path.join(os.path.dirname(os.path.dirname(ckpt)), RUN_ID_FILE)
    if os.path.exists(src):
        os.makedirs(run_dir, exist_ok=True)
        with open(src) as f, open(os.path.join(run_dir, RUN_ID_FILE), "w") as g:
            g.write(f.read())


def train(cfg: DictConfig):
    """Build data, SDE, network, loss, module, logger, callbacks and trainer from ``cfg``; fit."""
    import lightning as L
    import torch
    from sgm_lightning.checkpoint import AtomicCheckpointIO
    from sgm_lightning.lit_module import ScoreLitModule
    from sgm_lightning.validation import validate_train_config

    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    elif cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    run_dir = os.path.abspath(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)

    datamodule = build(cfg.data)
    sde = build(cfg.sde)
    net_cfg = net_config(cfg, tuple(datamodule.data_shape), getattr(datamodule, "num_classes", None))
    validate_train_config(OmegaConf.merge(cfg, {"net": net_cfg}), data_shape=tuple(datamodule.data_shape))
    net = build(net_cfg)
    loss = build(cfg.loss, sde=sde)
    model_kwargs = _plain(cfg.model)
    model_kwargs.pop("class_conditional", None)
    stored = {"net": net_cfg, "sde": _plain(cfg.sde), "loss": _plain(cfg.loss), "data": _plain(cfg.data),
              "model": _plain(cfg.model), "dataset_id": getattr(datamodule, "dataset_id", None)}
    module = ScoreLitModule(net=net, sde=sde, loss=loss, **model_kwargs, **_plain(cfg.optim),
                            data_shape=tuple(datamodule.data_shape),
                            data_range=getattr(datamodule, "data_range", "[-1,1]"), seed=int(cfg.seed),
                            config=stored)

    ckpt = resolve_ckpt_path(cfg.ckpt_path, run_dir, current=stored)
    _inherit_wandb_id(ckpt, run_dir)
    logger = None
    if cfg.get("logger") and "_target_" in cfg.logger:
        logger = build(cfg.logger, _partial_=True)(run_config=OmegaConf.to_container(cfg, resolve=True))
    callbacks = []
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is None or "_target_" not in cb:
            continue
        if logger is None and cb["_target_"].endswith("LearningRateMonitor"):
            continue  # needs a logger
        callbacks.append(build(cb))
    trainer = build(cfg.trainer, logger=logger if logger is not None else False,
                    callbacks=callbacks, plugins=[AtomicCheckpointIO()])  # write-then-rename checkpoints
    if trainer.is_global_zero:
        print(f"[train] run dir: {run_dir}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)  # safe load (checkpoint.py)
    if trainer.is_global_zero:
        grids = [p for cb in callbacks for p in getattr(cb, "last_paths", {}).values()]
        print(f"[train] done at step {trainer.global_step}; run dir: {run_dir}")
        for p in grids:
            print(f"[train] sample grid: {p}")
    return trainer


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from sgm_lightning.validation import run_cli
    run_cli(train)(cfg)


if __name__ == "__main__":
    main()
