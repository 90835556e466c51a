"""Common LightningDataModule plumbing: global batch split, deterministic resumable sampling, val split.

Every DataModule of the package derives from :class:`BaseDataModule`. Batches are tuples ``(x, y)``:
``x`` float32 in ``data_range`` ("[-1,1]" by default, or "[0,1]"), ``y`` int64 class labels, or
``-1`` for every example of a dataset without labels (``num_classes`` is then None).

Batch size semantics: ``batch_size`` is the GLOBAL batch size; each of the ``world_size`` ranks loads
``batch_size // world_size`` examples per step (ValueError when it does not divide). Training batches
come from :class:`~sgm_lightning.training.data.sampler.ResumableBatchSampler`, which shards each global
batch over the ranks itself, so the Trainer must not inject a distributed sampler:
``Trainer(use_distributed_sampler=False)`` (``configs/trainer``; ``train.py`` refuses a multi-process
run without it, and Lightning itself stops with a message saying so).

Mid-epoch resume: Lightning 2.6 restores its batch counter but, for a plain ``DataLoader``, restarts
the epoch's iterator from its first batch (it only warns that the loader is not resumable). The
DataModule therefore stores ``{"epoch", "batches_consumed"}`` in ``state_dict()`` (Lightning puts it
in every checkpoint), read from ``trainer.fit_loop.epoch_loop.batch_progress.current.ready``, and
``load_state_dict()`` makes the next ``train_dataloader()`` skip the consumed batches of that epoch.
(Lightning still prints "your dataloader is not resumable": it only checks the DataLoader object.)
The count is in global steps' batches, so a run may also resume on another number of ranks; with another
global batch size the position is converted through the number of examples consumed (the state holds the
batch size).
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from sgm_lightning.training.data.ranges import check_data_range
from sgm_lightning.training.data.sampler import EpochKeyedBatches, EpochSeededDataset, ResumableBatchSampler
from sgm_lightning.training.data.workers import shield_from_preemption
from sgm_lightning.utils import check_int

log = logging.getLogger(__name__)

NO_LABEL = -1  # the label of every example of an unlabelled dataset


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index split of ``range(n)``: ``round(val_fraction * n)`` val examples
    chosen by a permutation seeded with ``seed``; both lists sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n_val = int(round(val_fraction * n))
    g = torch.Generator()
    g.manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


class BaseDataModule(L.LightningDataModule):
    """Base class; subclasses set ``data_shape``, ``num_classes``, ``dataset_id`` in ``__init__`` and
    implement ``_load() -> (train_dataset, val_dataset or None)`` (map-style, items ``(x, y)``).

    Args:
        batch_size: GLOBAL batch size (split over the ranks).
        num_workers: DataLoader worker processes per rank.
        pin_memory: pin host memory (default: ``torch.cuda.is_available()``).
        persistent_workers: keep workers alive between epochs (default: ``num_workers > 0``).
        seed: seed of the per-epoch permutations and of the train/val split.
        val_fraction: fraction of the training examples held out for validation (0: none).
        data_range: "[-1,1]" or "[0,1]".
        val_batch_size: global validation batch size (default: ``batch_size``).
    """

    def __init__(
        self,
        *,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        seed: int = 0,
        val_fraction: float = 0.0,
        data_range: str = "[-1,1]",
        val_batch_size: int | None = None,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None:
                check_int(f"{name} (the global batch size)", value)
        check_int("num_workers", num_workers, min=0)
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = (self.num_workers > 0) if persistent_workers is None else bool(persistent_workers)
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.data_range = check_data_range(data_range)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self._train_sampler: ResumableBatchSampler | None = None
        self._resume: dict | None = None

    # ------------------------------------------------------------------ to implement
    data_shape: tuple[int, ...]
    num_classes: int | None
    dataset_id: str

    def _load(self) -> tuple[Dataset, Dataset | None]:
        raise NotImplementedError

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset = self._load()
            if len(self.train_dataset) == 0:
                n_val = len(self.val_dataset) if self.val_dataset is not None else 0
                why = (f": val_fraction={self.val_fraction:g} holds out all {n_val} examples; use a smaller val_fraction"
                       if self.val_fraction > 0 and n_val > 0 else ": check the data source (root, split)")
                raise ValueError(f"the training set of {self.dataset_id} is empty{why}")

    def _split(self, full: Dataset) -> tuple[Dataset, Dataset | None]:
        """Hold out ``val_fraction`` of ``full`` for validation (deterministic in ``seed``)."""
        if self.val_fraction == 0.0:
            return full, None
        tr, va = split_indices(len(full), self.val_fraction, self.seed)
        return Subset(full, tr), Subset(full, va)

    # ------------------------------------------------------------------ distributed layout
    def _layout(self) -> tuple[int, int]:
        """(rank, world_size) from the attached trainer, (0, 1) without one."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def per_rank_batch_size(self, global_batch_size: int | None = None, world_size: int | None = None,
                            name: str = "batch_size") -> int:
        """``global_batch_size // world_size``; ValueError naming both (the setting as ``name``) when it does not divide."""
        b = self.batch_size if global_batch_size is None else int(global_batch_size)
        ws = self._layout()[1] if world_size is None else int(world_size)
        if b <= 0:
            raise ValueError(f"{name} must be a positive integer (the global batch size), got {b}")
        if b % ws != 0:
            raise ValueError(
                f"{name}={b} (global) is not divisible by the world size {ws}: "
                f"use a multiple of {ws}, e.g. {name}={max(ws, b - b % ws)}"
            )
        return b // ws

    def _loader(self, dataset: Dataset, batch_sampler: ResumableBatchSampler | EpochKeyedBatches,
                generator: torch.Generator | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=self._worker_init_fn(),
            # not the global RNG (see data/sampler.py)
            generator=batch_sampler.sampler.loader_generator if generator is None else generator,
        )

    def _worker_init_fn(self):
        """Workers survive a preemption signal sent to the whole job (data/workers.py)."""
        return partial(shield_from_preemption, os.getpid()) if self.num_workers > 0 else None

    # ------------------------------------------------------------------ dataloaders
    def train_batch_sampler(self, rank: int | None = None, world_size: int | None = None) -> ResumableBatchSampler:
        """The training batch sampler of ``rank`` (defaults: the trainer's layout), positioned for resume."""
        self.setup("fit")
        r, ws = self._layout()
        r = r if rank is None else int(rank)
        ws = ws if world_size is None else int(world_size)
        sampler = ResumableBatchSampler(
            len(self.train_dataset), self.per_rank_batch_size(world_size=ws), r, ws, self.seed, shuffle=True, drop_last=True
        )
        if len(sampler) == 0:
            n = len(self.train_dataset)
            held = f" after the validation split val_fraction={self.val_fraction:g}" if self.val_fraction > 0 else ""
            fit = (f"use batch_size<={n - n % ws}" + (f" (a multiple of the world size {ws})" if ws > 1 else "")
                   if n >= ws else f"use at least {ws} examples (one per rank) or fewer devices")
            raise ValueError(f"batch_size={self.batch_size} (global) is larger than the training set ({n} examples{held}): "
                             f"{fit}, or more training data")
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self._resume is not None:
            epoch, start = self._resume["epoch"], self._resume["batches_consumed"]
            if start >= len(sampler):  # the saved epoch was complete: continue with the next one
                epoch, start = epoch + 1, 0
            sampler.set_epoch(epoch)
            sampler.set_start(start)
            self._resume = None
        else:
            sampler.set_epoch(epoch)
        self._train_sampler = sampler
        return sampler

    def train_dataloader(self) -> DataLoader:
        """Training batches; random augmentations are seeded per (seed, epoch, example) (data/sampler.py)."""
        sampler = self.train_batch_sampler()  # runs setup()
        return self._loader(EpochSeededDataset(self.train_dataset, self.seed), EpochKeyedBatches(sampler))

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (dataset order, sharded over ranks); an empty list when there is no
        validation set (Lightning then skips validation).

        Every example is seen exactly once over all ranks (no DistributedSampler-style padding, whose
        repeated examples biased the cross-rank mean ``val/loss``), and every rank gets the same
        number of batches (``ResumableBatchSampler(pad=False)``), so no rank waits for the others."""
        self.setup("validate")
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return []
        rank, ws = self._layout()
        bs = self.per_rank_batch_size(self.val_batch_size, ws, name="val_batch_size")
        n = len(self.val_dataset)
        if n < ws:
            raise ValueError(
                f"the validation set of {getattr(self, 'dataset_id', type(self).__name__)} has {n} example(s), "
                f"fewer than the world size {ws}: every rank needs at least one. Hold out more examples "
                f"(e.g. a larger data.val_fraction), run on fewer devices, or switch validation off "
                f"(data.val_fraction=0 or trainer.limit_val_batches=0)"
            )
        sampler = ResumableBatchSampler(n, bs, rank, ws, self.seed, shuffle=False, drop_last=False, pad=False)
        # its own generator: iterating it must not draw from the global RNG (exact resume of training)
        return self._loader(self.val_dataset, sampler, generator=torch.Generator().manual_seed(self.seed))

    def reference_dataset(self) -> Dataset:
        """The training examples without training-time augmentation (subclasses that augment override it)."""
        return self.train_dataset

    def reference_dataloader(self, batch_size: int, num_samples: int | None = None) -> DataLoader:
        """The first ``num_samples`` training examples (``reference_dataset``: not augmented) in dataset order
        on one process (e.g. for FID reference statistics); all of them when None."""
        self.setup("fit")
        ds = self.reference_dataset()
        if num_samples is not None:
            ds = Subset(ds, list(range(min(int(num_samples), len(ds)))))
        # a private generator: the global RNG (dropout) must not depend on whether statistics were cached
        return DataLoader(ds, batch_size=int(batch_size), shuffle=False, num_workers=self.num_workers,
                          worker_init_fn=self._worker_init_fn(),
                          generator=torch.Generator().manual_seed(self.seed))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_consumed"}`` of the running fit (batches of the epoch already trained on)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # the epoch the counted batches belong to: trainer.current_epoch is one ahead in a file written
        # after fit ended, once Lightning has closed the epoch (also when max_steps stopped it mid-epoch)
        epoch = max(int(trainer.fit_loop.epoch_progress.current.started) - 1, 0)
        return {"epoch": epoch, "batches_consumed": int(progress.ready), "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if int(state_dict.get("seed", self.seed)) != self.seed:
            log.warning("resuming with seed=%d, the checkpoint used seed=%s", self.seed, state_dict.get("seed"))
        consumed, saved_batch = int(state_dict["batches_consumed"]), state_dict.get("batch_size")
        if saved_batch is not None and int(saved_batch) != self.batch_size:
            # the position is in batches of the saved size: continue after the same examples of the epoch's order
            examples = consumed * int(saved_batch)
            consumed = examples // self.batch_size
            log.warning("resuming with data.batch_size=%d, the checkpoint used %d: the epoch continues after its "
                        "first %d examples%s", self.batch_size, int(saved_batch), consumed * self.batch_size,
                        "" if examples % self.batch_size == 0 else
                        f" ({examples - consumed * self.batch_size} of them are seen again)")
        self._resume = {"epoch": int(state_dict["epoch"]), "batches_consumed": consumed}


class LabelledTensorDataset(Dataset):
    """``(x[i], y[i])`` pairs from in-memory tensors (x float32 in the data range, y int64)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None):
        if y is None:
            y = torch.full((x.shape[0],), NO_LABEL, dtype=torch.long)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        self.x = x.to(torch.float32).contiguous()
        self.y = y.to(torch.long)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]
