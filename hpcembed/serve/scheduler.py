"""The server's scheduler: accepted requests' token rows, in two lanes, batched onto the encoder instances.

A request is one TokenBatch (its texts, tokenized). Small ones (at most `interactive_rows` texts and
`interactive_tokens` tokens) take the interactive lane, the rest the bulk lane. The scheduler's thread cuts
engine batches from the lanes' queues, interactive first: up to `interactive_tokens` tokens from as many small
requests as are waiting, else up to `batch_tokens` from the bulk queue, a large request spread over as many
batches as it needs. Bulk batches in flight are held to one per instance, so an interactive batch waits at most
for the bulk batch its instance is running, never behind queued bulk work; finished batches are taken in any
order (InstancePool.finished()). Where instances are reserved for the interactive lane (on a GPU, one more
instance on a high-priority stream: launch/build.py), interactive batches go only to them and bulk batches never
do, so a query waits for no bulk batch at all.

Admission control: a request may carry a latency budget. Its predicted wait is the work ahead of it: each
lane's tokens over that lane's measured rate (tokens per second of an instance's own time on its batches; small
batches run at a lower rate than large ones). Where that is over the budget, the request is refused at once
(Overloaded, HTTP 429) instead of queued. An accepted request is never dropped: close() stops
taking new ones and returns once every accepted one is answered. An engine error fails every request still
pending (Unavailable) and the scheduler takes no more.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..engine.instances import InstancePool
from ..tokenize.batch import TokenBatch

LANES = ("interactive", "bulk")


class Overloaded(Exception):
    """The predicted wait is over the request's latency budget."""

    def __init__(self, predicted: float, budget: float):
        super().__init__(f"predicted wait {predicted * 1e3:.0f} ms is over the latency budget of "
                         f"{budget * 1e3:.0f} ms")
        self.predicted, self.budget = predicted, budget


class Unavailable(Exception):
    """The scheduler takes no requests: it is closing, or the engine failed."""


def admit_or_refuse(unavailable: str | None, budget: float | None, predicted_wait) -> None:
    """Raise Unavailable(`unavailable`) where it is given, else Overloaded where `predicted_wait()` (seconds) is
    over `budget` (None: no budget)."""
    if unavailable:
        raise Unavailable(unavailable)
    if budget is not None:
        predicted = predicted_wait()
        if predicted > budget:
            raise Overloaded(predicted, budget)


@dataclass
class _Request:
    batch: TokenBatch
    lane: str
    future: Future
    embeddings: np.ndarray
    accepted_at: float
    next_row: int = 0                   # rows before this one are in engine batches
    remaining: int = 0                  # rows whose embeddings have not come back


@dataclass
class _Sent:
    lane: str
    tokens: int
    parts: list[tuple[_Request, int, int]] = field(default_factory=list)     # (request, first row, rows)


class Scheduler:
    def __init__(self, encoders: list, dim: int, batch_tokens: int, interactive_tokens: int,
                 interactive_rows: int, rates: dict[str, float], metrics=None, reserved: int = 0):
        """`rates`: each lane's tokens per second to predict waits with until its batches are measured (a
        warm-up's). `reserved`: the last that many of `encoders` are the interactive lane's alone."""
        self.dim, self.batch_tokens = dim, batch_tokens
        self.interactive_tokens, self.interactive_rows = interactive_tokens, interactive_rows
        self.rates = dict(rates)
        self.metrics = metrics
        self._bulk_instances = len(encoders) - reserved
        self._wake = threading.Event()
        self.pool = InstancePool(encoders, on_done=self._wake.set, reserved=reserved)
        self._lock = threading.Lock()
        self._lanes: dict[str, deque[_Request]] = {lane: deque() for lane in LANES}
        self.queued_tokens = {lane: 0 for lane in LANES}
        self._sent: dict[int, tuple[TokenBatch, _Sent]] = {}
        self._accepted = 0                 # requests accepted and not yet answered
        self._closing = False
        self.failed: str | None = None
        self._thread = threading.Thread(target=self._run, name="serve-scheduler", daemon=True)
        self._thread.start()

    # -- the request side (any thread) ---------------------------------------------------------------------------

    def lane_of(self, batch: TokenBatch) -> str:
        small = batch.num_rows <= self.interactive_rows and batch.num_tokens <= self.interactive_tokens
        return "interactive" if small else "bulk"

    def predicted_wait(self, lane: str) -> float:
        """Seconds a request in `lane` would wait before its first batch runs: the work ahead of it, each lane's
        tokens over its rate. For the interactive lane, its own queue and the largest bulk batch running (with
        instances of its own: its queue and its batches running)."""
        in_flight = [sent for _, sent in self._sent.values()]
        if lane == "interactive" and self.pool.reserved:
            running = sum(s.tokens for s in in_flight if s.lane == "interactive")
            return (self.queued_tokens["interactive"] + running) / self.rates["interactive"]
        if lane == "interactive":
            running = max((s.tokens for s in in_flight if s.lane == "bulk"), default=0)
            return (self.queued_tokens["interactive"] / self.rates["interactive"]
                    + running / self.rates["bulk"])
        sharing = ("bulk",) if self.pool.reserved else LANES         # the lanes on the bulk lane's instances
        ahead = {name: self.queued_tokens[name] + sum(s.tokens for s in in_flight if s.lane == name)
                 for name in sharing}
        return sum(ahead[name] / self.rates[name] for name in sharing) / self._bulk_instances

    def admit(self, lane: str, budget: float | None) -> None:
        """Raise Overloaded if a request in `lane` would wait longer than `budget` seconds, Unavailable if none
        is taken; checked before a request is tokenized too, so that refused work costs nothing."""
        with self._lock:
            self._admit(lane, budget)

    def _admit(self, lane: str, budget: float | None) -> None:
        admit_or_refuse(self.failed or ("the server is shutting down" if self._closing else None), budget,
                        lambda: self.predicted_wait(lane))

    def submit(self, batch: TokenBatch, budget: float | None = None, lane: str | None = None) -> Future:
        """Queue a request's rows; its future gets their embeddings [rows, dim] float32, in row order. Raises
        Overloaded (budget in seconds) or Unavailable. `lane`: where the caller knows better than the batch's
        size (a piece of a bulk request, however small, is bulk)."""
        lane = lane or self.lane_of(batch)
        future: Future = Future()
        with self._lock:
            self._admit(lane, budget)
            request = _Request(batch, lane, future, np.empty((batch.num_rows, self.dim), np.float32),
                               time.perf_counter(), remaining=batch.num_rows)
            self._lanes[lane].append(request)
            self.queued_tokens[lane] += batch.num_tokens
            self._accepted += 1
        self._wake.set()
        return future

    def queue_depth(self) -> dict[str, tuple[int, int]]:
        """Per lane: (requests waiting, tokens waiting)."""
        with self._lock:
            return {lane: (len(self._lanes[lane]), self.queued_tokens[lane]) for lane in LANES}

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests; return once every accepted one is answered (or `timeout` passes)."""
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        self.pool.close()

    # -- the scheduler's thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(0.05)
            self._wake.clear()
            try:
                for batch, embeddings, seconds in self.pool.finished():
                    self._deliver(batch, embeddings, seconds)
            except BaseException as exc:  # noqa: BLE001 - an engine failure ends the service, it is reported
                self._fail(f"the encoder failed: {type(exc).__name__}: {exc}")
                return
            with self._lock:
                self._dispatch()
                if self._closing and not self._accepted:
                    return

    def _dispatch(self) -> None:
        while self.pool.capacity > 0:
            if self._lanes["interactive"]:
                lane, budget = "interactive", self.interactive_tokens
            elif (self._lanes["bulk"]
                  and sum(s.lane == "bulk" for _, s in self._sent.values()) < self._bulk_instances):
                lane, budget = "bulk", self.batch_tokens
            else:
                return
            batch, sent = self._cut(lane, budget)
            self._sent[id(batch)] = (batch, sent)
            self.pool.submit(batch, reserved=lane == "interactive")
            if self.metrics is not None:
                self.metrics.batch(lane, batch.num_rows, batch.num_tokens)

    def _cut(self, lane: str, budget: int) -> tuple[TokenBatch, _Sent]:
        """The next engine batch from `lane`'s queue: whole rows, at least one, up to `budget` tokens."""
        queue, sent, parts, tokens = self._lanes[lane], _Sent(lane, 0), [], 0
        while queue:
            request = queue[0]
            lengths = request.batch.lengths[request.next_row:]
            fits = int(np.searchsorted(np.cumsum(lengths), budget - tokens, side="right"))
            take = max(fits, 0 if parts else 1)
            if take == 0:
                break
            first = request.next_row
            part = request.batch.slice(first, first + take)
            parts.append(part)
            sent.parts.append((request, first, take))
            tokens += part.num_tokens
            request.next_row += take
            if request.next_row == request.batch.num_rows:
                queue.popleft()
            if tokens >= budget:
                break
        sent.tokens = tokens
        self.queued_tokens[lane] -= tokens
        return TokenBatch.concat(parts), sent

    def _deliver(self, batch: TokenBatch, embeddings: np.ndarray, seconds: float) -> None:
        with self._lock:
            _, sent = self._sent.pop(id(batch))
        if seconds > 0:         # the lane's rate, smoothed over its last few batches
            self.rates[sent.lane] = 0.7 * self.rates[sent.lane] + 0.3 * sent.tokens / seconds
        row = 0
        for request, first, count in sent.parts:
            request.embeddings[first: first + count] = embeddings[row: row + count]
            row += count
            request.remaining -= count
            if request.remaining == 0:
                with self._lock:
                    self._accepted -= 1
                if self.metrics is not None:
                    self.metrics.answered(request.lane, time.perf_counter() - request.accepted_at)
                request.future.set_result(request.embeddings)

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.failed = reason
            pending = [r for lane in LANES for r in self._lanes[lane]]
            pending += [part[0] for _, sent in self._sent.values() for part in sent.parts]
            for lane in LANES:
                self._lanes[lane].clear()
            self._sent.clear()
            self._accepted = 0
        for request in {id(r): r for r in pending}.values():
            if not request.future.done():
                request.future.set_exception(Unavailable(reason))
