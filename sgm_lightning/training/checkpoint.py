"""Checkpoint safety: atomic writes, safe (``weights_only``) loads and clear errors.

* ``AtomicCheckpointIO`` is a Lightning ``CheckpointIO`` plugin. Lightning's own writer
  (``lightning.fabric.utilities.cloud_io._atomic_save``) serialises to memory and then writes through
  an fsspec transaction (temp file + ``shutil.move``) but never calls ``fsync``, so a power loss can
  leave a renamed-but-empty file. Ours writes ``.<name>.<random>.tmp`` in the *same* directory,
  flushes and fsyncs it, ``os.replace``-s it over the target (atomic on POSIX) and fsyncs the
  directory. A ``kill -9`` at any moment leaves either the previous file or the new one, never a
  truncated one. ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` through
  ``trainer.save_checkpoint`` and hence through this plugin; ``save_last="link"`` removes the old
  ``last.ckpt`` before creating a symlink (not atomic), so our configs use ``save_last=True``.
* Loads always use ``torch.load(weights_only=True)``: no pickled code runs. ``AtomicCheckpointIO``
  forces this on Lightning's resume path (``trainer.fit(ckpt_path=...)``) too, and before saving it
  turns config containers (OmegaConf, ``AttributeDict``, paths) into plain dicts / lists / strings,
  so every checkpoint we write loads under ``weights_only=True``.
* ``load_checkpoint`` names the problem and the fix: missing file (lists the ``*.ckpt`` found next to
  it), corrupt / truncated file (suggests the previous checkpoint), not a sgm_lightning checkpoint,
  and ``check_compatible`` lists the differing ``COMPAT_KEYS`` entries of an incompatible config.
"""

from __future__ import annotations

import glob
import os
import pickle
import tempfile
import zipfile
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

CONFIG_KEY = "sgm_config"  # ScoreLitModule.on_save_checkpoint stores the resolved net/sde/loss configs here
# Config entries that must match to resume from a checkpoint's weights: the network, the forward process and
# what the network's output and input label mean (another parametrization would reinterpret the weights).
COMPAT_KEYS = ("net", "sde", "model.prediction", "model.label")


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be used (corrupt, foreign or from an incompatible config)."""


# --------------------------------------------------------------------------- atomic write
def _fsync_dir(dirname: str) -> None:
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def atomic_save(obj: Any, path: _PATH, writer: Callable[[Any, Any], None] = torch.save) -> None:
    """Write ``obj`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Stale temp files of the same target (left by a process killed mid-save) are removed first.
    ``writer(obj, file)`` serialises into an open binary file (``torch.save`` by default).
    """
    path = os.path.abspath(os.fspath(path))
    dirname = os.path.dirname(path)
    os.makedirs(dirname, exist_ok=True)
    prefix = _temp_prefix(path)
    for stale in glob.glob(os.path.join(glob.escape(dirname), glob.escape(prefix) + "*.tmp")):
        try:
            os.remove(stale)
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=dirname)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(dirname)


def to_plain(obj: Any) -> Any:
    """Recursively turn config containers into types that ``torch.load(weights_only=True)`` accepts.

    Mappings (OmegaConf ``DictConfig``, Lightning ``AttributeDict``) become ``dict``, sequences
    become ``list`` / ``tuple``, paths and enums become strings; tensors and scalars are kept.
    """
    module = type(obj).__module__ or ""
    if module.startswith("omegaconf"):
        from omegaconf import OmegaConf  # lazy: only when a config object is present

        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Enum):
        return to_plain(obj.value)
    if isinstance(obj, torch.Tensor) or obj is None:
        return obj
    for plain in (bool, int, float, str, bytes):  # subclasses (numpy scalars excluded) -> base type
        if isinstance(obj, plain):
            return obj if type(obj) is plain else plain(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, (list, set, frozenset)):
        return [to_plain(v) for v in obj]
    return obj


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that writes atomically (fsync + ``os.replace``) and loads safely.

    ``save_checkpoint`` converts config containers to plain types (``to_plain``) and writes with
    ``atomic_save``; ``load_checkpoint`` ignores ``weights_only=False`` requests and always loads
    with ``weights_only=True`` through ``load_checkpoint`` below (clear errors on bad files).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        atomic_save(to_plain(checkpoint), path)

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")


# --------------------------------------------------------------------------- safe load
def _candidates(path: str) -> list[str]:
    """``*.ckpt`` files next to ``path`` and in ``<dir>/checkpoints/`` (newest first)."""
    dirname = os.path.dirname(os.path.abspath(path))
    found: set[str] = set()
    for d in (dirname, os.path.join(dirname, "checkpoints")):
        found.update(glob.glob(os.path.join(glob.escape(d), "*.ckpt")))
    return sorted(found, key=lambda p: os.path.getmtime(p) if os.path.exists(p) else 0.0, reverse=True)


def _missing_message(path: str) -> str:
    found = _candidates(path)
    listing = ("checkpoints found there: " + ", ".join(found)) if found else \
        f"no *.ckpt files were found in {os.path.dirname(os.path.abspath(path))} or its checkpoints/ folder"
    return (f"checkpoint file not found: {path}; {listing}. Pass an existing file with ckpt_path=<file>, "
            f"ckpt_path=last to resume <run_dir>/checkpoints/last.ckpt of the current run dir, "
            f"or ckpt_path=null to start fresh.")


def load_checkpoint(path: _PATH, map_location: Any = "cpu", require_sgm: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; clear errors for bad files.

    Raises:
        FileNotFoundError: ``path`` does not exist (message lists the ``*.ckpt`` found near it).
        CheckpointError: the file is truncated / corrupt, holds pickled code, is not a dict, or
            (``require_sgm=True``) is not a sgm_lightning checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_message(path))
    others = [p for p in _candidates(path) if os.path.abspath(p) != os.path.abspath(path)]
    previous = (f" The previous checkpoint may still be good: {others[0]}." if others else "")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects that are not allowed by a safe load "
                f"(torch.load(weights_only=True)): {str(e).splitlines()[0]}. sgm_lightning checkpoints hold "
                f"only state dicts and plain hyperparameters; re-save it with sgm_lightning or load it "
                f"only if you trust its source.") from e
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({e}).{previous}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        if "deserialize object on" in str(e) or "restore data location" in str(e):
            raise CheckpointError(  # the file is fine: the device asked for is not on this machine
                f"checkpoint {path} cannot be loaded onto map_location={map_location!r} on this machine "
                f"({str(e).splitlines()[0]}); load it onto the CPU (map_location='cpu', or device=cpu in "
                f"sample.py) or on a machine with that device.") from e
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated (torch.load failed: {str(e).splitlines()[0] if str(e) else type(e).__name__})."
            f"{previous} Pass another file with ckpt_path=<file> or start fresh with ckpt_path=null.") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry); "
                              f"pass a .ckpt written by sgm_lightning's train.py.")
    if require_sgm and not is_sgm_checkpoint(ckpt):
        raise CheckpointError(f"{path} is a Lightning checkpoint but not a sgm_lightning one (no "
                              f"'{CONFIG_KEY}' entry with the run config); pass a .ckpt written by train.py.")
    return ckpt


def is_sgm_checkpoint(ckpt: Mapping) -> bool:
    """Whether ``ckpt`` carries the run config written by ``ScoreLitModule.on_save_checkpoint``."""
    return isinstance(ckpt.get(CONFIG_KEY), Mapping)


# ``_target_`` prefixes of components that moved when the package was split into layers
# (checkpoints written before the move store the old paths in their run config).
MOVED_TARGETS = {
    "sgm_lightning.data.": "sgm_lightning.training.data.",
    "sgm_lightning.callbacks.fid.": "sgm_lightning.evaluation.fid_callback.",
    "sgm_lightning.callbacks.likelihood.": "sgm_lightning.evaluation.likelihood_callback.",
    "sgm_lightning.callbacks.": "sgm_lightning.training.callbacks.",
    "sgm_lightning.metrics.": "sgm_lightning.evaluation.",
    "sgm_lightning.logging_utils.": "sgm_lightning.training.loggers.",
    "sgm_lightning.fault_tolerance.": "sgm_lightning.training.fault_tolerance.",
}


def _current_targets(node: Any) -> Any:
    """``node`` with every ``_target_`` of a moved component rewritten to its current path."""
    if isinstance(node, Mapping):
        out = {k: _current_targets(v) for k, v in node.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            for old, new in MOVED_TARGETS.items():
                if target.startswith(old):
                    out["_target_"] = new + target[len(old):]
                    break
        return out
    if isinstance(node, list):
        return [_current_targets(v) for v in node]
    return node


def stored_config(ckpt: Mapping) -> dict:
    """The run config stored in a sgm_lightning checkpoint (empty dict when absent), with the
    ``_target_`` paths of moved components updated (``MOVED_TARGETS``)."""
    cfg = ckpt.get(CONFIG_KEY)
    return _current_targets(dict(cfg)) if isinstance(cfg, Mapping) else {}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _lookup(cfg: Mapping, dotted: str) -> Mapping:
    for part in dotted.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, Mapping) else {}
    return cfg if isinstance(cfg, Mapping) else {}


def config_differences(stored: Mapping, current: Mapping, keys: Iterable[str] = COMPAT_KEYS) -> list[str]:
    """``"net.ch: checkpoint=128, current=64"`` lines for each leaf of ``keys`` that differs."""
    diffs = []
    for group in keys:
        if "." in group:  # one entry of a group; checkpoints written before it was checked lack it: skip those
            head, leaf = group.rsplit(".", 1)
            sa, sb = _lookup(stored, head), _lookup(current, head)
            if leaf not in sa:
                continue
            a, b = {group: sa[leaf]}, {group: sb.get(leaf, "<unset>")}
        else:
            a, b = _flatten(stored.get(group, {}), group), _flatten(current.get(group, {}), group)
        for k in sorted(set(a) | set(b)):
            va, vb = a.get(k, "<unset>"), b.get(k, "<unset>")
            if va != vb:
                diffs.append(f"{k}: checkpoint={va!r}, current={vb!r}")
    return diffs


def check_compatible(ckpt: Mapping, current: Mapping, path: str = "checkpoint",
                     keys: Iterable[str] = COMPAT_KEYS) -> None:
    """Raise ``CheckpointError`` listing the differing ``COMPAT_KEYS`` entries (net, sde, parametrization) of two configs.

    ``current`` is the (plain) config of this run; nothing is checked when the checkpoint stores
    no config.
    """
    stored = stored_config(ckpt)
    if not stored:
        return
    diffs = config_differences(stored, to_plain(current), keys)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was trained with a different configuration: " + "; ".join(diffs)
            + ". Fix: use the checkpoint's config (pass the same net / sde / model.prediction / model.label "
            "overrides it was trained with, see its run dir's .hydra/config.yaml) or start fresh with ckpt_path=null.")
