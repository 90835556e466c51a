"""Start-up checks of a run's configuration and the top-level error printer of the entry points.

Bad inputs are reported as one clear paragraph, never as a bare traceback:

* each component's constructor raises ``ValueError`` naming its own bad argument (unknown sampler,
  sigma/beta/steps <= 0, image size incompatible with the U-Net, ...);
* ``validate_train_config`` / ``validate_sample_config`` add the *cross-component* checks that no
  single constructor can do (data shape vs. network channels / image size, global batch size vs.
  world size, number of samples vs. batch size, checkpoint vs. current config) and raise
  ``ConfigError``;
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

from sgm_lightning.checkpoint import CheckpointError, check_compatible, load_checkpoint
from sgm_lightning.fault_tolerance import PREEMPTED_EXIT_CODE, NonFiniteError

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


def _to_plain(cfg: Any) -> Any:
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _positive_int(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


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


def resolve_ckpt_path(ckpt_path: Optional[str], run_dir: Optional[str], must_exist: bool = False) -> Optional[str]:
    """``"last"`` -> ``<run_dir>/checkpoints/last.ckpt`` (None when it does not exist and not ``must_exist``)."""
    if ckpt_path in (None, "", "null", "None"):
        return None
    if ckpt_path == "last":
        if not run_dir:
            raise ConfigError("ckpt_path=last needs the run dir (hydra.run.dir=<dir of the run to resume>)")
        path = os.path.join(str(run_dir), "checkpoints", "last.ckpt")
        return path if (must_exist or os.path.exists(path)) else None
    return str(ckpt_path)


def check_checkpoint(ckpt_path: str, current_config: Optional[Mapping] = None) -> dict:
    """Load ``ckpt_path`` safely (clear error when missing / corrupt / foreign) and compare its
    stored net / sde config with ``current_config``; returns the loaded checkpoint."""
    ckpt = load_checkpoint(ckpt_path, require_sgm=True)
    if current_config is not None:
        check_compatible(ckpt, _to_plain(current_config), path=str(ckpt_path))
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
    batch = _get(cfg, "data.batch_size")
    if batch is not None:
        check_batch_vs_world(batch, _world_size(cfg))
    if data_shape is not None:
        check_data_vs_net(data_shape, _get(cfg, "net.in_channels"), _get(cfg, "net.image_size"),
                          _get(cfg, "net.channel_mults"))


def validate_sample_config(cfg: Any) -> None:
    """Checks of a sampling config (``sample.py``): a checkpoint is given, numbers are positive."""
    if _get(cfg, "ckpt_path") in (None, "", "null"):
        raise ConfigError("sample.py needs a checkpoint: pass ckpt_path=<run_dir>/checkpoints/last.ckpt "
                          "(or any .ckpt written by train.py)")
    from sgm_lightning.samplers import METHODS
    from sgm_lightning.utils import check_choice
    check_choice("method", _get(cfg, "method", "pc"), METHODS)  # before the checkpoint is loaded
    steps = _get(cfg, "steps")
    if steps is not None:
        _positive_int("steps", steps)
    _positive_int("grid_rows", _get(cfg, "grid_rows"))
    check_num_samples(_get(cfg, "num_samples", 1), _get(cfg, "batch_size"))


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
