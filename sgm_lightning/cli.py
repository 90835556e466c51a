"""Start-up checks of a run's configuration and the top-level error printer of the entry points.

Bad inputs are reported as one clear paragraph, never as a bare traceback:

* each component's constructor raises ``ValueError`` naming its own bad argument (unknown sampler,
  sigma/beta/steps <= 0, image size incompatible with the U-Net, ...);
* ``validate_train_config`` / ``validate_sample_config`` add the *cross-component* checks that no
  single constructor can do (data shape vs. network channels / image size, global batch size vs.
  world size, number of samples vs. batch size, checkpoint vs. current config, options of
  ``sample.py``'s other modes: ``SAMPLE_MODES``) and raise ``ConfigError``;
* ``net_config``, ``build``, ``resolve_checkpoint`` and ``inherit_wandb_id`` are the entry points'
  shared steps (fill data-dependent network fields, instantiate with clear errors, resolve
  ``ckpt_path=last``, continue a resumed run's W&B run);
* ``run_cli`` wraps ``main`` of ``train.py`` / ``sample.py``: our errors (``ConfigError``,
  ``ValueError``, ``FileNotFoundError``, ``CheckpointError``, ``NonFiniteError``) are printed as
  ``Error: <message>`` on stderr with exit code 2 (full traceback with ``SGM_DEBUG=1`` or
  ``HYDRA_FULL_ERROR=1``); a preemption exits with ``PREEMPTED_EXIT_CODE`` (143).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from sgm_lightning.training.checkpoint import CheckpointError, check_compatible, load_checkpoint, to_plain
from sgm_lightning.training.fault_tolerance import PREEMPTED_EXIT_CODE, NonFiniteError
from sgm_lightning.utils import check_int

USAGE_EXIT_CODE = 2


class ConfigError(ValueError):
    """A run's configuration is inconsistent across components (message says how to fix it)."""


# ---------------------------------------------------------------------------- small helpers
def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """``cfg["a"]["b"]`` for ``"a.b"`` on dicts / DictConfigs; ``default`` when any key is missing."""
    node = cfg
    for key in dotted.split("."):
        if node is None:
            return default
        try:
            node = node[key] if key in node else None
        except TypeError:
            return default
        if node is None:
            return default
    return node


def plain(cfg: Any) -> dict:
    """A config node as a plain dict (resolved); ``None`` -> ``{}``."""
    return dict(to_plain(cfg) or {})


def _positive_int(name: str, value: Any) -> None:
    """``check_int(name, value)`` unless ``value`` is None (not set)."""
    if value is not None:
        check_int(name, value)


# ---------------------------------------------------------------------------- cross-component checks
def check_data_vs_net(data_shape: Sequence[int], in_channels: Optional[int], image_size: Optional[int],
                      channel_mults: Optional[Sequence[int]] = None) -> None:
    """Data (C, H, W) must match the U-Net's ``in_channels`` and ``image_size``; H, W divisible by 2^(levels-1)."""
    shape = tuple(int(s) for s in data_shape)
    if in_channels is not None and len(shape) >= 1 and shape[0] != int(in_channels):
        raise ConfigError(
            f"channels mismatch: the data has {shape[0]} channel(s) (data shape {shape}) but the network "
            f"expects net.in_channels={in_channels}. Set net.in_channels={shape[0]} (and net.out_channels if "
            f"given), or pick a dataset with {in_channels} channel(s).")
    if image_size is not None and len(shape) == 3 and shape[1:] != (int(image_size), int(image_size)):
        raise ConfigError(
            f"image size mismatch: the data has images of {shape[1]}x{shape[2]} but the network is built "
            f"for net.image_size={image_size}. Set net.image_size={shape[1]} or resize the data "
            f"(data.image_size={image_size}).")
    if channel_mults is not None and len(shape) == 3:
        factor = 2 ** (len(channel_mults) - 1)
        if shape[1] % factor or shape[2] % factor:
            raise ConfigError(
                f"image size {shape[1]}x{shape[2]} is incompatible with the U-Net: it downsamples "
                f"{len(channel_mults) - 1} times (net.channel_mults={list(channel_mults)}), so the side must "
                f"be divisible by {factor}. Use fewer levels or resize the data.")


def check_batch_vs_world(batch_size: int, world_size: int, name: str = "data.batch_size") -> None:
    """The global batch size is split over ranks: it must be a positive multiple of the world size."""
    _positive_int(name, batch_size)
    _positive_int("world size (trainer.devices * trainer.num_nodes)", world_size)
    if batch_size % world_size:
        lo = max(world_size, batch_size - batch_size % world_size)
        raise ConfigError(
            f"{name}={batch_size} (the global batch) must be divisible by the world size {world_size} "
            f"(trainer.devices * trainer.num_nodes): each rank gets batch/world examples. Use "
            f"{name}={lo} or {lo + world_size}, or change trainer.devices.")


def check_num_samples(num_samples: int, batch_size: Optional[int] = None, world_size: int = 1) -> None:
    """``num_samples`` and ``batch_size`` must be positive; ``num_samples`` splits evenly over ranks."""
    _positive_int("num_samples", num_samples)
    _positive_int("batch_size", batch_size)
    if world_size > 1 and num_samples % world_size:
        raise ConfigError(f"num_samples={num_samples} must be divisible by the world size {world_size} "
                          f"(each rank draws num_samples/world_size); use a multiple of {world_size}.")


def resolve_ckpt_path(ckpt_path: Optional[str], run_dir: Optional[str], current: Optional[Mapping] = None,
                      verbose: bool = True) -> Optional[str]:
    """The checkpoint a run starts from, checked: None for a fresh start.

    ``null`` -> None; ``"last"`` -> ``<run_dir>/checkpoints/last.ckpt``, or None (a fresh start, so a
    requeued job can always pass it) when there is none yet; any other value is a file path. The file
    is loaded once to give a clear error when it is missing, corrupt, not ours, or (``current``)
    written for another network / SDE config.
    """
    if ckpt_path in (None, "", "null", "None"):
        return None
    if ckpt_path == "last":
        if not run_dir:
            raise ConfigError("ckpt_path=last needs the run dir (hydra.run.dir=<dir of the run to resume>)")
        path = os.path.join(str(run_dir), "checkpoints", "last.ckpt")
        if not os.path.exists(path):
            if verbose:
                print(f"[train] ckpt_path=last: no checkpoint in {run_dir}/checkpoints yet, starting fresh")
            return None
    else:
        path = str(ckpt_path)
        if os.path.isdir(path):
            raise ConfigError(
                f"ckpt_path={path} is a directory, not a checkpoint file. To continue that run in its own dir pass "
                f"hydra.run.dir={path} ckpt_path=last; to start a new run from its weights pass the file, e.g. "
                f"ckpt_path={os.path.join(path, 'checkpoints', 'last.ckpt')}")
    path = os.path.abspath(path)
    check_checkpoint(path, current)
    return path


def sample_checkpoint(ckpt_path: Any) -> str:
    """The checkpoint file ``sample.py`` loads: ``ckpt_path`` itself, or for a run directory (or its
    ``checkpoints/`` folder) the ``last.ckpt`` in it; clear errors for ``last`` and missing files."""
    from sgm_lightning.training.checkpoint import _candidates
    path = str(ckpt_path)
    if path == "last":
        raise ConfigError("ckpt_path=last names the current run's last.ckpt in train.py; sample.py has no run of its "
                          "own: pass the run dir (ckpt_path=<run_dir>, which uses <run_dir>/checkpoints/last.ckpt) or "
                          "a checkpoint file (ckpt_path=<run_dir>/checkpoints/<name>.ckpt)")
    if os.path.isdir(path):
        for name in (os.path.join("checkpoints", "last.ckpt"), "last.ckpt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.abspath(os.path.join(path, name))
        found = _candidates(os.path.join(path, "*"))
        raise ConfigError(f"ckpt_path={path} is a directory without checkpoints/last.ckpt or last.ckpt; " + (
            f"pass one of its checkpoints as ckpt_path=<file>: {', '.join(found)}" if found else
            "it holds no *.ckpt files either: pass a train.py run dir or a .ckpt file"))
    if not os.path.exists(path):
        found = _candidates(path)
        raise FileNotFoundError(f"checkpoint file not found: {path}; " + (
            f"checkpoints found near it: {', '.join(found)}" if found else
            f"no *.ckpt files in {os.path.dirname(os.path.abspath(path))} or its checkpoints/ folder") +
            ". Pass ckpt_path=<a .ckpt written by train.py> or the run dir ckpt_path=<run_dir>")
    return os.path.abspath(path)


def check_checkpoint(ckpt_path: str, current_config: Optional[Mapping] = None) -> dict:
    """Load ``ckpt_path`` safely (clear error when missing / corrupt / foreign) and compare its
    stored net / sde / parametrization config with ``current_config``; returns the loaded checkpoint."""
    ckpt = load_checkpoint(ckpt_path, require_sgm=True)
    if current_config is not None:
        check_compatible(ckpt, to_plain(current_config), path=str(ckpt_path))
    return ckpt


def _world_size(cfg: Any) -> int:
    devices = _get(cfg, "trainer.devices", 1)
    nodes = _get(cfg, "trainer.num_nodes", 1) or 1
    if isinstance(devices, int) and not isinstance(devices, bool):
        n = devices
    elif isinstance(devices, (list, tuple)) or type(devices).__name__ == "ListConfig":
        n = len(devices)
    else:  # "auto", strings: resolved by Lightning at run time
        return 1
    if n < 1:
        raise ConfigError(f"trainer.devices must be >= 1 (or 'auto'), got {devices!r}")
    return n * int(nodes)


def validate_train_config(cfg: Any, data_shape: Optional[Sequence[int]] = None) -> None:
    """Cross-component checks of a training config (call before building the Trainer).

    ``data_shape`` is the (C, H, W) / (D,) shape of one example (from the DataModule); when given
    it is checked against the network's ``in_channels`` / ``image_size`` / ``channel_mults``.
    """
    max_steps = _get(cfg, "trainer.max_steps")
    if max_steps not in (None, -1):
        _positive_int("trainer.max_steps", max_steps)
    for key in ("data.batch_size", "data.val_batch_size", "data.base.batch_size", "data.base.val_batch_size"):
        if _get(cfg, key) is not None:  # global batches (data.base: a wrapped data module, e.g. SR3 pairs)
            check_batch_vs_world(_get(cfg, key), _world_size(cfg), name=key)
    if _world_size(cfg) > 1 and _get(cfg, "trainer.use_distributed_sampler", True) is not False:
        raise ConfigError("trainer.use_distributed_sampler must be false: the data modules shard every global "
                          "batch over the ranks themselves (exact resume); set trainer.use_distributed_sampler=false "
                          "(configs/trainer/default.yaml does)")
    clip = _get(cfg, "trainer.gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip!r} must be a number >= 0 (0 or null: no clipping); a "
                          "negative bound flips the gradients' sign (training would ascend the loss). Use e.g. "
                          "trainer.gradient_clip_val=1.0, or trainer.gradient_clip_val=null to switch clipping off.")
    interval = _get(cfg, "trainer.val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        raise ConfigError(f"trainer.val_check_interval={interval!r} must be > 0 (validation every that many optimizer "
                          "steps); to skip validation use trainer.limit_val_batches=0")
    if data_shape is not None:
        check_data_vs_net(data_shape, _get(cfg, "net.in_channels"), _get(cfg, "net.image_size"),
                          _get(cfg, "net.channel_mults"))


def check_noise_level(noise_free_loss: bool, noise_free_net: bool, sampled_by: Optional[str] = None) -> None:
    """A noise-free score s(x) (loss=ssm|fdsm|ism; net=noise_free_mlp has no noise-level input) cannot be
    learnt by a denoising loss, nor sampled by the reverse-diffusion samplers (``sampled_by``: who would)."""
    if noise_free_net and not noise_free_loss:
        raise ConfigError("net=noise_free_mlp has no noise-level input, so it cannot learn the noise-conditional "
                          "score of a denoising loss; use loss=ssm|fdsm|ism with model.prediction=score "
                          "(experiment=ssm_toy), or a noise-conditional network (net=mlp, a U-Net)")
    if noise_free_loss and sampled_by:
        raise ConfigError(f"{sampled_by} draws with reverse-diffusion samplers, which need a noise-conditional score, "
                          "but noise-free score matching (loss=ssm|fdsm|ism) learns a score s(x) without noise level. "
                          + ("Switch the grids off with callbacks.samples=null (as experiment=ssm_toy does)."
                             if sampled_by.startswith("callbacks") else "Sample it with Langevin dynamics "
                             "(sgm_lightning.samplers.langevin; docs/training.md)."))


# sample.py's modes and the options that belong to each (every mode also takes ckpt_path, mode, method,
# steps, options, seed, use_ema, device, out_dir, batch_size); an option of another mode is an error
SAMPLE_MODES = {
    "grid": ("num_samples", "grid_rows", "guidance_scale", "class_label", "classifier_ckpt", "classifier_scale"),
    "eval": ("eval", "metrics", "data_overrides"),
    "task": ("task", "task_method", "task_options", "num_samples", "data_overrides"),
    "interpolate": ("interpolate", "data_overrides"),
}
_MODE_HINTS = {("num_samples", "eval"): " (mode=eval draws eval.num_samples samples)"}
_GROUPS = ("metrics",)  # config groups (configs/<group>/): named by the group


def config_defaults(config_dir: str, name: str) -> dict:
    """The values of ``<config_dir>/<name>.yaml`` with its defaults list's groups (``- group: option``)
    loaded in, before any override: what an option is "set" against."""
    from omegaconf import OmegaConf
    node = OmegaConf.to_container(OmegaConf.load(os.path.join(config_dir, f"{name}.yaml")), resolve=False)
    for entry in node.pop("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                path = os.path.join(config_dir, group, f"{option}.yaml")
                node[group] = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    node.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(node), resolve=True)


def _first_change(value: Any, default: Any, name: str) -> Optional[tuple[str, Any]]:
    """(dotted name, value) of the first leaf where ``value`` differs from ``default``; None if equal."""
    if isinstance(value, Mapping) and isinstance(default, Mapping):
        for key in value:
            found = _first_change(value[key], default.get(key), f"{name}.{key}")
            if found:
                return found
        return None
    return None if value == default else (name, value)


def check_sample_mode(cfg: Any, defaults: Mapping) -> str:
    """``mode`` is one of SAMPLE_MODES and no option of another mode is set (changed from ``defaults``);
    returns the mode. The error names the option, the mode it belongs to and the fix."""
    from sgm_lightning.utils import check_choice
    mode = _get(cfg, "mode", "grid")
    check_choice("mode", mode, SAMPLE_MODES)
    for key in sorted({k for keys in SAMPLE_MODES.values() for k in keys} - set(SAMPLE_MODES[mode])):
        found = _first_change(to_plain(_get(cfg, key)), defaults.get(key), key)
        if found:
            owners = [m for m, keys in SAMPLE_MODES.items() if key in keys]
            name, value = found
            given = f"{key} (its {name}={value})" if key in _GROUPS else f"{name}={value}"
            raise ConfigError(
                f"{given} is an option of mode={' / mode='.join(owners)}, not of mode={mode}, which would ignore it"
                f"{_MODE_HINTS.get((key, mode), '')}. Use mode={owners[0]} for it, or drop {name.split('.')[0] if key in _GROUPS else name}.")
    if mode == "task" and _get(cfg, "task") is None:
        raise ConfigError("mode=task needs task=inpaint|colorize|superres|deblur (docs/inverse.md)")
    return mode


def validate_sample_config(cfg: Any, defaults: Optional[Mapping] = None) -> str:
    """Checks of a sampling config (``sample.py``): a checkpoint is given, the options belong to the mode
    (``check_sample_mode`` against ``defaults``, when given), numbers are positive. Returns the mode."""
    if _get(cfg, "ckpt_path") in (None, "", "null"):
        raise ConfigError("sample.py needs a checkpoint: pass ckpt_path=<run_dir>/checkpoints/last.ckpt "
                          "(or any .ckpt written by train.py)")
    mode = check_sample_mode(cfg, defaults) if defaults is not None else _get(cfg, "mode", "grid")
    from sgm_lightning.samplers import METHODS
    from sgm_lightning.utils import check_choice
    check_choice("method", _get(cfg, "method", "pc"), METHODS)  # before the checkpoint is loaded
    _positive_int("steps", _get(cfg, "steps"))
    _positive_int("grid_rows", _get(cfg, "grid_rows"))
    _positive_int("eval.num_samples", _get(cfg, "eval.num_samples"))
    check_num_samples(_get(cfg, "num_samples", 1), _get(cfg, "batch_size"))
    return mode


# ---------------------------------------------------------------------------- entry-point steps
def net_config(cfg: Any, data_shape: Sequence[int], num_classes: Optional[int],
               cond_shape: Optional[Sequence[int]] = None) -> dict:
    """The network config with its data-dependent fields (null in configs/net/*.yaml) filled in;
    ``cond_shape`` (the image condition of SR3 data, ``training.data.superres``) sets ``cond_channels``."""
    net = plain(cfg.net)
    if cond_shape is not None and net.get("cond_channels") in (None, 0):
        net["cond_channels"] = int(cond_shape[0])
    if len(data_shape) == 3:
        for key, value in (("in_channels", data_shape[0]), ("image_size", data_shape[-1])):
            if key in net and net[key] is None:
                net[key] = int(value)
    elif "dim" in net and net["dim"] is None:
        net["dim"] = int(data_shape[0])
    if _get(cfg, "model.class_conditional", False):
        if not num_classes:
            raise ConfigError("model.class_conditional=true needs a labelled dataset (the data module "
                              "reports num_classes=None); use a labelled dataset or class_conditional=false")
        net["num_classes"] = int(num_classes)
    return net


def build(node: Any, **kwargs) -> Any:
    """``hydra.utils.instantiate``, re-raising a constructor's ValueError itself (one clear line)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        key, text = (str(e).split("full_key: ")[-1].strip() if "full_key: " in str(e) else "the config"), str(cause)
        if isinstance(cause, TypeError) and "unexpected keyword argument" in text:  # e.g. +data.misspelt=1
            raise ConfigError(f"{key}: {text}: correct the setting's name or drop it") from None
        if isinstance(cause, MisconfigurationException):  # Lightning's bad-setting errors (Trainer, callbacks)
            hint = (" No CUDA GPU is visible: use trainer=cpu or trainer=default (accelerator=auto), or run on a "
                    "machine with a GPU." if "gpu" in text.lower() or "cuda" in text.lower() else
                    f" Fix the {key}.* setting it names.")
            raise ConfigError(f"{key}: {text}{'' if text.endswith(('.', '!')) else '.'}{hint}") from None
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        raise


def inherit_wandb_id(ckpt: Optional[str], run_dir: str) -> None:
    """Resuming another run dir's checkpoint continues that run's W&B run (same id)."""
    from sgm_lightning.training.loggers import RUN_ID_FILE, run_id_for
    if ckpt is None or os.path.exists(os.path.join(run_dir, RUN_ID_FILE)):
        return
    src = os.path.join(os.path.dirname(os.path.dirname(ckpt)), RUN_ID_FILE)
    if os.path.exists(src):  # created atomically: every rank of a torchrun start runs this at once
        with open(src) as f:
            run_id_for(run_dir, new_id=f.read().strip())


# ---------------------------------------------------------------------------- error printer
REPORTED_ERRORS = (ConfigError, CheckpointError, ValueError, FileNotFoundError, NonFiniteError)


def _debug() -> bool:
    return os.environ.get("SGM_DEBUG", "0") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR", "0") not in ("", "0")


def run_cli(main_fn: Callable) -> Callable:
    """Decorate the ``main`` of an entry point (inside ``@hydra.main``) with the error printer.

    Our errors print ``Error: <message>`` to stderr and exit with code 2 (``SGM_DEBUG=1`` or
    ``HYDRA_FULL_ERROR=1`` re-raise them with the full traceback); a preemption
    (``fault_tolerance.Preempted`` / Lightning's ``SIGTERMException``) exits with code 143.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    @functools.wraps(main_fn)
    def wrapper(*args, **kwargs):
        try:
            return main_fn(*args, **kwargs)
        except SIGTERMException as e:
            print(f"Preempted: {e or 'received SIGTERM'}; exiting with code {PREEMPTED_EXIT_CODE}",
                  file=sys.stderr, flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
        except REPORTED_ERRORS as e:
            if _debug():
                raise
            msg = str(e) if not isinstance(e, KeyError) else str(e.args[0])
            if isinstance(e, FileNotFoundError) and not msg:
                msg = f"file not found: {e.filename}"
            print(f"Error: {msg}", file=sys.stderr, flush=True)
            print("(set SGM_DEBUG=1 for the full traceback)", file=sys.stderr, flush=True)
            sys.exit(USAGE_EXIT_CODE)

    return wrapper
