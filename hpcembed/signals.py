"""Graceful stop: SIGTERM, SIGUSR1 or SIGUSR2 ask the job to stop taking new work units, commit what is in
flight, and exit with EXIT_STOPPED, which a job script reads as 'requeue me' (see slurm/).

Every rank installs the handler: under srun or mpiexec the signal reaches all ranks, and without a handler
SIGUSR1 would kill them. Only the conductor acts on it; a tokenizer rank that was signalled alone passes the
request on to the conductor.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("hpcembed")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""
        self._previous: dict[int, object] = {}
        self.announce = True

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, why: str) -> None:
        if not self._event.is_set():
            self.signal_name = why
            self._event.set()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._event.is_set():
            log.info("%s received again; already stopping", name)
            return
        if self.announce:
            log.info("%s received: taking no new work units, committing what is in flight", name)
        self.request(name)

    def install(self, announce: bool = True) -> "StopRequest":
        """announce: log the signal (the conductor does; other ranks would repeat it once each)."""
        self.announce = announce
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def ignore_from_now(self) -> None:
        """This rank's part of the job is over: a stop signal has nothing left to stop. Ignored, it cannot turn
        the exit into death by signal: when rank 0 exits 75 first, srun --kill-on-bad-exit sends SIGTERM to the
        ranks still tearing down (Python restores the default handlers early in its shutdown; SIG_IGN it keeps),
        and one of them killed by it makes srun's exit code 143, not the 75 that requeues the job."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# One per process: the roles of a process read it, the handler sets it.
STOP = StopRequest()
