"""In-process transport: roles are threads of one process and messages go through queues.

TokenBatches are handed over by reference, so the single-process job pays nothing for the seam."""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

from ..errors import JobAborted
from ..tokenize.batch import TokenBatch
from .base import Envelope, Transport

_POLL = 0.05   # how often a blocked recv looks for an abort


class InprocNetwork:
    def __init__(self, size: int):
        self.queues = [queue.SimpleQueue() for _ in range(size)]
        self.aborted = threading.Event()
        self.abort_reason: tuple[str, int] | None = None

    def endpoint(self, rank: int) -> "InprocTransport":
        return InprocTransport(self, rank)


class InprocTransport(Transport):
    name = "inproc"

    def __init__(self, network: InprocNetwork, rank: int):
        self.network, self.rank, self.size = network, rank, len(network.queues)

    def send(self, dest: int, message: Any, urgent: bool = False, prompt: bool = False) -> None:
        self.network.queues[dest].put(Envelope(self.rank, message))

    def send_batch(self, dest: int, batch: TokenBatch, urgent: bool = False) -> None:
        self.network.queues[dest].put(Envelope(self.rank, batch))

    def recv(self, timeout: float | None = None) -> Envelope | None:
        q = self.network.queues[self.rank]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.network.aborted.is_set():
                raise JobAborted()
            wait = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
            try:
                return q.get(timeout=wait) if wait > 0 else q.get_nowait()
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return None

    def abort(self, reason: str, exit_code: int) -> None:
        if self.network.abort_reason is None:
            self.network.abort_reason = (reason, exit_code)
        self.network.aborted.set()
