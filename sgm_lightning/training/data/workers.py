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
worker as before (``multiprocessing`` terminates daemonic workers with SIGTERM at exit; the
DataLoader does when a worker does not stop); one from anyone else (the scheduler) is ignored: the
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
        if info.si_pid == parent:  # the training process ends its worker: the signal's default action
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {info.si_signo})  # (in this thread only)
            os.kill(os.getpid(), info.si_signo)
            os._exit(128 + info.si_signo)  # (not reached)


def shield_from_preemption(parent: int, worker_id: int) -> None:
    """A worker's init: it ignores SIGTERM / SIGUSR1 unless they come from ``parent`` (the pid of the
    process that made the DataLoader; not ``os.getppid()``, the fork server under "forkserver")."""
    if not hasattr(signal, "sigwaitinfo") or not _SIGNALS:
        return
    signals = set(_SIGNALS)
    for sig in signals:  # a forked worker inherits the training process's Python handlers: not its business
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # (threads started later inherit the mask)
    threading.Thread(target=_take_signals, args=(int(parent), signals), daemon=True,
                     name=f"sgm-worker{worker_id}-signals").start()
