"""Tokenizer role: asks the conductor for work units, reads and validates their rows, tokenizes them, and sends
token batches straight to gpu ranks, never through the conductor.

Flow control: a gpu rank grants credits; one credit lets one batch be in flight to it, so memory stays bounded
whatever the speed difference. Routing: each batch goes to the gpu with the most free credit, staying with the
current gpu on ties so a unit's rows land in few shards.

Graceful stop: a Drain from the conductor makes this rank abandon the unit it is reading at the next chunk (its
rows already sent are discarded by the gpu ranks, and the unit is redone by the next run). The rank then still
settles its credits and waits for the conductor's Release, the last message it gets.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from ..errors import InputError
from ..io.ids import IdRegistry, SoloAlltoall, find_cross_duplicates
from ..io.readers import Columns, RowChunk, read_unit
from ..io.sources import WorkUnit
from ..io.tokens import TokenShardWriter, token_shard_name
from ..io.writer import OutputDir
from ..signals import STOP
from ..tokenize.batch import TokenBatch
from ..transport.base import Transport
from .common import RoleMap
from .messages import (AssignUnit, Credit, Drain, DuplicateRows, NoMoreUnits, PartWritten, RankReport, Release,
                       RequestUnit,
                       StopRequested, UnitEnd, UnitRead)


log = logging.getLogger("hpcembed")


class _Abandoned(Exception):
    """The unit being read is dropped (graceful stop)."""


class TokenizerRole:
    check_ids = True       # ids are checked for repeats here (TokenWriterRole leaves that to the embedding job)

    def __init__(self, transport: Transport, roles: RoleMap, backend, columns: Columns, chunk_rows: int,
                 skip_invalid: bool, peers=None, committed_shards: list[tuple[int, str, int]] = ()):
        """`peers`: an all-to-all over the tokenizer ranks (see io.ids), or None when this is the only one.
        `committed_shards`: (unit, path, position) of this rank's share of the shards an earlier run of the job
        committed; their ids join the duplicate check, so a resumed job still has each id once."""
        self.t, self.roles, self.backend, self.columns = transport, roles, backend, columns
        self.chunk_rows, self.skip_invalid = chunk_rows, skip_invalid
        self.ids = IdRegistry()
        self.peers = peers if peers is not None else SoloAlltoall()
        self.committed_shards = list(committed_shards)
        self.draining = self.released = self._stop_forwarded = False
        self.gpus = roles.gpus_of(transport.rank)
        self.credits = {g: 0 for g in self.gpus}
        # Every gpu rank sends one initial grant, then one Credit per batch it consumed: so this rank knows exactly
        # how many Credit messages it will get, and waits for all of them before it leaves (an MPI message
        # still unreceived at MPI_Finalize kills the whole world under MPICH).
        self.credit_messages = {g: 0 for g in self.gpus}
        self.batches_sent = {g: 0 for g in self.gpus}
        self.assigned: deque[WorkUnit] = deque()
        self.no_more = False
        self.rows = self.tokens = 0
        self.busy = 0.0

    def _handle(self, message) -> None:
        if isinstance(message, Credit):
            self.credits[self._last_source] += message.count
            self.credit_messages[self._last_source] += 1
        elif isinstance(message, AssignUnit):
            self.assigned.append(message.unit)
        elif isinstance(message, NoMoreUnits):
            self.no_more = True
        elif isinstance(message, Drain):
            self.draining = self.no_more = True
            self.assigned.clear()
        elif isinstance(message, Release):
            self.released = True
        else:
            raise RuntimeError(f"tokenizer got unexpected {type(message).__name__}")

    def _receive(self, timeout: float | None) -> bool:
        env = self.t.recv(timeout)
        if env is None:
            return False
        self._last_source = env.source
        self._handle(env.message)
        return True

    def run(self) -> None:
        self.started_at = time.time()       # backend loaded: from here the rank asks for work
        self.t.send(self.roles.conductor, RequestUnit())
        while True:
            while not self.assigned and not self.no_more:
                self._receive(None)
            if not self.assigned:
                break
            unit = self.assigned.popleft()
            # Ask for the next unit now, so it is here when this one is done (hides the round trip).
            self.t.send(self.roles.conductor, RequestUnit())
            self._process(unit)
        # Collective over the tokenizer ranks: if any abandoned a unit, the job is stopping and nobody checks.
        if self.check_ids and not self.peers.any(self.draining) and (self.peers.size > 1 or self.committed_shards):
            start = time.perf_counter()
            for unit, path, position in self.committed_shards:
                self.ids.add_committed(pq.read_table(path, columns=["id"]).column("id").to_pylist(), unit, position)
            dups = find_cross_duplicates(self.ids, self.peers)
            self.busy += time.perf_counter() - start
            if dups:
                self.t.send(self.roles.conductor, DuplicateRows(
                    [(int(d["unit"]), int(d["file"]), int(d["row"]), int(f["unit"]), int(f["file"]), int(f["row"]),
                      d["digest"].tobytes()) for d, f in dups]))
        owed = lambda g: 1 + self.batches_sent[g]  # noqa: E731 - the initial grant, then one per batch
        while any(self.credit_messages[g] < owed(g) for g in self.gpus):
            self._receive(None)
        self.t.send(self.roles.conductor, RankReport(self.t.rank, "tokenizer", self.roles.host_of(self.t.rank),
                                                     self.rows, self.tokens, self.busy,
                                                     {**self.backend.describe(), "started_at": self.started_at,
                                                      "batches_sent": {str(g): n for g, n in self.batches_sent.items()}}))
        while not self.released:
            self._receive(None)

    def _pick_gpu(self, previous: int | None) -> int:
        while True:
            while self._receive(0):     # take every credit already waiting
                pass
            best = max(self.credits, key=self.credits.__getitem__)
            if self.credits[best] > 0:
                if previous is not None and self.credits.get(previous, 0) >= self.credits[best]:
                    return previous
                return best
            self._receive(None)

    def _check_stop(self) -> None:
        """Between chunks: take any Drain that has arrived, and pass on a signal that reached only this rank."""
        while self._receive(0):
            pass
        if STOP.requested and not self._stop_forwarded:
            self._stop_forwarded = True
            self.t.send(self.roles.conductor, StopRequested(STOP.signal_name))
        if self.draining:
            raise _Abandoned()

    def _process(self, unit: WorkUnit) -> None:
        progress = _UnitProgress()
        try:
            for chunk in read_unit(unit, self.columns, self.chunk_rows):
                self._check_stop()
                self._send_chunk(unit, chunk, progress)
        except _Abandoned:
            log.debug("rank %d: abandoned unit %d (graceful stop)", self.t.rank, unit.unit)
            self._unit_abandoned(progress)
            return
        except InputError as exc:
            # The file itself is bad (corrupt, missing column): the rows not yet sent are rejected together.
            if not self.skip_invalid:
                self._unit_abandoned(progress)
                raise
            record = exc.as_reject()
            record["rows"] = [unit.row_start, unit.row_stop]
            progress.rejects.append(record)
            progress.rejected = unit.rows - sum(progress.sent.values())
        self.tokens += progress.tokens
        self._unit_done(unit, progress)
        self.t.send(self.roles.conductor, UnitRead(unit.unit, progress.sent, progress.tokens, progress.rejects,
                                                   progress.rejected))

    def _send_chunk(self, unit: WorkUnit, chunk: RowChunk, progress: "_UnitProgress") -> None:
        start = time.perf_counter()
        bad: list[InputError] = list(chunk.rejects)
        dups = self.ids.add(unit.file.path, chunk.rows, chunk.ids, unit.file.index, unit.unit) \
            if self.check_ids else []
        if dups:
            bad.extend(err for _, err in dups)
            chunk = chunk.take(np.setdiff1d(np.arange(len(chunk.ids)), [pos for pos, _ in dups]))
        if bad:
            if not self.skip_invalid:
                raise min(bad, key=lambda e: e.row if e.row is not None else -1)
            progress.rejects.extend(e.as_reject() for e in bad)
            progress.rejected += len(bad)
        if not chunk.ids:
            return
        if chunk.tokens is not None:        # a token directory: tokenized by an earlier job
            batch = TokenBatch.from_token_lists(chunk.tokens, chunk.ids, chunk.rows, unit.unit)
        else:
            batch = TokenBatch.build(self.backend.encode(chunk.texts), chunk.ids, chunk.rows, unit.unit)
        self.busy += time.perf_counter() - start
        self._deliver(unit, batch, progress)
        progress.tokens += batch.num_tokens
        self.rows += batch.num_rows

    def _deliver(self, unit: WorkUnit, batch: TokenBatch, progress: "_UnitProgress") -> None:
        """Send a batch to the gpu rank with the most free credit."""
        dest = self._pick_gpu(progress.previous)
        self.t.send_batch(dest, batch)
        self.credits[dest] -= 1
        self.batches_sent[dest] += 1
        progress.previous = dest
        progress.sent[dest] = progress.sent.get(dest, 0) + batch.num_rows

    def _unit_done(self, unit: WorkUnit, progress: "_UnitProgress") -> None:
        for gpu, rows in progress.sent.items():
            self.t.send(gpu, UnitEnd(unit.unit, rows))

    def _unit_abandoned(self, progress: "_UnitProgress") -> None:
        """Rows already sent are discarded by the gpu ranks when the conductor stops them."""


class TokenWriterRole(TokenizerRole):
    """The tokenizer role of `hpcembed tokenize`: the same loop, but each unit's token batches go to this rank's
    own token shard (io/tokens.py) instead of a gpu rank, and the rank reports the shard to the conductor as a
    gpu rank reports an embedding shard. Repeated ids are not checked here: the embedding job reads every id of
    a token directory and checks them all, as it does for text input."""

    check_ids = False

    def __init__(self, transport: Transport, roles: RoleMap, backend, columns: Columns, chunk_rows: int,
                 skip_invalid: bool, output: OutputDir):
        super().__init__(transport, roles, backend, columns, chunk_rows, skip_invalid)
        self.output = output

    def _deliver(self, unit: WorkUnit, batch: TokenBatch, progress: "_UnitProgress") -> None:
        start = time.perf_counter()
        if progress.shard is None:
            progress.shard = TokenShardWriter(self.output.path, token_shard_name(unit.unit, self.t.rank))
        progress.shard.write(batch.to_arrow())
        progress.sent[self.t.rank] = progress.sent.get(self.t.rank, 0) + batch.num_rows
        self.busy += time.perf_counter() - start

    def _unit_done(self, unit: WorkUnit, progress: "_UnitProgress") -> None:
        if progress.shard is not None:
            progress.shard.close()
            self.t.send(self.roles.conductor, PartWritten(unit.unit, progress.shard.final.name,
                                                          progress.shard.rows, progress.tokens))

    def _unit_abandoned(self, progress: "_UnitProgress") -> None:
        if progress.shard is not None:
            progress.shard.discard()


@dataclass
class _UnitProgress:
    sent: dict[int, int] = field(default_factory=dict)     # gpu rank -> rows sent there
    tokens: int = 0
    rejects: list[dict] = field(default_factory=list)
    rejected: int = 0
    previous: int | None = None                            # gpu the last batch went to
    shard: TokenShardWriter | None = None                  # TokenWriterRole: this unit's token shard
