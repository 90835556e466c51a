"""Lightning's fit-loop state at the end of a training step, for checkpoints that resume exactly.

``StepEndLoopState`` captures the loop counters at every step end (cheaply: it runs on the hot path),
``use_step_end_loop_state`` writes them into a checkpoint written after ``fit`` ended, and
``resume_between_epochs`` rewrites the state of a checkpoint written at an epoch's last step into the
equivalent "between two epochs" state that Lightning 2.6 restores consistently.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
from typing import Any, Callable


class StepEndLoopState:
    """The fit loop's state at the end of a training step, captured at every step end and cheaply.

    ``capture(trainer)`` reads the counters of Lightning's progress trackers (one
    ``operator.attrgetter`` call per tracker) and each loop's own ``on_save_checkpoint()`` entry
    (the batch count of the logger, a data loader's state): ~150 Python calls a step, where
    ``fit_loop.state_dict()`` and a deep copy of it cost ~1,100, host time that a compiled GPU step
    cannot hide. ``state_dict(trainer)`` returns what ``trainer.fit_loop.state_dict()`` returned at
    that moment: the live state dict with the captured values put back. The trackers and loops are
    found once per fit loop, from the keys of its public ``state_dict()`` (``epoch_progress``,
    ``epoch_loop.batch_progress``, ``epoch_loop.state_dict``, ...); Lightning updates them in place,
    so the same objects are read at every step.
    """

    def __init__(self):
        self._loop = None
        self._trackers: list[tuple[str, tuple[str, ...], tuple[str, ...], Any, Callable]] = []
        self._loops: list[tuple[str, Any]] = []  # (key of a loop's own entry, the loop)
        self._values: list | None = None
        self._own: list[dict] = []
        self.global_step: int | None = None

    def _index(self, loop) -> None:
        trackers = []

        def walk(key: str, path: tuple[str, ...], obj) -> None:
            leaves = []
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if dataclasses.is_dataclass(value):
                    walk(key, path + (f.name,), value)
                else:
                    leaves.append(f.name)
            if leaves:
                trackers.append((key, path, tuple(leaves), obj, operator.attrgetter(*leaves)))

        loops = []
        for key in loop.state_dict():
            if key == "state_dict" or key.endswith(".state_dict"):  # the entry of a loop's on_save_checkpoint()
                loops.append((key, functools.reduce(getattr, key.split(".")[:-1], loop)))
                continue
            obj = functools.reduce(getattr, key.split("."), loop)
            if dataclasses.is_dataclass(obj):
                walk(key, (), obj)
        self._loop, self._trackers, self._loops = loop, trackers, loops

    def capture(self, trainer) -> None:
        loop = trainer.fit_loop
        if loop is not self._loop:
            self._index(loop)
        self.global_step = int(trainer.global_step)
        self._values = [get(obj) for _, _, _, obj, get in self._trackers]
        own = [loop_.on_save_checkpoint() for _, loop_ in self._loops]
        self._own = [entry if not entry else copy.deepcopy(entry) for entry in own]  # usually {} or ints

    def state_dict(self, trainer) -> dict | None:
        """``fit_loop.state_dict()`` as at the last ``capture`` (None before the first)."""
        if self._values is None or trainer.fit_loop is not self._loop:
            return None
        state = trainer.fit_loop.state_dict()
        for (key, path, names, _, _), values in zip(self._trackers, self._values):
            entry = functools.reduce(dict.__getitem__, path, state[key])
            entry.update(zip(names, values if len(names) > 1 else (values,)))
        for (key, _), entry in zip(self._loops, self._own):
            state[key] = copy.deepcopy(entry)
        return state


def use_step_end_loop_state(trainer, checkpoint: dict, snapshot: StepEndLoopState | None) -> None:
    """Write the fit-loop state of the last step's end into a checkpoint written after ``fit`` ended.

    When ``max_steps`` (or ``max_epochs``) stops training, Lightning's fit loop closes the epoch
    before ``on_train_end``: its epoch counter moves one ahead even mid-epoch, and its batch counter
    reads as "restarted on last". A checkpoint written then (``ModelCheckpoint(save_last=True)`` in
    ``on_train_end``, ``PreemptionCheckpoint``) resumes in the wrong epoch at the wrong batch. Saved
    at the end of the last step (as every periodic checkpoint is), the state resumes exactly, so
    that state (``snapshot``, captured at every step end) replaces it. Nothing changes for
    checkpoints written during a step or an epoch.
    """
    if snapshot is None or snapshot.global_step != int(trainer.global_step) \
            or "fit_loop" not in checkpoint.get("loops", {}):
        return
    live = trainer.fit_loop.epoch_progress.current
    if live.processed != live.started:  # the epoch is still open: the live state is a step end's
        return
    state = snapshot.state_dict(trainer)
    saved = None if state is None else state["epoch_progress"]["current"]
    if saved is not None and saved["processed"] == saved["started"] - 1:  # closed after the snapshot
        if state["epoch_loop.batch_progress"].get("is_last_batch"):
            # resumed between two epochs (resume_between_epochs), where a validation at the epoch's
            # last batch has run: its counters at save time, not the step end's (a resume from a
            # mid-epoch step end replays them itself)
            at_save = checkpoint["loops"]["fit_loop"]
            state.update({k: v for k, v in at_save.items() if k.startswith("epoch_loop.val_loop.")})
        checkpoint["loops"]["fit_loop"] = state
        checkpoint["epoch"] = int(saved["completed"])


def _zero_counts(tree: dict) -> None:
    for k, v in tree.items():
        if isinstance(v, dict):
            _zero_counts(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            tree[k] = 0


def resume_between_epochs(checkpoint: dict) -> int | None:
    """Rewrite the fit-loop state of a checkpoint written at the end of an epoch's last step into the
    state between that epoch and the next one (in place, before Lightning restores its loops).
    Returns the logger's step counter (``_batches_that_stepped``) the first batch of the resumed run
    must start with, None when nothing was rewritten: Lightning 2.6 restores such a state as
    "restarted on the last batch" and, when validation is due by its counters at the first batch
    (``check_val_every_n_epoch``, or ``val_check_interval`` dividing the batches trained so far),
    replays that batch's end once more, which advances the counter a second time; the caller puts
    the value back at the first batch's start (every metric would be logged one step late).

    Lightning 2.6 restores such a file ("restarted mid-epoch, on train batch end, last batch") by
    closing the epoch, but then skips the next epoch's start counters: its epoch counters end up
    inconsistent (``ready`` one behind ``completed``), and a later checkpoint no longer resumes in the
    right epoch. The equivalent state with the epoch closed (epoch counters equal, per-epoch batch,
    scheduler and optimizer counters at zero, the step counter of the logger advanced as Lightning
    does for a step-end file) restores through Lightning's plain "start the next epoch" path.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or "epoch_progress" not in fit or "epoch_loop.batch_progress" not in fit:
        return None
    epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
    at_step_end = batches["total"]["completed"] == batches["total"]["processed"] - 1
    mid_epoch = epochs["total"]["processed"] == epochs["total"]["started"] - 1
    if not (batches.get("is_last_batch") and at_step_end and mid_epoch):
        return None
    for tracker in (epochs["total"], epochs["current"]):
        tracker["processed"] = tracker["completed"] = tracker["started"]
    batches["total"]["completed"] = batches["total"]["processed"]
    batches["is_last_batch"] = False
    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress",
                "epoch_loop.automatic_optimization.optim_progress", "epoch_loop.manual_optimization.optim_step_progress"):
        if key in fit:
            for name, sub in fit[key].items():
                if name == "current":
                    _zero_counts(sub)
                elif isinstance(sub, dict):  # optim_progress: {"optimizer": {"step": {...}, "zero_grad": {...}}}
                    for part in sub.values():
                        if isinstance(part, dict) and "current" in part:
                            _zero_counts(part["current"])
    if "epoch_loop.val_loop.batch_progress" in fit:
        _zero_counts(fit["epoch_loop.val_loop.batch_progress"]["total"])
    state = fit.setdefault("epoch_loop.state_dict", {})
    state["_batches_that_stepped"] = int(state.get("_batches_that_stepped", 0)) + 1
    checkpoint["epoch"] = int(epochs["current"]["completed"])
    return state["_batches_that_stepped"]
