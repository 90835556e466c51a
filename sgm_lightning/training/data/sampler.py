"""Deterministic, rank-sharded, resumable batch sampling.

The order of the examples in epoch ``e`` is a permutation drawn from a ``torch.Generator`` seeded
with ``(seed, e)`` only, so it does not depend on the number of workers, on the global RNG or on
how often the run was interrupted. Global batch ``i`` of an epoch holds the permuted indices
``perm[i * B : (i + 1) * B]`` with ``B = batch_size * world_size``; rank ``r`` takes the ``r``-th
contiguous chunk of ``batch_size`` of it. The union over ranks of step ``i`` is therefore the same
global batch for every world size, and ranks never share an example within an epoch.

Lightning 2.6 calls ``set_epoch`` on ``DataLoader.sampler`` and on ``DataLoader.batch_sampler.sampler``
at every epoch start (never on the batch sampler itself), so :class:`ResumableBatchSampler` exposes
its epoch through the ``.sampler`` attribute (an :class:`EpochPermutation`).

Every new ``DataLoader`` iterator (one per epoch) draws its workers' base seed from
``DataLoader.generator``, or from the global RNG when that is None, which shifts the global stream
(dropout) at every epoch start, differently in a run resumed at an epoch boundary.
``EpochPermutation.loader_generator`` is the generator to pass instead: reseeded from
(seed, epoch) in ``set_epoch``, it keeps the global RNG out of data loading and makes worker seeds
a function of the epoch.

Random augmentations (``random_flip``, a torchvision transform in a ``MapDataModule`` dataset) draw from
torch's CPU RNG inside ``Dataset.__getitem__``, i.e. from the worker's stream (seeded once per worker, so
the draws depended on the number of workers, on which worker loaded which batch and on where a resumed
run restarted them) or, without workers, from the global stream that dropout uses. The training loader
therefore reads :class:`EpochSeededDataset` through :class:`EpochKeyedBatches`: each example is fetched
with torch's CPU RNG seeded from (seed, epoch, index) only, and the caller's RNG state put back after, so
augmentations are the same for any number of workers or ranks and after any resume. (Only torch's RNG:
Python's ``random`` and NumPy's streams stay per worker.)
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Dataset

from sgm_lightning.utils import check_int

# (seed, epoch) are combined into one generator seed; the multiplier keeps (s, e) pairs apart.
_EPOCH_STRIDE = 1_000_003
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer (Steele et al. 2014): a bijection of 64-bit integers that decorrelates nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def example_seed(seed: int, epoch: int, index: int) -> int:
    """The torch RNG seed under which example ``index`` is loaded in ``epoch`` (distinct within an epoch)."""
    return _mix64((_mix64(int(seed) * _EPOCH_STRIDE + int(epoch)) + int(index)) & _MASK64)


class EpochPermutation:
    """The index order of one epoch: a permutation from (seed, epoch), or 0..N-1 when not shuffling.

    Args:
        num_samples: number N of examples in the dataset.
        seed: base seed of the per-epoch permutations.
        shuffle: permute (True) or keep the dataset order (False).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        check_int("num_samples", num_samples, min=0)
        check_int("seed", seed, min=0)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.loader_generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        check_int("epoch", epoch, min=0)
        self.epoch = int(epoch)
        self.loader_generator.manual_seed(self._epoch_seed() + 1)

    def indices(self) -> torch.Tensor:
        """The (N,) int64 index order of the current epoch."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self._epoch_seed())
        return torch.randperm(self.num_samples, generator=g)

    def _epoch_seed(self) -> int:
        return self.seed * _EPOCH_STRIDE + self.epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableBatchSampler:
    """Batch sampler for one rank: deterministic per (seed, epoch), sharded, resumable mid-epoch.

    Args:
        num_samples: number N of examples in the dataset.
        batch_size: examples per batch on THIS rank (the global batch is ``batch_size * world_size``).
        rank: index of this process in ``[0, world_size)``.
        world_size: number of processes sharing the epoch.
        seed: base seed of the per-epoch permutations.
        shuffle: permute the examples every epoch (False: dataset order, e.g. for validation).
        drop_last: drop the last incomplete global batch. With ``drop_last=False`` the index list is
            padded by wrapping around to a multiple of ``world_size`` (as ``DistributedSampler`` does)
            so that every rank yields the same number of batches; with one rank nothing is repeated.
        pad: with ``drop_last=False``, whether to pad as above (True) or never repeat an example (False,
            for evaluation, where a repeated example biases the mean): the last global batch is then
            split as evenly as possible over the ranks, and merged into the one before when it has
            fewer examples than ranks, so that every rank still yields the same number of non-empty
            batches (one rank batch may then hold one example more than ``batch_size``). Needs
            ``num_samples >= world_size``.

    ``set_start(k)`` makes the next iteration over the current epoch skip its first ``k`` batches
    (a resumed run continues at the first unseen batch); ``len()`` stays the full number of batches
    per epoch, which is what Lightning expects when it restores its batch counter.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        pad: bool = True,
    ):
        check_int("num_samples", num_samples, min=0)
        check_int("batch_size", batch_size)
        check_int("world_size", world_size)
        check_int("rank", rank, min=0)
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not drop_last and not pad and 0 < num_samples < world_size:
            raise ValueError(
                f"num_samples={num_samples} examples cannot be split over world_size={world_size} ranks without "
                f"repeating one (pad=False): every rank needs at least one example; use at least {world_size} "
                "examples, fewer ranks, or pad=True"
            )
        self.sampler = EpochPermutation(num_samples, seed=seed, shuffle=shuffle)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.pad = bool(pad)
        self._start_epoch: int | None = None
        self._start = 0

    # ------------------------------------------------------------------ epoch / resume state
    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def num_samples(self) -> int:
        return self.sampler.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning does this through ``self.sampler``)."""
        self.sampler.set_epoch(epoch)

    def set_start(self, batch_index_in_epoch: int) -> None:
        """Skip the first ``batch_index_in_epoch`` batches of the current epoch on the next iteration."""
        check_int("batch_index_in_epoch", batch_index_in_epoch, min=0)
        self._start_epoch = self.epoch
        self._start = int(batch_index_in_epoch)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "start": self._start if self._start_epoch == self.epoch else 0,
            "seed": self.sampler.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("num_samples", self.num_samples)) != self.num_samples:
            raise ValueError(
                f"the saved sampler state is for num_samples={state['num_samples']}, "
                f"this sampler has num_samples={self.num_samples}: resume with the same dataset"
            )
        self.set_epoch(int(state["epoch"]))
        self.set_start(int(state.get("start", 0)))

    # ------------------------------------------------------------------ batches
    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n, b = self.num_samples, self._global_batch()
        if self.drop_last:
            return n // b
        if not self.pad:
            return len(self._unpadded_bounds())
        padded = math.ceil(n / self.world_size) * self.world_size
        return math.ceil(padded / b)

    def _unpadded_bounds(self) -> list[tuple[int, int]]:
        """``pad=False``: (start, end) of every global batch in the epoch's index list; a last partial
        batch with fewer examples than ranks is merged into the one before (see ``pad``)."""
        n, b = self.num_samples, self._global_batch()
        bounds = [(i, min(i + b, n)) for i in range(0, n, b)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < self.world_size:
            bounds[-2:] = [(bounds[-2][0], n)]
        return bounds

    def epoch_batches(self) -> list[list[int]]:
        """All batches of this rank in the current epoch (ignores ``set_start``)."""
        idx = self.sampler.indices()
        if not self.drop_last and not self.pad:  # rank r: the r-th of world_size near-equal parts
            ws, r = self.world_size, self.rank
            return [idx[lo + r * (hi - lo) // ws: lo + (r + 1) * (hi - lo) // ws].tolist()
                    for lo, hi in self._unpadded_bounds()]
        nb, b, bs = len(self), self._global_batch(), self.batch_size
        if self.drop_last:
            idx = idx[: nb * b]
        elif len(idx) > 0:
            padded = math.ceil(len(idx) / self.world_size) * self.world_size
            idx = torch.cat([idx, idx[: padded - len(idx)]]) if padded > len(idx) else idx
        batches = []
        for i in range(nb):
            glob = idx[i * b : (i + 1) * b]
            per_rank = len(glob) // self.world_size  # == bs except for a last partial batch
            batches.append(glob[self.rank * per_rank : (self.rank + 1) * per_rank].tolist())
        assert all(len(x) <= bs for x in batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the epoch and start offset are read at the first next(), i.e. after Lightning
        # has called set_epoch for this epoch.
        start = self._start if self._start_epoch == self.epoch else 0
        self._start_epoch, self._start = None, 0  # one-shot: later passes start at batch 0
        yield from self.epoch_batches()[start:]


class EpochKeyedBatches:
    """The batches of a :class:`ResumableBatchSampler` as lists of ``(epoch, index)`` keys of
    :class:`EpochSeededDataset`; ``.sampler`` is the wrapped one's (Lightning calls its ``set_epoch``)."""

    def __init__(self, batches: ResumableBatchSampler):
        self.batches = batches
        self.sampler = batches.sampler

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:  # (the epoch is read once the first batch is drawn, as in ResumableBatchSampler)
            epoch = self.batches.epoch
            yield [(epoch, i) for i in batch]


class EpochSeededDataset(Dataset):
    """``dataset[index]`` for the key ``(epoch, index)``, fetched with torch's CPU RNG seeded with
    :func:`example_seed` ``(seed, epoch, index)``; the RNG state before the call is restored after it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """A batch's examples (what the DataLoader calls): the RNG state is saved and restored once."""
        state, generator, dataset, seed = torch.get_rng_state(), torch.default_generator, self.dataset, self.seed
        try:
            items, epoch, base = [], None, 0
            for e, index in keys:
                if e != epoch:  # (one epoch per batch: example_seed's outer mix once)
                    epoch, base = e, _mix64(seed * _EPOCH_STRIDE + e)
                generator.manual_seed(_mix64((base + index) & _MASK64))
                items.append(dataset[index])
            return items
        finally:
            torch.set_rng_state(state)
