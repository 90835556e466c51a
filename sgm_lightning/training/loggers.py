"""Experiment loggers: W&B (default; offline automatically when it cannot reach the server), CSV,
TensorBoard or none.

W&B facts this module works around (measured with wandb 0.31): without an API key ``wandb.init``
raises a UsageError or prompts for a login on a terminal; with a key but no network it gives up
only after about 100 s; float images are no longer rescaled, so images are logged as uint8. Hence
online mode is used only when an API key is available AND the W&B server (api.forge.coreweave.com:443, or
$WANDB_BASE_URL's) answers a TLS handshake within 2 s.

The W&B run id is stored in ``<run_dir>/wandb_run_id.txt``; a resumed run reads it back and
continues the same W&B run (``resume="allow"``).
"""

from __future__ import annotations

import netrc
import os
import socket
import uuid
from typing import Any, Mapping

RUN_ID_FILE = "wandb_run_id.txt"
LOGGERS = ("wandb", "csv", "tensorboard", "none")


DEFAULT_HOSTS = ("api.forge.coreweave.com", "api.wandb.ai")  # wandb's default server since 0.31, and before


def wandb_base_url() -> str | None:
    """The W&B server the user chose: $WANDB_BASE_URL, else the base_url of wandb's global settings file
    (written by ``wandb login --host``); None for wandb's default server."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    import configparser
    parser = configparser.ConfigParser()
    try:
        parser.read(os.path.join(os.environ.get("WANDB_CONFIG_DIR") or os.path.expanduser("~/.config/wandb"),
                                 "settings"))
        return parser.get("default", "base_url", fallback=None) or None
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None


def wandb_api_key_available() -> bool:
    """True when WANDB_API_KEY is set or ~/.netrc (or $NETRC) has an entry for the W&B server
    (``wandb_base_url``). Only api.wandb.ai was looked up, but ``wandb login`` of wandb 0.31 writes an entry
    for its new default api.forge.coreweave.com (and for the host of ``--host``): logged in, a run stayed
    offline."""
    from urllib.parse import urlsplit
    if os.environ.get("WANDB_API_KEY"):
        return True
    url = wandb_base_url()
    hosts = (urlsplit(url).netloc,) if url else DEFAULT_HOSTS
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        return os.path.exists(path) and any(netrc.netrc(path).authenticators(h) is not None for h in hosts)
    except (OSError, netrc.NetrcParseError):
        return False


def network_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0, tls: bool = True) -> bool:
    """Whether ``host:port`` completes a TLS handshake (``tls=False``: a TCP connect) within ``timeout``
    seconds per step. A TCP connect alone also succeeds through a proxy or firewall that accepts
    connections and never answers, where wandb.init would then wait for about 100 s."""
    import ssl
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only whether it answers; nothing is sent
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if not tls:
                return True
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except (OSError, ValueError):  # ssl.SSLError, socket.timeout are OSErrors
        return False


def wandb_server_reachable(timeout: float = 2.0) -> bool:
    """``network_reachable`` for the server wandb talks to (``wandb_base_url``, else wandb's default)."""
    from urllib.parse import urlsplit
    url = wandb_base_url()
    if url is None:
        try:
            from wandb.sdk.lib.urls import DEFAULT_BASE_URL as url
        except ImportError:
            url = "https://api.wandb.ai"
    parts = urlsplit(url if "//" in url else f"https://{url}")
    https = parts.scheme != "http"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:
        return False
    return bool(parts.hostname) and network_reachable(parts.hostname, port, timeout=timeout, tls=https)


def wandb_offline_reason() -> str:
    """Why W&B has to log offline ("" when it can go online): WANDB_MODE, no API key, or no answer."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={mode}"
    if not wandb_api_key_available():
        return "no W&B API key (run `wandb login` or set WANDB_API_KEY)"
    if not wandb_server_reachable():
        return f"the W&B server ({wandb_base_url() or 'its default'}) did not answer within 2 s"
    return ""


def wandb_should_be_offline() -> bool:
    """Offline when WANDB_MODE is offline/disabled, no API key, or the W&B server does not answer."""
    return bool(wandb_offline_reason())


def run_id_for(run_dir: str, new_id: str | None = None) -> str:
    """The W&B run id of ``run_dir`` (read from RUN_ID_FILE, created on first use with ``new_id``, by
    default a fresh random one).

    All processes of a run get the same id: under torchrun / SLURM every rank builds its logger at the
    same time, and each wrote its own new id when none had found the file yet (the file could then hold
    another id than rank 0's W&B run, and a resume opened a new W&B run). A new id is written to a file of
    this process and hard-linked to RUN_ID_FILE, which fails if that exists: the first process wins, and
    no process reads a half-written file."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    rid = _read_run_id(path)
    if rid:
        return rid
    os.makedirs(run_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        f.write((new_id or uuid.uuid4().hex[:8]) + "\n")
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            if not _read_run_id(path):  # an empty file (written by an older version that crashed)
                os.replace(tmp, path)
        except OSError:  # a file system without hard links
            if not os.path.exists(path):
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return _read_run_id(path)


def _read_run_id(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read().strip()


def _appending_csv_logger(run_dir: str):
    """Lightning's CSVLogger writing ``<run_dir>/csv/metrics.csv``, except that a resumed run appends to the
    file of the run it resumes (Lightning's writer deletes an existing metrics.csv: the metrics logged before
    the resume were lost). Rows keep their ``step``; steps logged after the last checkpoint appear again."""
    import csv

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):  # keep it; new rows use (and extend) its header
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = sorted(next(csv.reader(f), []))

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=run_dir, name="csv", version="")


def _new_hyperparameters(params: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict:
    """The entries of the module's hyperparameters that the run config does not hold already: a key equal to
    the run config's own or to one of a group's (``model.ema_decay``, ``data.data_range``, ``seed``), and
    the ``config`` copy of the groups, are left out; a group resolved from the data (``net`` with its
    ``in_channels`` / ``image_size``) replaces the run config's and new facts (``data_shape``) are added."""
    groups = [g for g in run_config.values() if isinstance(g, Mapping)]
    new = {}
    for key, value in params.items():
        if key == "config" and isinstance(value, Mapping):
            new.update({k: v for k, v in value.items() if run_config.get(k) != v})
        elif run_config.get(key) != value and not any(key in g and g[key] == value for g in groups):
            new[key] = value
    return new


def _global_rank() -> int:
    from lightning.pytorch.utilities import rank_zero_only
    return getattr(rank_zero_only, "rank", 0)


def _run_config_wandb_logger():
    """Lightning's WandbLogger, except that with a run config (the full resolved Hydra config, given to
    wandb.init as its config) the module's hyperparameters Lightning logs at fit start add only what the
    run config lacks: they were all logged a second time, flat at the top level (``ema_decay`` beside
    ``model.ema_decay``, and every group again under ``config``)."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    class RunConfigWandbLogger(WandbLogger):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._run_config = dict(kwargs.get("config") or {})

        @rank_zero_only
        def log_hyperparams(self, params) -> None:
            from lightning.fabric.utilities.logger import _convert_params, _convert_json_serializable
            if not self._run_config:
                return super().log_hyperparams(params)
            new = _new_hyperparameters(_convert_json_serializable(_convert_params(params)), self._run_config)
            self._run_config.update(new)
            if new:
                super().log_hyperparams(new)

    return RunConfigWandbLogger


def make_logger(kind: str, run_dir: str, run_config: Mapping[str, Any] | None = None, project: str | None = None,
                name: str | None = None, entity: str | None = None, tags: list | None = None,
                offline: bool | None = None):
    """Build the logger for a run: ``kind`` in LOGGERS; everything is written under ``run_dir``.

    ``offline=None`` decides automatically (``wandb_should_be_offline``); ``project=None``: $WANDB_PROJECT,
    else "sgm_lightning" (a fixed default hid the variable, unlike WANDB_ENTITY / WANDB_NAME). Returns None
    for "none".
    """
    if kind not in LOGGERS:
        raise ValueError(f"logger={kind!r} is not supported; allowed values: {', '.join(LOGGERS)}")
    if kind == "none":
        return None
    if kind == "csv":
        return _appending_csv_logger(run_dir)
    if kind == "tensorboard":
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("logger=tensorboard needs the tensorboard package: `pip install tensorboard` "
                             "(or use logger=wandb / csv / none)")
        from lightning.pytorch.loggers import TensorBoardLogger
        return TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="")
    try:  # else Lightning's WandbLogger failed only at its first log, inside fit, naming neither fix
        import wandb  # noqa: F401
    except ImportError as e:
        raise ValueError(f"logger=wandb needs the wandb package, which cannot be imported ({e}): `pip install "
                         "wandb`, or log without it: logger=csv (or tensorboard / none)") from None
    WandbLogger = _run_config_wandb_logger()
    if offline is None:
        why = wandb_offline_reason()
        offline = bool(why)
        if offline and not why.startswith("WANDB_MODE"):  # (W&B's own messages are silenced below)
            from lightning.pytorch.utilities import rank_zero_warn
            rank_zero_warn(f"[sgm_lightning] W&B logs offline: {why}. The run stays in {run_dir}/wandb; upload "
                           f"it with `wandb sync {run_dir}/wandb/offline-run-*`")
    elif not offline and _global_rank() == 0 and (why := wandb_offline_reason()) and not why.startswith("WANDB_MODE"):
        # forced online without a key failed at the first log, without an answer after ~100 s, inside fit
        # (rank 0 only: the other ranks log nothing, and one failing alone would leave the others waiting)
        raise ValueError(f"logger.offline=false makes W&B log online, but {why}: fix that, or let the run go "
                         "offline when it cannot go online (logger.offline=null), or use logger=csv")
    disabled = os.environ.get("WANDB_MODE", "").lower() == "disabled"  # the user's "no W&B at all" stays so
    if offline and not disabled:
        os.environ["WANDB_MODE"] = "offline"  # also for any wandb call outside the logger
    if offline or disabled:  # online, W&B's messages stay: they give the run's dashboard URL
        os.environ.setdefault("WANDB_SILENT", "true")
    project = project or os.environ.get("WANDB_PROJECT") or "sgm_lightning"
    return WandbLogger(project=project, name=name, entity=entity, tags=list(tags or []), save_dir=run_dir,
                       id=run_id_for(run_dir), resume="allow", offline=offline and not disabled,
                       config=dict(run_config or {}), **({"mode": "disabled"} if disabled else {}))
