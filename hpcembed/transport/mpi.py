"""MPI transport: control messages are small pickles (tag CONTROL); a TokenBatch is one MPI buffer message
(tag BATCH) holding a fixed header of sizes followed by its arrays, never pickled.

One thread per rank talks to MPI (several MPI+UCX builds misbehave with many threads). Receiving polls with
Iprobe, spinning for 1 ms and then sleeping 0.5 ms between probes rather than blocking in MPI: a prompt reply
is seen within microseconds, idle ranks do not hold a core when ranks outnumber cores, and an abort is never
stuck behind a blocking call. Measured with bench/mpi_overhead.py: a batch-credit round trip whose reply misses
the spin window costs ~1.2 ms one way (time.sleep(0.0005) takes ~0.58 ms here); with a 1 ms spin 16-row and
1024-row batches take 8 and 35 µs (bench/results/mpi_overhead-cpu.json). A 0.2-0.5 ms spin still missed often.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any

import numpy as np

from ..tokenize.batch import TokenBatch
from .base import Envelope, Transport

CONTROL, BATCH = 11, 12
URGENT_CONTROL, URGENT_BATCH = 13, 14     # probed first by a rank that sets urgent_first
PROMPT_CONTROL = 15                       # taken by recv_prompt, ahead of batches
_SPIN_SECONDS = 0.001     # poll without sleeping this long first (see the module docstring)
_IDLE_SLEEP = 0.0005
_ABORT_FORWARD_SECONDS = 0.5
_REAP_AT_LEAST = 64         # control sends out before the first look at which have completed


class MpiTransport(Transport):
    name = "mpi"

    def __init__(self, comm=None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm or MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._status = MPI.Status()
        self._unfinished: deque = deque()   # control sends not yet complete, oldest first
        self._reap_at = _REAP_AT_LEAST

    def send(self, dest: int, message: Any, urgent: bool = False, prompt: bool = False) -> None:
        # Never blocking. On the H200 box's Open MPI 4.1.6 with mpi4py 4.1.2, a blocking send of a small pickle
        # lasted until the receiver next polled (4.1 ms behind a rank that polls every 5 ms, an isend 4.3 µs:
        # bench/send_wait.py), so a conductor replying to tokenizer ranks busy in their tokenizer spent ~2 ms a
        # message waiting on them (bench/notes/scale_out.md, fan-in). MPI keeps the order of messages between two
        # ranks either way.
        if prompt and not urgent:
            # Blocking: the receiver takes prompt messages at every turn of its loop, so this waits a moment. An
            # isend of a claim (16 KB, above the shared-memory eager limit) moves by rendezvous, completing only
            # while the sender is in MPI; with claims isent and taken at once, the encoder rank spent most of a
            # dedup job in its receive and the GPU was 28% busy (bench/notes/dedup.md, sixth run).
            self.comm.send(message, dest=dest, tag=PROMPT_CONTROL)
            return
        self._unfinished.append(self.comm.isend(message, dest=dest, tag=URGENT_CONTROL if urgent else CONTROL))
        if len(self._unfinished) >= self._reap_at:
            self._reap()

    def _reap(self) -> None:
        """Drop the sends that have completed; how many may wait before the next look doubles with what is
        still out, so a rank with thousands of peers does not test them all at every send."""
        if self._unfinished:
            self._unfinished = deque(r for r in self._unfinished if not r.Test())
        self._reap_at = max(_REAP_AT_LEAST, 2 * len(self._unfinished))

    def _progress(self) -> None:
        """Test the oldest send still out at every look for messages: a send past the eager limit is only sure to
        move while its sender calls into MPI, and testing one request runs the progress engine for all."""
        while self._unfinished and self._unfinished[0].Test():
            self._unfinished.popleft()

    def flush(self) -> None:
        """Wait until every control message this rank sent has completed."""
        while self._unfinished:
            self._reap()
            if self._unfinished:
                time.sleep(_IDLE_SLEEP)

    def send_batch(self, dest: int, batch: TokenBatch, urgent: bool = False) -> None:
        buf = batch.to_wire()
        # Blocking. A batch is far above the eager limit, so it moves by rendezvous, and without a single-copy
        # path (CMA is often off in containers) that needs the sender inside MPI while the receiver copies. An
        # Isend from a tokenizer that then spends ~100 ms in its tokenizer left the encoder rank stuck in Recv for
        # that long: on the H100 box the encoder rank's loop spent 43 of 63 s receiving, and the GPU was 38% busy.
        # The encoder rank polls often, so a blocking send waits only for its next probe.
        self.comm.Send([buf, self.MPI.BYTE], dest=dest, tag=URGENT_BATCH if urgent else BATCH)

    def recv(self, timeout: float | None = None) -> Envelope | None:
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + _SPIN_SECONDS
        status = self._status
        while True:
            self._progress()
            data = self._poll_data()
            if data is not None:
                return data
            if self.urgent_first and (self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=URGENT_BATCH, status=status)
                                      or self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=URGENT_CONTROL,
                                                          status=status)):
                return self._take(status)
            if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.MPI.ANY_TAG, status=status):
                return self._take(status)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            if now >= spin_until:
                time.sleep(_IDLE_SLEEP)

    def recv_prompt(self) -> Envelope | None:
        self._progress()
        if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=PROMPT_CONTROL, status=self._status):
            return self._take(self._status)
        return None

    def _take(self, status) -> Envelope:
        """Receive the message `status` probed."""
        source, tag = status.Get_source(), status.Get_tag()
        if tag in (BATCH, URGENT_BATCH):
            buf = np.empty(status.Get_count(self.MPI.BYTE), dtype=np.uint8)
            self.comm.Recv([buf, self.MPI.BYTE], source=source, tag=tag)
            return Envelope(source, TokenBatch.from_wire(buf))
        return Envelope(source, self.comm.recv(source=source, tag=tag))

    def _poll_data(self) -> Envelope | None:
        """A token batch that arrived outside MPI (the UCX transport overrides this); here batches come as MPI
        messages, taken by the probe in recv."""
        return None

    def abort(self, reason: str, exit_code: int) -> None:
        sys.stderr.flush()
        sys.stdout.flush()
        # MPI_Abort tears down the launcher's forwarding of each rank's output, and a line written just before it
        # can be lost on the way (the conductor's error naming the bad file was, once, in a CI run of
        # tests/test_resume.py): give the launcher a moment to read it.
        time.sleep(_ABORT_FORWARD_SECONDS)
        self.comm.Abort(exit_code)


class MpiAlltoall:
    """All-to-all of numpy arrays (one per peer, any dtype shared by all) over a communicator: sizes first,
    then one Alltoallv of the raw bytes."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm, self.size = MPI, comm, comm.Get_size()

    def __call__(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        dtype = parts[0].dtype
        send = np.concatenate([np.ascontiguousarray(p).view(np.uint8).reshape(-1) for p in parts])
        send_counts = np.array([p.nbytes for p in parts], dtype=np.int64)
        recv_counts = np.empty_like(send_counts)
        self.comm.Alltoall(send_counts, recv_counts)
        recv = np.empty(int(recv_counts.sum()), dtype=np.uint8)
        send_displs = np.concatenate(([0], np.cumsum(send_counts)[:-1]))
        recv_displs = np.concatenate(([0], np.cumsum(recv_counts)[:-1]))
        self.comm.Alltoallv([send, send_counts, send_displs, self.MPI.BYTE],
                            [recv, recv_counts, recv_displs, self.MPI.BYTE])
        return [recv[d: d + c].view(dtype) for d, c in zip(recv_displs, recv_counts)]

    def any(self, flag: bool) -> bool:
        """True on every peer when any peer passes True (collective)."""
        return bool(self.comm.allreduce(bool(flag), op=self.MPI.LOR))
