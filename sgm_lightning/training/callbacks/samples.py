"""Fixed-seed sample grids during and after training, one per configured sampler.

Every ``every_n_steps`` optimizer steps (and at the end of training) rank 0 draws ``num_samples``
samples with each sampler from the same seed (so grids are comparable across steps), saves
``<out_dir>/<name>_step<k>.png`` and logs ``samples/<name>`` (uint8 image; caption with NFE and
step) and ``samples/<name>_nfe``. Other ranks skip: ``pl_module.generate`` contains no collective
operation, so nothing can deadlock.
"""

from __future__ import annotations

import os
from typing import Mapping

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from sgm_lightning.samplers import METHODS
from sgm_lightning.sampling import check_sampler_options
from sgm_lightning.training.viz import picturable, samples_to_image
from sgm_lightning.utils import check_choice, check_int

DEFAULT_SAMPLERS = {
    "unipc": {"method": "unipc", "steps": 10, "options": {}},
    "dpm_sde": {"method": "dpm_sde", "steps": 20, "options": {}},
    "ode": {"method": "ode", "steps": None, "options": {}},
}


def log_image(logger, key: str, image: np.ndarray, step: int, caption: str) -> None:
    """Log a uint8 HWC image to W&B / TensorBoard (other loggers: nothing)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[image], step=step, caption=[caption])
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, image, step, dataformats="HWC")


class SampleGridCallback(L.Callback):
    """Sample grids for each sampler in ``samplers`` (name -> {method, steps, options}).

    Args:
        every_n_steps: draw grids every this many optimizer steps (0: only at the end).
        samplers: name -> {"method": ..., "steps": ..., "options": {...}} (default unipc, dpm_sde, ode);
            a ``None`` entry is dropped (``callbacks.samples.samplers.ode=null`` switches one off).
        num_samples: samples per grid.
        seed: seed of the sampling generator (the same for every grid).
        use_ema: sample with the EMA weights.
        at_train_end: also draw grids when training ends.
        out_dir: where PNGs go (default ``<trainer.default_root_dir>/samples``).
    """

    def __init__(self, every_n_steps: int = 1000, samplers: Mapping | None = None, num_samples: int = 64,
                 seed: int = 0, use_ema: bool = True, at_train_end: bool = True, out_dir: str | None = None):
        super().__init__()
        every_n_steps = check_int("every_n_steps (0: only at the end)", every_n_steps, min=0)
        num_samples = check_int("num_samples", num_samples)
        # a null entry switches a configured sampler off (callbacks.samples.samplers.<name>=null)
        samplers = {k: v for k, v in dict(DEFAULT_SAMPLERS if samplers is None else samplers).items() if v is not None}
        for name, spec in samplers.items():
            if not isinstance(spec, Mapping) or "method" not in spec:
                raise ValueError(f"samplers[{name!r}] must be a mapping with a 'method' key, got {spec!r}")
            check_choice(f"samplers[{name!r}].method", spec["method"], METHODS)  # fail at start-up, not at step N
            try:
                check_sampler_options(spec["method"], dict(spec.get("options") or {}))
            except ValueError as e:
                raise ValueError(f"samplers[{name!r}].options: {e}") from None
        self.every_n_steps = int(every_n_steps)
        self.samplers = samplers
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.use_ema = bool(use_ema)
        self.at_train_end = bool(at_train_end)
        self.out_dir = out_dir
        self._done_step, self._warned = -1, False
        self.last_paths: dict[str, str] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._done_step:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.global_step != self._done_step:
            self.draw(trainer, pl_module)

    def draw(self, trainer, pl_module) -> dict[str, str]:
        """Draw, save and log one grid per sampler (rank 0 only); returns name -> PNG path."""
        step = trainer.global_step
        self._done_step = step
        if not trainer.is_global_zero:
            return {}
        shape = getattr(pl_module, "data_shape", None)
        why = None
        if shape is not None and not picturable(shape):  # e.g. vectors (D,), D != 2: no picture to draw
            why = (f"data of shape {tuple(shape)} (grids draw images with 1 or 3 channels and 2-D points)")
        elif getattr(getattr(getattr(pl_module, "score_model", None), "net", None), "cond_channels", 0):
            why = ("a network conditioned on an image (SR3: its samples need low-resolution inputs; "
                   "sample.py mode=task task=superres task_method=sr3 draws them)")
        if why is not None:
            if not self._warned:
                rank_zero_warn(f"[sgm_lightning] no sample grids for {why}; set callbacks.samples=null to silence this")
                self._warned = True
            return {}
        from sgm_lightning.training.viz import save_image
        out_dir = self.out_dir or os.path.join(trainer.default_root_dir, "samples")
        os.makedirs(out_dir, exist_ok=True)
        for name, spec in self.samplers.items():
            g = torch.Generator(device=pl_module.device)
            g.manual_seed(self.seed)
            # class-conditional models: the classes cycle through the grid (0, 1, ..., K-1, 0, ...)
            k = getattr(pl_module, "num_classes", None)
            y = torch.arange(self.num_samples, device=pl_module.device) % k if k else None
            try:
                res = pl_module.generate(self.num_samples, method=spec["method"], steps=spec.get("steps"),
                                         generator=g, y=y, use_ema=self.use_ema, **dict(spec.get("options") or {}))
            except (RuntimeError, AssertionError, FloatingPointError) as e:
                # A numerical failure of one diagnostic sampler (e.g. an adaptive ODE solver's step-size
                # underflow on a barely trained model) must not end a long training run: warn, go on.
                rank_zero_warn(f"[sgm_lightning] sample grid {name!r} ({spec['method']}) failed at step {step}: {e}; "
                               "training continues")
                continue
            image = samples_to_image(res.samples, data_range=pl_module.hparams.data_range)
            path = os.path.join(out_dir, f"{name}_step{step}.png")
            save_image(image, path)
            self.last_paths[name] = path
            caption = f"{name}: method={spec['method']} NFE={res.nfe} step={step}"
            for logger in trainer.loggers:
                log_image(logger, f"samples/{name}", image, step, caption)
                logger.log_metrics({f"samples/{name}_nfe": float(res.nfe)}, step=step)
        return dict(self.last_paths)
