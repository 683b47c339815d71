"""GPU role: receives token batches from tokenizers, re-batches them by token budget (longest-first within a
bounded window), encodes them, and writes its own output shards: one shard per (work unit, gpu rank), written
as soon as every row of that unit sent here has been embedded.

Shards are written by one background thread, so the role loop keeps feeding the GPU while a shard is encoded,
written and fsynced (pyarrow and fsync release the GIL); PartWritten goes out once the file is in place.

On a machine without CUDA the same role runs the encoder on CPU; that is how CI exercises it.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..batching import TokenBudgetBatcher
from ..engine.instances import InstancePool
from ..io.writer import OutputDir, shard_name
from ..tokenize.batch import TokenBatch
from ..transport.base import Transport
from .common import RoleMap
from .messages import Credit, DropIds, PartRewritten, PartWritten, RankReport, Stop, UnitEnd


@dataclass
class _UnitPart:
    """The rows of one unit that were sent to this rank, as they come back from the encoder."""

    expected: int | None = None
    received: int = 0
    tokens: int = 0
    rows: list[np.ndarray] = field(default_factory=list)
    ids: list[pa.Array] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)


class GpuRole:
    def __init__(self, transport: Transport, roles: RoleMap, instances: InstancePool, output: OutputDir,
                 max_batch_tokens: int, window_batches: int, credits: int):
        self.t, self.roles, self.pool, self.output = transport, roles, instances, output
        self.credits = credits
        cost = instances.encoders[0].batch_cost
        self.batcher = TokenBudgetBatcher(max_batch_tokens, max_batch_tokens * window_batches, cost)
        self.parts: dict[int, _UnitPart] = {}
        # Credits go back as the encoder consumes tokens, not when a batch lands in the window: that way a
        # tokenizer's free credit measures this rank's speed, and routing by free credit balances the load.
        self._owed: deque[tuple[int, int]] = deque()     # (tokenizer, tokens) in arrival order
        self._consumed = 0
        self.stopping = self.drained = False
        self.rows = self.tokens = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._writes: deque[tuple[Future, PartWritten]] = deque()
        # Where the role loop's time goes (seconds), reported with the rank: if the GPU idles, this says why.
        self.loop_time = {"receive": 0.0, "batch": 0.0, "store": 0.0, "wait": 0.0}

    def run(self) -> None:
        ready_at = time.time()          # encoders built (and compiled): from here the rank can take work
        for tokenizer in self.roles.tokenizers_of(self.t.rank):
            self.t.send(tokenizer, Credit(self.credits))
        try:
            self._loop()
        finally:
            self.pool.close()
            self._writer.shutdown(wait=True)
        if self.parts and not self.drained:
            raise RuntimeError(f"stopped with units {sorted(self.parts)} incomplete")
        # A graceful stop: the units tokenizers abandoned are not written; the next run redoes them.
        self.parts.clear()
        self.t.send(self.roles.conductor, RankReport(self.t.rank, "gpu", self.roles.host_of(self.t.rank),
                                                     self.rows, self.tokens, self.pool.busy_seconds,
                                                     {**self.pool.describe(), "ready_at": ready_at,
                                                      "stage_busy_seconds": round(self.pool.stage_busy_seconds, 3),
                                                      "loop_seconds": {k: round(v, 3)
                                                                       for k, v in self.loop_time.items()}}))

    def _loop(self) -> None:
        clock, spent = time.perf_counter, self.loop_time
        while True:
            # Take in what has arrived; block only when there is nothing to encode, in flight or being written.
            t0 = clock()
            while not self.batcher.full:
                idle = not self.batcher.rows and not self.pool.in_flight and not self.stopping and not self._writes
                env = self.t.recv(None if idle else 0)
                if env is None:
                    break
                self._handle(env.source, env.message)
            t1 = clock()
            while self.batcher.rows and self.pool.capacity > 0:
                batch = self.batcher.pop()
                self.pool.submit(batch)
                self._return_credits(batch.num_tokens)
            t2 = clock()
            # Wait a little for the oldest batch only when there is nothing else to do.
            waiting_only = not self.batcher.rows or self.pool.capacity == 0
            finished = self.pool.completed(wait=0.002 if waiting_only else 0.0)
            t3 = clock()
            for batch, embeddings in finished:
                self._store(batch, embeddings)
            self._report_writes(wait=self.stopping and not self.batcher.rows and not self.pool.in_flight)
            t4 = clock()
            spent["receive"] += t1 - t0
            spent["batch"] += t2 - t1
            spent["wait"] += t3 - t2
            spent["store"] += t4 - t3
            if self.stopping and not self.batcher.rows and not self.pool.in_flight and not self._writes:
                break

    def _report_writes(self, wait: bool) -> None:
        """PartWritten for every shard whose write has finished, in order (a failed write raises here)."""
        while self._writes and (wait or self._writes[0][0].done()):
            future, message = self._writes.popleft()
            future.result()
            self.t.send(self.roles.conductor, message)

    def _handle(self, source: int, message) -> None:
        if isinstance(message, TokenBatch):
            self.batcher.add(message)
            self._owed.append((source, message.num_tokens))
        elif isinstance(message, UnitEnd):
            self.parts.setdefault(message.unit, _UnitPart()).expected = message.rows
            self._flush_if_complete(message.unit)
        elif isinstance(message, DropIds):
            removed = self.output.drop_ids(message.shard, set(message.digests))
            self.t.send(self.roles.conductor, PartRewritten(message.unit, message.shard, removed))
        elif isinstance(message, Stop):
            self.stopping, self.drained = True, message.drain
        else:
            raise RuntimeError(f"gpu rank got unexpected {type(message).__name__}")

    def _return_credits(self, tokens: int) -> None:
        self._consumed += tokens
        while self._owed and self._consumed >= self._owed[0][1]:
            source, owed = self._owed.popleft()
            self._consumed -= owed
            self.t.send(source, Credit(1))
        if not self.batcher.rows:           # everything waiting has left: settle rounding in the count
            while self._owed:
                self.t.send(self._owed.popleft()[0], Credit(1))
            self._consumed = 0

    def _store(self, batch: TokenBatch, embeddings: np.ndarray) -> None:
        ids = batch.id_array()
        lengths = batch.lengths
        for unit in np.unique(batch.units):
            sel = np.flatnonzero(batch.units == unit)
            part = self.parts.setdefault(int(unit), _UnitPart())
            part.rows.append(batch.rows[sel])
            part.ids.append(ids.take(pa.array(sel)))
            part.embeddings.append(embeddings[sel])
            part.received += len(sel)
            part.tokens += int(lengths[sel].sum())
            self._flush_if_complete(int(unit))
        self.rows += batch.num_rows
        self.tokens += batch.num_tokens

    def _flush_if_complete(self, unit: int) -> None:
        part = self.parts[unit]
        if part.expected is None or part.received < part.expected:
            return
        rows = np.concatenate(part.rows)
        order = np.argsort(rows, kind="stable")       # input order within the shard
        ids = pa.concat_arrays(part.ids).take(pa.array(order))
        name = shard_name(unit, self.t.rank)
        future = self._writer.submit(self.output.write_shard, name, ids, np.concatenate(part.embeddings)[order])
        del self.parts[unit]
        self._writes.append((future, PartWritten(unit, name, part.received, part.tokens)))
