"""Edge cases of the experiment loggers as a researcher watching a dashboard meets them: the W&B run id
under several processes (torchrun starts every rank at once), what W&B is given as config, and the
errors when a logger cannot work."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import pytest


def _id_of_a_rank(run_dir, barrier, queue):
    from sgm_lightning.training.loggers import run_id_for
    barrier.wait()  # every "rank" builds its logger at the same moment, as under torchrun
    queue.put(run_id_for(run_dir))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_ranks_starting_together_agree_on_the_wandb_run_id(tmp_path):
    """Every rank computed the id: when several found no wandb_run_id.txt yet, each wrote its own, so
    the file could hold another rank's id than rank 0's W&B run (measured: 8 of 40 four-process starts
    disagreed), and a resume (ckpt_path=last reads the file) then opened a new W&B run."""
    from sgm_lightning.training.loggers import RUN_ID_FILE
    ctx = mp.get_context("fork")
    for i in range(30):
        run_dir = str(tmp_path / f"run{i}")
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_id_of_a_rank, args=(run_dir, barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        ids = [queue.get(timeout=5) for _ in procs]
        on_disk = open(os.path.join(run_dir, RUN_ID_FILE)).read().strip()
        assert ids == [on_disk] * 4, f"start {i}: ranks got {ids}, the file holds {on_disk}"
        assert sorted(os.listdir(run_dir)) == [RUN_ID_FILE]  # no temporary file left behind
    assert len({open(os.path.join(tmp_path, f"run{i}", RUN_ID_FILE)).read() for i in range(30)}) == 30  # new dir: new id


def test_wandb_not_importable_is_a_clear_error_naming_logger_csv(tmp_path, monkeypatch):
    """Without an importable wandb, make_logger returned Lightning's WandbLogger, which failed at its first
    log inside fit ("import of wandb halted"), after data and model were built, naming no way out."""
    from sgm_lightning.training.loggers import make_logger
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"logger=wandb needs the wandb package.*pip install wandb.*logger=csv"):
        make_logger("wandb", run_dir=str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written
    assert make_logger("none", run_dir=str(tmp_path)) is None


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B credentials or server settings but the ones a test writes: $NETRC and $WANDB_CONFIG_DIR
    point into tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    return tmp_path


@pytest.mark.parametrize("base_url, machine, logged_in", [
    (None, "api.forge.coreweave.com", True),  # what `wandb login` of wandb 0.31 writes (its default server)
    ("https://wandb.example.org", "wandb.example.org", True),  # a self-hosted server
    ("https://wandb.example.org", "api.wandb.ai", False),      # wandb would find no key for that server
])
def test_api_key_is_looked_up_for_the_server_wandb_uses(no_wandb_login, monkeypatch, base_url, machine, logged_in):
    """Only a ~/.netrc entry for api.wandb.ai counted as a key, but wandb 0.31's `wandb login` writes one
    for api.forge.coreweave.com (measured): logged in, every run stayed offline and the dashboard empty."""
    from sgm_lightning.training.loggers import wandb_api_key_available
    (no_wandb_login / "netrc").write_text(f"machine {machine}\n  login user\n  password {'a' * 40}\n")
    if base_url:
        monkeypatch.setenv("WANDB_BASE_URL", base_url)
    assert wandb_api_key_available() is logged_in


@pytest.mark.parametrize("where", ["WANDB_BASE_URL", "wandb login --host"])
def test_online_decision_checks_the_server_wandb_talks_to(no_wandb_login, monkeypatch, where):
    """With a key, the reachability check went to api.wandb.ai whatever server wandb was set to use: a
    self-hosted server that answers was logged to offline (no internet here), and an unreachable one could
    be logged to online (wandb.init then waits ~100 s)."""
    import socket

    from sgm_lightning.training.loggers import wandb_should_be_offline
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    with socket.socket() as server:  # a local W&B server over plain http
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        if where == "WANDB_BASE_URL":
            monkeypatch.setenv("WANDB_BASE_URL", url)
        else:  # wandb's global settings file, where `wandb login --host URL` keeps the server
            (no_wandb_login / "wandb_config").mkdir()
            (no_wandb_login / "wandb_config" / "settings").write_text(f"[default]\nbase_url = {url}\n")
        assert not wandb_should_be_offline()
    assert wandb_should_be_offline()  # the server is gone: offline, at once


def test_module_hyperparameters_are_not_logged_a_second_time_beside_the_run_config(tmp_path, monkeypatch):
    """W&B got the full resolved Hydra config at init, then Lightning logged the module's hyperparameters
    on top, flat: ``ema_decay`` beside ``model.ema_decay``, and every group again under ``config``. Now only
    what the run config lacks is added: the shape of the data, and the network config resolved from the data
    (its ``in_channels`` / ``image_size``, null in the Hydra config) in place of the unresolved one."""
    from types import SimpleNamespace

    from sgm_lightning.training.loggers import make_logger
    monkeypatch.setenv("WANDB_MODE", "offline")
    net = {"_target_": "sgm_lightning.nets.unet.UNet", "base_channels": 8, "in_channels": None, "image_size": None}
    sde = {"_target_": "sgm_lightning.sde.VPSDE", "beta_min": 0.1, "beta_max": 20}
    run_config = {"seed": 42, "net": net, "sde": sde, "data": {"batch_size": 8, "data_range": "[-1,1]"},
                  "model": {"ema_decay": 0.9999, "prediction": "eps", "class_conditional": False}}
    logger = make_logger("wandb", run_dir=str(tmp_path), run_config=run_config)
    updates = []
    logger._experiment = SimpleNamespace(config=SimpleNamespace(update=lambda d, **kw: updates.append(d)))
    resolved_net = {**net, "in_channels": 1, "image_size": 8}
    hparams = {"ema_decay": 0.9999, "prediction": "eps", "seed": 42, "data_range": "[-1,1]", "data_shape": (1, 8, 8),
               "config": {"net": resolved_net, "sde": sde, "data": run_config["data"], "dataset_id": "digits-8x8"}}
    logger.log_hyperparams(hparams)
    assert updates == [{"data_shape": (1, 8, 8), "net": resolved_net, "dataset_id": "digits-8x8"}]
    logger.log_hyperparams(hparams)  # a second fit with the same module adds nothing
    assert len(updates) == 1
    logger.log_hyperparams({"ema_decay": 0.99})  # a value that differs from the run config's is logged
    assert updates[-1] == {"ema_decay": 0.99}


def test_falling_back_to_offline_says_why_and_how_to_upload(no_wandb_login, monkeypatch):
    """Without a key (or an answer from the server) W&B went offline in silence (its own messages are
    switched off): a researcher waited for a dashboard that never filled. An explicit WANDB_MODE=offline
    stays quiet."""
    import warnings

    from sgm_lightning.training.loggers import make_logger
    run_dir = str(no_wandb_login / "run")
    with pytest.warns(UserWarning, match=r"W&B logs offline: no W&B API key \(run `wandb login`.*"
                                         rf"`wandb sync {run_dir}/wandb/offline-run-\*`"):
        logger = make_logger("wandb", run_dir=run_dir)
    assert logger._offline and os.environ["WANDB_MODE"] == "offline"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_logger("wandb", run_dir=run_dir)  # WANDB_MODE=offline now: nothing to say


@pytest.mark.parametrize("cause", ["no key", "no answer"])
def test_forced_online_that_cannot_go_online_is_a_clear_error_at_once(no_wandb_login, monkeypatch, cause):
    """logger.offline=false without a key failed at the first log inside fit (wandb's UsageError traceback);
    with a key and a server that does not answer, wandb.init waited ~100 s and then raised CommError."""
    import socket
    import time

    from sgm_lightning.training.loggers import make_logger
    if cause == "no answer":
        monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    needle = "no W&B API key" if cause == "no key" else rf"the W&B server \(http://127.0.0.1:{port}\) did not answer"
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"logger.offline=false makes W&B log online, but {needle}.*"
                                         r"logger.offline=null.*logger=csv"):
        make_logger("wandb", run_dir=str(no_wandb_login / "run"), offline=False)
    assert time.perf_counter() - t0 < 5
    from lightning.pytorch.utilities import rank_zero_only
    with monkeypatch.context() as m:  # other DDP ranks log nothing: no check that could fail on one rank alone
        m.setattr(rank_zero_only, "rank", 1)
        assert make_logger("wandb", run_dir=str(no_wandb_login / "run"), offline=False) is not None
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment's explicit offline mode still wins
    assert make_logger("wandb", run_dir=str(no_wandb_login / "run"), offline=False) is not None


def test_wandb_project_environment_variable_is_used_unless_logger_project_is_given(tmp_path, monkeypatch):
    """WANDB_ENTITY and WANDB_NAME reached wandb.init, but the config's fixed project: sgm_lightning hid
    WANDB_PROJECT: the runs of a researcher who set it landed in another project of the dashboard."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from sgm_lightning.training.loggers import make_logger
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "my_sweep")
    assert OmegaConf.to_container(compose_config("train", [f"run_dir={tmp_path}"]).logger, resolve=True)["project"] \
        == "my_sweep"
    given = compose_config("train", [f"run_dir={tmp_path}", "logger.project=other"]).logger.project
    assert given == "other"
    assert make_logger("wandb", run_dir=str(tmp_path))._project == "my_sweep"
    monkeypatch.delenv("WANDB_PROJECT")
    assert OmegaConf.to_container(compose_config("train", [f"run_dir={tmp_path}"]).logger, resolve=True)["project"] \
        == "sgm_lightning"
    assert make_logger("wandb", run_dir=str(tmp_path))._project == "sgm_lightning"


def test_an_online_run_keeps_wandbs_messages_with_the_dashboard_url(no_wandb_login, monkeypatch):
    """WANDB_SILENT=true was set for every W&B run: online, wandb's "View run at https://..." line, the
    one way to find the run's dashboard from the terminal, was never printed. Offline it stays silent."""
    import socket

    from sgm_lightning.training.loggers import make_logger
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    with socket.socket() as server:  # a W&B server that answers
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        logger = make_logger("wandb", run_dir=str(no_wandb_login / "online"))
    assert not logger._offline and "WANDB_SILENT" not in os.environ
    assert make_logger("wandb", run_dir=str(no_wandb_login / "offline"), offline=True)._offline
    assert os.environ["WANDB_SILENT"] == "true"


def _inherit_as_a_rank(ckpt, run_dir, barrier, queue):
    from sgm_lightning.cli import inherit_wandb_id
    from sgm_lightning.training.loggers import run_id_for
    barrier.wait()
    inherit_wandb_id(ckpt, run_dir)
    queue.put(run_id_for(run_dir))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_ranks_resuming_another_run_dirs_checkpoint_all_continue_its_wandb_run(tmp_path):
    """Resuming another run dir's checkpoint copies its W&B id; every rank did it with a plain open('w'),
    so a rank could read the half-written (empty) file and draw a new id. The copy is now created
    atomically, like a new id."""
    from sgm_lightning.training.loggers import RUN_ID_FILE
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / RUN_ID_FILE).write_text("abcd1234\n")
    ckpt = str(old / "checkpoints" / "last.ckpt")
    ctx = mp.get_context("fork")
    for i in range(10):
        run_dir = str(tmp_path / f"new{i}")
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_inherit_as_a_rank, args=(ckpt, run_dir, barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [queue.get(timeout=5) for _ in procs] == ["abcd1234"] * 4
        assert sorted(os.listdir(run_dir)) == [RUN_ID_FILE]
