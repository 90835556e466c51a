"""How a training run starts (train.py, train_classifier.py): one process per rank by an external launcher
(torchrun, srun) or not, the check that all those processes write into one run directory and that a new
run does not overwrite an earlier run's checkpoints in it, and the Trainer plugins every run gets."""

from __future__ import annotations

import os
from typing import Any


def external_launcher() -> str | None:
    """``"torchrun"`` / ``"srun"`` when that launcher started this process as one of several ranks (each
    runs the entry point itself); None for a single process or Lightning's own launcher (which starts
    the other ranks with the first one's Hydra output dir)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "srun"
    return None


def check_shared_run_dir(script: str = "train.py") -> None:
    """Under torchrun / srun every rank runs Hydra itself, and the default run dir is time-stamped
    (``outputs/<date>/<time>``): ranks starting in different seconds, and always the ranks of other
    nodes, would each take their own dir; rank 0's checkpoints and ``ckpt_path=last`` would then not be
    what the other ranks resume from. The run dir must be given explicitly."""
    from hydra.core.hydra_config import HydraConfig

    from sgm_lightning.cli import ConfigError
    launcher = external_launcher()
    if launcher is None or not HydraConfig.initialized():
        return
    overrides = HydraConfig.get().overrides
    keys = {o.split("=", 1)[0].lstrip("+~") for o in (*overrides.task, *overrides.hydra)}
    if not keys & {"run_dir", "hydra.run.dir"}:
        raise ConfigError(f"{launcher} starts {script} once per rank, and each rank would take its own time-stamped "
                          f"run dir (outputs/<date>/<time>): pass one dir for all ranks, e.g. "
                          f"hydra.run.dir=outputs/ddp_run1 (on a file system every node sees), and resume with the "
                          f"same hydra.run.dir=... ckpt_path=last")


def check_run_dir_is_free(run_dir: str, ckpt_path) -> None:
    """A run that does not resume this run dir's own checkpoint (``ckpt_path=null``, or another run's file) must
    not start in a run dir that holds checkpoints: it overwrote ``last.ckpt`` and the periodic ones of the
    earlier run, mixed its metrics into the same CSV / W&B run and its grids into the same folder."""
    import glob

    from sgm_lightning.cli import ConfigError
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt")))
    if not found:
        return
    fresh = ckpt_path in (None, "", "null", "None")  # what resolve_ckpt_path reads as a fresh start
    own = os.path.join(os.path.abspath(run_dir), "checkpoints")
    if not fresh and (ckpt_path == "last" or os.path.dirname(os.path.abspath(str(ckpt_path))) == own):
        return
    given = "ckpt_path=null (a fresh start)" if fresh else f"ckpt_path={ckpt_path}"
    raise ConfigError(f"the run dir {run_dir} already holds the checkpoints of an earlier run "
                      f"({', '.join(os.path.basename(f) for f in found[:3])}{', ...' if len(found) > 3 else ''}), "
                      f"which {given} would overwrite: continue that run with ckpt_path=last, or start this one in "
                      f"a new run dir (hydra.run.dir=<new dir>, or leave it unset for a time-stamped one)")


def start_run(cfg: Any, script: str) -> str:
    """The start of a training run (train.py, train_classifier.py): one run dir for all ranks of a
    torchrun / srun launch, seeds, float32 matmul precision on a GPU or ``cpu_threads`` without one, and a
    run dir that holds no earlier run's checkpoints (checked before anything is written). Returns the
    absolute run dir, created."""
    import lightning as L
    import torch
    check_shared_run_dir(script)
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    elif cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    run_dir = os.path.abspath(cfg.run_dir)
    check_run_dir_is_free(run_dir, cfg.get("ckpt_path"))
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def trainer_plugins(trainer_cfg: Any) -> tuple[list, dict]:
    """The Trainer's plugins and argument overrides of a run: write-then-rename checkpoints, and for
    ``trainer.precision=16-mixed`` on a CPU the fp16 plugin itself (fp16 autocast + grad scaler, as asked;
    Lightning alone swaps it for bf16-mixed with a warning, while the stored config says fp16)."""
    import torch
    from lightning.pytorch.plugins import MixedPrecision

    from sgm_lightning.training.checkpoint import AtomicCheckpointIO
    plugins, overrides = [AtomicCheckpointIO()], {}
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if str(trainer_cfg.get("precision")) in ("16-mixed", "16") and on_cpu:
        plugins.append(MixedPrecision("16-mixed", "cpu"))
        overrides["precision"] = None
    return plugins, overrides
