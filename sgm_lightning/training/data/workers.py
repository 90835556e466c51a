"""DataLoader worker processes that outlive a preemption signal sent to the whole job.

Schedulers preempt a job by signalling every one of its processes: SLURM's ``scancel`` and its
``--signal`` warning (SIGTERM, SIGUSR1) reach the DataLoader workers too, as does ``kill -TERM -<pgid>``.
A worker's default action for both is to die; the main process's DataLoader then raised "DataLoader
worker (pid ...) is killed by signal: Terminated" before the preemption checkpoint
(``training/fault_tolerance.py``) was written at the step's end, and the run ended with exit code 1
instead of 143.

:func:`shield_from_preemption` (``DataLoader(worker_init_fn=partial(shield_from_preemption, os.getpid()))``)
makes a worker set these signals aside (it blocks them and takes them in a
thread with ``sigwaitinfo``): one sent by the worker's parent, the training process, still ends the
worker (``multiprocessing`` terminates daemonic workers with SIGTERM at exit; the DataLoader does when
a worker does not stop), with exit status 0: the DataLoader's SIGCHLD handler, still armed at
interpreter exit for persistent workers, reports a worker killed by a signal as an error, and the worker
now dies a moment after the signal, while the parent waits for it; one from anyone else (the scheduler) is ignored: the
training process got it too, writes its checkpoint and shuts the workers down. Where
``signal.sigwaitinfo`` does not exist (macOS, Windows) nothing changes.
"""

from __future__ import annotations

import os
import signal
import threading

# the preemption signals of fault_tolerance.PreemptionCheckpoint (SIGUSR1 does not exist on Windows)
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


def _take_signals(parent: int, signals: set) -> None:
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_pid == parent:  # the training process ends its worker
            os._exit(0)


def shield_from_preemption(parent: int, worker_id: int) -> None:
    """A worker's init: it ignores SIGTERM / SIGUSR1 unless they come from ``parent`` (the pid of the
    process that made the DataLoader; not ``os.getppid()``, the fork server under "forkserver")."""
    if not hasattr(signal, "sigwaitinfo") or not _SIGNALS:
        return
    signals = set(_SIGNALS)
    for sig in signals:  # (inherited handlers are the training process's business; an inherited SIG_IGN hid them)
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # (threads started later inherit the mask)
    threading.Thread(target=_take_signals, args=(int(parent), signals), daemon=True,
                     name=f"sgm-worker{worker_id}-signals").start()
