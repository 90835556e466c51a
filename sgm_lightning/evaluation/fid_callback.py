"""FID (or Fréchet distance in another feature space) of generated samples during training.

Every rank generates its share of the samples and feeds its own metric; torchmetrics sums the
metric states across ranks inside ``compute()``, which every rank calls, so no images are gathered and
no rank waits on another alone. Samples come in chunks of ``batch_size``; chunk c uses the seed
``seed + c`` and chunks are dealt round-robin to the ranks, so the evaluated sample set (and the value)
does not depend on the number of processes. The value is logged on every rank as ``<prefix>/fid``
(``<prefix>/fd_<extractor name>`` for non-Inception features) so that
``ModelCheckpoint(monitor="val/fid", mode="min")`` works; ``<prefix>/<key>_best`` tracks the best.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import nn

from sgm_lightning.evaluation.periodic import PeriodicEvaluation
from sgm_lightning.evaluation.features import extractor_name
from sgm_lightning.evaluation.fid import (
    compute_seeded,
    load_reference_features,
    load_reference_statistics,
    make_fid_metric,
    make_kid_metric,
    metric_key,
)
from sgm_lightning.evaluation.reference import reference_statistics
from sgm_lightning.training.data.ranges import to_signed
from sgm_lightning.sampling import METHODS, check_sampler_options
from sgm_lightning.utils import check_choice, check_int

log = logging.getLogger(__name__)


def chunk_seeds(num_samples: int, batch_size: int, seed: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(chunk index, seed) pairs of this rank: chunk c of ``batch_size`` samples uses seed + c, chunks dealt
    round-robin. Raises ValueError unless num_samples is divisible by batch_size x world_size."""
    if num_samples % (batch_size * world_size) != 0:
        raise ValueError(f"num_samples={num_samples} must be divisible by batch_size x world_size = "
                         f"{batch_size} x {world_size}; change num_samples or batch_size")
    return [(c, seed + c) for c in range(rank, num_samples // batch_size, world_size)]


def shared_reference_statistics(trainer, extractor: nn.Module, data, dataset_id: str, split: str,
                                num_samples: int | None, cache_dir: str | None, **kwargs):
    """``reference_statistics`` for every rank: rank 0 computes (or loads) and caches, all ranks meet at a
    barrier, then the other ranks read the cache (a folder every rank can see; else they recompute)."""
    ref = None
    if trainer.global_rank == 0:
        ref = reference_statistics(extractor, data, dataset_id, split, num_samples, cache_dir, **kwargs)
        log.info("reference statistics %s (%s)", ref.path, "cache hit" if ref.hit else "computed")
    trainer.strategy.barrier("fid_reference_statistics")
    if trainer.global_rank != 0:
        ref = reference_statistics(extractor, data, dataset_id, split, num_samples, cache_dir, **kwargs)
    return ref


class FIDCallback(PeriodicEvaluation):
    """Fréchet distance (FID for the Inception extractor; Heusel et al. 2017) of model samples vs real data.

    Args:
        extractor: feature network (``sgm_lightning.evaluation.features``; any module with ``name`` and
            ``num_features``).
        every_n_steps: evaluate after every N optimizer steps (None: never on steps).
        at_validation: also evaluate at the end of each validation epoch (not in the sanity check).
        num_samples: generated samples per evaluation (divisible by batch_size x world size).
        batch_size: samples per ``generate`` call (and per seed chunk).
        method, steps, sampler_options: passed to ``pl_module.generate``.
        use_ema: sample with the EMA weights.
        seed: base seed of the chunk seeds (the same samples' noise at every evaluation).
        kid: also log KID (Bińkowski et al. 2018); needs the real features cached too.
        kid_subset_size: KID subset size (<= num_samples and the number of reference samples).
        reference_split, reference_num_samples: real data for the reference statistics
            (computed once by rank 0 from ``trainer.datamodule`` and cached in ``cache_dir``).
        dataset_id: overrides ``trainer.datamodule.dataset_id`` in the cache key.
        prefix: logging prefix ("val").
    """

    def __init__(self, extractor: nn.Module, every_n_steps: int | None = 5000, at_validation: bool = False,
                 num_samples: int = 10_000, batch_size: int = 250, method: str = "ode", steps: int | None = None,
                 sampler_options: dict | None = None, use_ema: bool = True, seed: int = 0, kid: bool = False,
                 kid_subset_size: int = 1000, reference_split: str = "train",
                 reference_num_samples: int | None = 50_000, cache_dir: str | None = None,
                 dataset_id: str | None = None, prefix: str = "val"):
        super().__init__()
        if every_n_steps is None and not at_validation:
            raise ValueError("set every_n_steps (an integer >= 1) and/or at_validation=True, else FID never runs")
        self.every_n_steps = None if every_n_steps is None else check_int("every_n_steps", every_n_steps)
        self.at_validation = bool(at_validation)
        self.num_samples = check_int("num_samples", num_samples, min=2)
        self.batch_size = check_int("batch_size", batch_size)
        if self.num_samples % self.batch_size:
            raise ValueError(f"num_samples={num_samples} must be divisible by batch_size={batch_size}")
        if kid and kid_subset_size > num_samples:
            raise ValueError(f"kid_subset_size={kid_subset_size} must be <= num_samples={num_samples}")
        self.extractor = extractor
        check_choice("method", method, METHODS)  # fail at start-up, not at the first evaluation (step N)
        self.method = method
        self.steps = None if steps is None else check_int("steps (None: the method's default)", steps)
        self.sampler_options = dict(sampler_options or {})
        check_sampler_options(method, self.sampler_options)  # 'rtoll' failed at the first evaluation
        self.use_ema, self.seed, self.kid = bool(use_ema), int(seed), bool(kid)
        self.kid_subset_size = check_int("kid_subset_size", kid_subset_size)
        self.reference_split, self.reference_num_samples = reference_split, reference_num_samples
        self.cache_dir, self.dataset_id, self.prefix = cache_dir, dataset_id, prefix
        self.key = metric_key(extractor, "fid")
        self.prog_bar_key = self.key
        self.kid_key = metric_key(extractor, "kid")
        self.best: float | None = None
        self.history: list[tuple[int, float]] = []
        self.reference_key: str | None = None
        self._fid = None
        self._kid = None
        self._last_step = -1

    # ------------------------------------------------------------------ settings / state
    @property
    def settings(self) -> dict:
        """What a reported number depends on (logged as hyperparameters once per fit)."""
        return {"metric": self.key, "extractor": extractor_name(self.extractor), "num_samples": self.num_samples,
                "method": self.method, "steps": self.steps, "sampler_options": self.sampler_options,
                "use_ema": self.use_ema, "seed": self.seed, "batch_size": self.batch_size,
                "reference_split": self.reference_split, "reference_num_samples": self.reference_num_samples,
                "reference_key": self.reference_key}

    @property
    def state_key(self) -> str:
        """One per logged metric, so several FIDCallbacks (e.g. Inception and random features) can run in one
        Trainer (Lightning refused two of one class); checkpoints keyed by the class name still load."""
        return self._generate_state_key(key=self.key, prefix=self.prefix)

    def state_dict(self) -> dict:
        return {"best": self.best, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        best = state_dict.get("best")
        self.best = None if best is None or math.isnan(best) else best
        self.history = [tuple(h) for h in state_dict.get("history", [])]

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_unconditioned(pl_module)
        takes, shape = getattr(self.extractor, "in_shape", None), getattr(pl_module, "data_shape", None)
        if takes is not None and shape is not None and tuple(takes) != tuple(shape):  # randproj / identity features
            raise ValueError(f"the FID feature extractor takes inputs of shape {tuple(takes)}, but this model's data "
                             f"have shape {tuple(shape)}: set 'metrics.extractor.in_shape=[{','.join(map(str, shape))}]'")
        dm = trainer.datamodule
        dataset_id = self.dataset_id or getattr(dm, "dataset_id", None)
        if dm is None or dataset_id is None:
            raise ValueError("FIDCallback needs trainer.datamodule with a dataset_id (or dataset_id=...) to "
                             "compute the reference statistics; pass the datamodule to trainer.fit(datamodule=...)")
        chunk_seeds(self.num_samples, self.batch_size, self.seed, 0, trainer.world_size)  # fail now, not at step N
        self._fid = make_fid_metric(self.extractor).to(pl_module.device)
        if self.kid:
            self._kid = make_kid_metric(self.extractor, subset_size=self.kid_subset_size).to(pl_module.device)
        ref = shared_reference_statistics(trainer, self.extractor, dm, dataset_id, self.reference_split,
                                          self.reference_num_samples, self.cache_dir, keep_features=self.kid,
                                          device=pl_module.device, batch_size=self.batch_size)
        self.reference_key = ref.key
        if self.kid and ref.n < self.kid_subset_size:
            raise ValueError(f"kid_subset_size={self.kid_subset_size} is larger than the {ref.n} reference images "
                             f"({self.reference_split} split, reference_num_samples={self.reference_num_samples}); "
                             f"set kid_subset_size <= {ref.n} or use more reference images")
        load_reference_statistics(self._fid, ref.mu, ref.sigma, ref.n, rank=trainer.global_rank)
        if self._kid is not None:  # each rank holds a 1/W share; torchmetrics concatenates them
            load_reference_features(self._kid, ref.features[trainer.global_rank::trainer.world_size], rank=0)
        for logger in trainer.loggers:
            logger.log_hyperparams({f"{self.prefix}/{self.key}_settings": self.settings})

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate this rank's share, update the metrics, compute (synced over ranks) and return figures."""
        if self._fid is None:
            raise RuntimeError("FIDCallback.evaluate called before on_fit_start")
        self._fid.reset()
        if self._kid is not None:
            self._kid.reset()
        nfe = 0
        for _, seed in chunk_seeds(self.num_samples, self.batch_size, self.seed, trainer.global_rank,
                                   trainer.world_size):
            g = torch.Generator(device=pl_module.device).manual_seed(seed)
            res = pl_module.generate(self.batch_size, method=self.method, steps=self.steps, generator=g,
                                     batch_size=self.batch_size, use_ema=self.use_ema, **self.sampler_options)
            x = to_signed(res.samples, pl_module.hparams.get("data_range", "[-1,1]"))
            nfe = int(getattr(res, "nfe", 0) or 0)
            self._fid.update(x, real=False)
            if self._kid is not None:
                self._kid.update(x, real=False)
        out = {self.key: float(self._fid.compute()), f"{self.key}_nfe": float(nfe)}
        if self._kid is not None:
            kid_mean, kid_std = compute_seeded(self._kid, self.seed)
            out[self.kid_key], out[f"{self.kid_key}_std"] = float(kid_mean), float(kid_std)
        value = out[self.key]
        if not math.isnan(value):  # a NaN (diverged samples) must not become, or stay, the best
            self.best = value if self.best is None else min(self.best, value)
        out[f"{self.key}_best"] = float("nan") if self.best is None else self.best
        self.history.append((int(trainer.global_step), value))
        return out


__all__ = ["FIDCallback", "chunk_seeds", "shared_reference_statistics"]
