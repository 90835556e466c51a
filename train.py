"""Train a score-based generative model: ``python train.py [group=option ...] [key=value ...]``.

With no arguments it trains the embedded default (8x8 digits, VP SDE, small U-Net) on CPU, logs to
W&B offline, and writes sample grids to ``<run_dir>/samples``. Examples::

    python train.py data=cifar10 sde=vp trainer=ddp trainer.max_steps=1000 ckpt_path=last
    python train.py experiment=ddpmpp_vp_cifar10
    python train.py logger=csv seed=1

Config errors (ValueError from any constructor, cross-component checks of ``sgm_lightning/cli.py``) are
printed as one paragraph and exit with code 2 (``cli.run_cli``); set HYDRA_FULL_ERROR=1 to
see the traceback. A preemption (SIGTERM / SIGUSR1) writes last.ckpt and exits with code 143.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from sgm_lightning.cli import (build, check_noise_level, inherit_wandb_id, net_config, plain, resolve_ckpt_path,
                               run_cli, validate_train_config)
from sgm_lightning.launch import start_run, trainer_plugins


def check_settings(cfg: DictConfig) -> None:
    """Each component's settings must be arguments of what it makes, and numbers (true / false) where the
    argument's default is one: a key added with ``+`` that the component does not take (a misspelt name),
    or text for a number, was a TypeError traceback (model / optim / lr_schedule: called by train.py and
    configure_optimizers, not by ``build``; the last two only once fit had begun)."""
    import inspect

    from hydra.utils import get_object
    from sgm_lightning.cli import ConfigError
    from sgm_lightning.training.lit_module import ScoreLitModule
    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed={cfg.get('seed')!r} must be an integer, e.g. seed=42")
    threads = cfg.get("cpu_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"cpu_threads={threads!r} must be a positive integer (torch threads without a GPU), or "
                          "null for torch's default")
    given = {"model": {"net", "sde", "loss", "optimizer", "lr_scheduler", "data_shape", "data_range", "seed", "config"},
             "optim": {"params"}, "lr_schedule": {"optimizer"}}  # passed by train.py / the module (loss: sde)
    nodes = [(g, cfg.get(g)) for g in ("data", "sde", "net", "loss", "model", "optim", "lr_schedule", "logger")]
    for name, node in nodes + [(f"callbacks.{k}", v) for k, v in (cfg.get("callbacks") or {}).items()]:
        if not node or (name != "model" and "_target_" not in node):
            continue
        target = ScoreLitModule if name == "model" else get_object(node["_target_"])
        params = inspect.signature(target).parameters
        any_key = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in (k for k in node if not str(k).startswith("_") and (name, k) != ("model", "class_conditional")):
            if key not in params and not any_key:
                extra = {"class_conditional"} if name == "model" else set()
                known = sorted(set(params) - given.get(name, {"sde"}) | extra)
                raise ConfigError(f"{name}.{key} is not a setting of {name} ({target.__name__}); correct its name or "
                                  f"drop it. Its settings: {', '.join(known)}")
            if OmegaConf.is_missing(node, key):
                raise ConfigError(f"{name}.{key} has no value ('???' in its config file): pass {name}.{key}=<value>")
            default, value = params[key].default if key in params else None, node[key]
            if isinstance(default, (int, float)) and isinstance(value, str):  # bool is an int
                kind = "true or false" if isinstance(default, bool) else "a number"
                raise ConfigError(f"{name}.{key}={value!r} must be {kind} (default {default}); e.g. "
                                  f"{name}.{key}={str(default).lower() if isinstance(default, bool) else default}")


def _check_net_takes_classes(net_cfg: dict) -> None:
    """model.class_conditional=true sets net.num_classes: a network without class labels is refused by name."""
    import inspect

    from hydra.utils import get_class
    from sgm_lightning.cli import ConfigError
    if "num_classes" in net_cfg and "num_classes" not in inspect.signature(get_class(net_cfg["_target_"])).parameters:
        raise ConfigError(f"{net_cfg['_target_'].rsplit('.', 1)[-1]} takes no class labels, but model.class_conditional"
                          f"=true gives it num_classes: use a class-conditional network (net=mlp, net=unet_small, ...) "
                          f"or model.class_conditional=false")


def train(cfg: DictConfig):
    """Build data, SDE, network, loss, module, logger, callbacks and trainer from ``cfg``; fit."""
    from sgm_lightning.training.fault_tolerance import PreemptionCheckpoint
    from sgm_lightning.training.lit_module import ScoreLitModule

    check_settings(cfg)
    run_dir = start_run(cfg, "train.py")  # seeds, threads; one run dir for all ranks, no earlier run's files

    datamodule = build(cfg.data)
    sde = build(cfg.sde)
    net_cfg = net_config(cfg, tuple(datamodule.data_shape), getattr(datamodule, "num_classes", None),
                         getattr(datamodule, "cond_shape", None))
    # (a plain copy: net_cfg may hold keys the net config does not declare, e.g. cond_channels for SR3 data)
    validate_train_config({**plain(cfg), "net": net_cfg}, data_shape=tuple(datamodule.data_shape))
    _check_net_takes_classes(net_cfg)
    net = build(net_cfg)
    loss = build(cfg.loss, sde=sde)
    samples = (cfg.get("callbacks") or {}).get("samples")
    check_noise_level(getattr(loss, "noise_free", False), type(net).__name__ == "NoiseFreeMLP",
                      "callbacks.samples (the sample grids)" if samples and "_target_" in samples else None)
    model_kwargs = plain(cfg.model)
    model_kwargs.pop("class_conditional", None)
    stored = {"net": net_cfg, "sde": plain(cfg.sde), "loss": plain(cfg.loss), "data": plain(cfg.data),
              "model": plain(cfg.model), "optim": plain(cfg.optim), "lr_schedule": plain(cfg.get("lr_schedule")),
              "dataset_id": getattr(datamodule, "dataset_id", None)}
    optimizer = build(cfg.optim, _convert_="all")  # partials: params -> optimizer, optimizer -> scheduler
    lr_scheduler = build(cfg.lr_schedule) if cfg.get("lr_schedule") else None
    module = ScoreLitModule(net=net, sde=sde, loss=loss, **model_kwargs, optimizer=optimizer, lr_scheduler=lr_scheduler,
                            data_shape=tuple(datamodule.data_shape),
                            data_range=getattr(datamodule, "data_range", "[-1,1]"), seed=int(cfg.seed),
                            config=stored)

    ckpt = resolve_ckpt_path(cfg.ckpt_path, run_dir, current=stored)
    inherit_wandb_id(ckpt, run_dir)
    logger = None
    if cfg.get("logger") and "_target_" in cfg.logger:
        logger = build(cfg.logger, _partial_=True)(run_config=OmegaConf.to_container(cfg, resolve=True))
    callbacks = []
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is None or "_target_" not in cb:
            continue
        if logger is None and cb["_target_"].endswith("LearningRateMonitor"):
            continue  # needs a logger
        if cfg.trainer.get("enable_progress_bar") is False and cb["_target_"].endswith("ProgressBar"):
            continue  # Lightning refuses a progress bar callback with the bar switched off
        callbacks.append(build(cb))
    # the preemption checkpoint after every other callback of a step (evaluations, grids, ...), so the step
    # it saves at has been evaluated; Lightning runs ModelCheckpoint-type callbacks last in any case
    callbacks.sort(key=lambda cb: isinstance(cb, PreemptionCheckpoint))  # stable
    plugins, overrides = trainer_plugins(cfg.trainer)  # atomic checkpoints; fp16 on a CPU as asked
    trainer = build(cfg.trainer, logger=logger if logger is not None else False,
                    callbacks=callbacks, plugins=plugins, **overrides)
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
    run_cli(train)(cfg)


OPTIONAL_GROUPS = ("lr_schedule", "callbacks", "logger", "metrics")  # train() runs without them


def null_groups_dropped(argv: list[str]) -> list[str]:
    """``group=null`` on the command line: Hydra itself stops with a traceback ("Config group override
    must be a string or a list. Got NoneType"). For an optional group (``lr_schedule=null``: a constant
    learning rate) it means Hydra's ``~group``; ``experiment=null`` is the default; a required group
    (data, net, ...) is an error that lists its options."""
    from sgm_lightning.cli import ConfigError
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    out = []
    for arg in argv:
        group = arg[:-len("=null")] if arg.endswith("=null") else None
        if group is None or not os.path.isdir(os.path.join(root, group)):
            out.append(arg)
        elif group in OPTIONAL_GROUPS:
            out.append(f"~{group}")
        elif group != "experiment":
            options = sorted(f[:-5] for f in os.listdir(os.path.join(root, group)) if f.endswith(".yaml"))
            raise ConfigError(f"{arg}: a run needs a {group} config; choose {group}=<one of {', '.join(options)}> "
                              f"(only {', '.join(OPTIONAL_GROUPS)} can be switched off with =null)")
    return out


if __name__ == "__main__":
    import sys
    sys.argv[1:] = run_cli(null_groups_dropped)(sys.argv[1:])
    main()
