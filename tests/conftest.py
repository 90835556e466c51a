"""Test-session settings shared by every test file."""

import importlib.util
import os

import pytest
import torch

# W&B never goes online from the tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The tests use small tensors: one intra-op thread avoids oversubscribing the 2 CI cores
    (measured: the exact mixture score took 40 ms a call with 2 threads under load, 2.6 ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- shared constants
# (imported with `from conftest import ...`: pytest puts tests/ on sys.path)

# train.py overrides for a seconds-long CPU run on the digits: a tiny U-Net, a small global batch, no
# progress bar or model summary. Tests add their own steps, logger and callback settings.
TINY_TRAIN = ["net.base_channels=8", "net.channel_mults=[1]", "net.num_groups=4", "data.batch_size=8",
              "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# ... and without a logger or the sample-grid callback
TINY_QUIET = [*TINY_TRAIN, "logger=none", "~callbacks.samples"]


def make_sdes(ve_sigma_max: float = 50.0) -> dict:
    """The forward processes the math tests run on, by name. VE uses sigma_min = 0.01 and Song et al.'s
    sigma_max = 50 unless a test needs another prior scale (it says why)."""
    from sgm_lightning.sde import SubVPSDE, VESDE, VPSDE
    return {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=ve_sigma_max)}


SDES = make_sdes()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    """The entry-point script ``<repo>/<name>.py`` (train, sample) as a module, to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(f"_sgm_script_{name}", os.path.join(REPO, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compose_config(config: str, overrides):
    """The Hydra config ``configs/<config>.yaml`` with ``overrides``, as the entry points compose it."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        return compose(config_name=config, overrides=list(overrides))


@pytest.fixture
def no_debug(monkeypatch):
    """CLI errors as users see them (one ``Error:`` line), whatever SGM_DEBUG / HYDRA_FULL_ERROR say here."""
    monkeypatch.delenv("SGM_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with the layout train.py writes: <run_dir>/checkpoints/last.ckpt (tiny U-Net, VP SDE)."""
    from test_sample_cli import DATA, LOSS, NET, SDE, write_checkpoint

    from hydra.utils import instantiate
    from sgm_lightning.training.lit_module import ScoreLitModule
    sde = instantiate(SDE)
    torch.manual_seed(0)
    module = ScoreLitModule(net=instantiate(NET), sde=sde, loss=instantiate(LOSS, sde=sde), data_shape=(1, 8, 8),
                            ema_decay=0.9, config={"net": NET, "sde": SDE, "loss": LOSS, "data": DATA})
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    write_checkpoint(module, run / "checkpoints" / "last.ckpt")
    return run
