"""How an entry point was launched: one process per rank by an external launcher (torchrun, srun) or
not, and the check that all those processes write into one run directory."""

from __future__ import annotations

import os


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
