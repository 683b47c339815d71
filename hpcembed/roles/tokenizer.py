"""The tokenizer rank's real-time driver: asks for work units, reads and validates their rows, tokenizes them, and
sends token batches straight to encoder ranks, never through the conductor. Which unit, which encoder rank and
what to report are the TokenizerCore's (protocol/tokenizer.py); reading, tokenizing, the id checks and the
transport are here.

Graceful stop: a Drain from the conductor makes this rank abandon the unit it is reading at the next chunk (its
rows already sent are discarded by the encoder ranks, and the unit is redone by the next run). The rank then still
settles its credits and waits for the conductor's Release, the last message it gets.

Where the batches go is the sink's (roles/sinks.py): encoder ranks in an embedding job, this rank's own token
shards in a tokenize job (`hpcembed tokenize`).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..batching import BatchAssembler
from ..errors import InputError
from ..io.digest import row_digests, text_digests
from ..io.ids import IdRegistry, SoloAlltoall, find_cross_duplicates
from ..io.readers import Columns, RowChunk, clip_rows, read_unit
from ..io.sources import WorkUnit
from ..io.writer import shard_ids
from ..manifest import TokenizerStats
from ..protocol.messages import Claimed, Credit, DuplicateRows, References, StopRequested
from ..protocol.tokenizer import TokenizerCore, UnitProgress
from ..signals import STOP
from ..tokenize.batch import TokenBatch
from ..tokenize.chunk import Chunker, tokenize_chunk
from ..transport.base import Transport
from .common import deliver
from .dedup import Claims, PendingChunk, owner_index

log = logging.getLogger("hpcembed")


class _Abandoned(Exception):
    """The unit being read is dropped (graceful stop)."""


class TokenizerRank:
    def __init__(self, transport: Transport, core: TokenizerCore, backend, columns: Columns, chunk_rows: int,
                 skip_invalid: bool, sink, peers=None, committed_shards: list[tuple[int, str, int]] = (),
                 batch_tokens: int = 0, digest_seed: int | None = None, dedup: Claims | None = None):
        """`sink`: EncoderSink or ShardSink. `peers`: an all-to-all over the tokenizer ranks (see io.ids), or None
        when this is the only one. `committed_shards`: (unit, path, position) of this rank's share of the shards
        an earlier run of the job committed; their ids join the duplicate check, so a resumed job still has each
        id once. `batch_tokens`: the encoder's token budget, which the batches sent are cut to (0: a batch per
        chunk of `chunk_rows` rows). `digest_seed`: each row's content digest goes with it (io/digest.py). `dedup`:
        rows are claimed from their digests' owners before tokenizing, and repeats only referenced (dedup.py)."""
        self.transport, self.core, self.backend, self.columns = transport, core, backend, columns
        self.chunk_rows, self.skip_invalid, self.sink = chunk_rows, skip_invalid, sink
        self.assembler = BatchAssembler(batch_tokens)
        self.digest_seed = digest_seed
        self.dedup = dedup
        self.owner_assemblers = {r: BatchAssembler(batch_tokens) for r in (dedup.owners if dedup else [])}
        self.first_formed_at = self.first_sent_at = 0.0     # epoch seconds (TokenizerStats)
        self.read_ahead_rows = 0                        # (TokenizerStats)
        self.granted_at = self.first_answer_at = 0.0    # epoch seconds (TokenizerStats)
        self._pending: PendingChunk | None = None       # the chunk whose claims are out (one ahead of tokenizing)
        # --dedup's read-ahead: (unit, chunk, its tokens) read and tokenized before any owner had granted credit;
        # None once they are sent (it happens only at the job's start).
        self._held: list[tuple[WorkUnit, RowChunk, TokenBatch]] | None = [] if dedup is not None else None
        self.ids = IdRegistry()
        self.peers = peers if peers is not None else SoloAlltoall()
        self.committed_shards = list(committed_shards)
        self._stop_forwarded = False
        self.busy = 0.0
        # Where the time outside `busy` goes: waiting for a unit, for an encoder rank's credit, inside a batch's
        # send (a blocking send lasts until the encoder rank takes the batch in), reading input, and (--dedup)
        # waiting for owners to take claims in and answer them; after the last unit, the id check across ranks
        # and the wait for credits to settle (finish); and what none of these count (untracked: the rank's own
        # bookkeeping and control messages between chunks, and any time the OS gave its core to another process).
        self.other = {"unit_wait": 0.0, "credit_wait": 0.0, "send": 0.0, "read": 0.0, "claim_wait": 0.0,
                      "finish": 0.0, "untracked": 0.0}

    def receive(self, timeout: float | None) -> bool:
        envelope = self.transport.recv(timeout)
        if envelope is None:
            return False
        if isinstance(envelope.message, Claimed):
            self.first_answer_at = self.first_answer_at or time.time()
            self.dedup.answered(envelope.source, envelope.message)
            return True
        if isinstance(envelope.message, Credit):
            self.granted_at = self.granted_at or time.time()
        deliver(self.transport, self.core.handle(envelope.source, envelope.message))
        return True

    def run(self) -> None:
        started_at = time.time()        # backend loaded: from here the rank asks for work
        lifetime = time.perf_counter()
        core = self.core
        deliver(self.transport, core.start())
        while True:
            waiting = time.perf_counter()
            while core.waiting_for_unit:
                self.receive(None)
            self.other["unit_wait"] += time.perf_counter() - waiting
            unit, sends = core.next_unit()
            if unit is None:
                break
            deliver(self.transport, sends)
            self._process(unit)
        finishing, busy = time.perf_counter(), self.busy
        self._check_ids_across_ranks()
        while not core.credits_settled or (self.dedup is not None and self.dedup.outstanding):
            self.receive(None)
        now = time.perf_counter()
        self.other["finish"] = now - finishing - (self.busy - busy)
        self.other["untracked"] = now - lifetime - self.busy - sum(self.other.values())
        rank = self.transport.rank
        stats = TokenizerStats(rank, "tokenizer", core.roles.host_of(rank), core.rows, core.tokens, self.busy,
                               started_at=started_at, finished_at=time.time(), first_sent_at=self.first_sent_at,
                               first_formed_at=self.first_formed_at, read_ahead_rows=self.read_ahead_rows,
                               granted_at=self.granted_at, first_answer_at=self.first_answer_at,
                               other_seconds=dict(self.other),
                               **self.backend.describe())
        deliver(self.transport, core.report(stats))
        while not core.released:
            self.receive(None)

    def _check_ids_across_ranks(self) -> None:
        """Collective over the tokenizer ranks: if any abandoned a unit, the job is stopping and nobody checks."""
        if not self.sink.checks_ids or self.peers.any(self.core.draining):
            return
        if self.peers.size == 1 and not self.committed_shards:
            return
        start = time.perf_counter()
        for unit, path, position in self.committed_shards:
            self.ids.add_committed(shard_ids(path), unit, position)
        dups = find_cross_duplicates(self.ids, self.peers)
        self.busy += time.perf_counter() - start
        if dups:
            self.transport.send(self.core.roles.conductor, DuplicateRows(
                [(int(d["unit"]), int(d["file"]), int(d["row"]), int(f["unit"]), int(f["file"]), int(f["row"]),
                  d["digest"].tobytes()) for d, f in dups]))

    def _check_stop(self) -> None:
        """Between chunks: take any Drain that has arrived, and pass on a signal that reached only this rank."""
        while self.receive(0):
            pass
        if STOP.requested and not self._stop_forwarded:
            self._stop_forwarded = True
            self.transport.send(self.core.roles.conductor, StopRequested(STOP.signal_name))
        if self.core.draining:
            raise _Abandoned()

    def _process(self, unit: WorkUnit) -> None:
        """Read, tokenize and send the unit; it may be split while it is read (tail stealing): its rows from the
        cut on are another rank's, and what this rank reports is the unit as the core holds it at the end."""
        core = self.core
        progress = UnitProgress()
        try:
            chunks = read_unit(unit, self.columns, self.chunk_rows)
            while True:
                reading = time.perf_counter()
                chunk = next(chunks, None)
                self.other["read"] += time.perf_counter() - reading
                if chunk is None:
                    core.position = core.reading.row_stop
                    break
                chunk, past = clip_rows(chunk, unit.row_start, core.reading.row_stop)
                if chunk is None:
                    if past:
                        break
                    continue
                core.position = chunk.span[1] + 1
                self._check_stop()          # a SplitUnit taken here cuts after the rows in hand
                self._send_chunk(unit, chunk, progress)
                if past:
                    break
            unit = core.reading
            self._send_rest(unit, progress)
        except _Abandoned:
            log.debug("rank %d: abandoned unit %d (graceful stop)", self.transport.rank, unit.unit)
            core.reading = None
            self._clear()
            self.sink.unit_abandoned(unit)
            return
        except InputError as exc:
            unit = core.reading
            # The file itself is bad (corrupt, missing column): the rows not yet read are rejected together.
            if not self.skip_invalid:
                self._clear()
                self.sink.unit_abandoned(unit)
                raise
            self._send_rest(unit, progress)
            record = exc.as_reject()
            record["rows"] = [unit.row_start, unit.row_stop]
            progress.rejects.append(record)
            progress.rejected = unit.rows - sum(progress.sent.values())
        deliver(self.transport, self.sink.unit_done(self, unit, progress) + self.core.unit_read(unit, progress))

    def _send_chunk(self, unit: WorkUnit, chunk: RowChunk, progress: UnitProgress) -> None:
        start = time.perf_counter()
        bad: list[InputError] = list(chunk.rejects)
        dups = self.ids.add(unit.file.path, chunk.rows, chunk.ids, unit.file.index, unit.unit) \
            if self.sink.checks_ids else []
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
        if self.dedup is not None:
            self.busy += time.perf_counter() - start
            self._claim(unit, chunk, progress)          # counts its own busy time
            return
        batch = tokenize_chunk(self.backend, chunk, unit.unit)
        self._digest(chunk, batch)
        full = self.assembler.add(batch)
        self.busy += time.perf_counter() - start
        for batch in full:
            self.sink.put(self, unit, batch, progress)

    def _digest(self, chunk: RowChunk, batch: TokenBatch) -> None:
        """Text rows are digested by their text (before tokenizing, so that --dedup can skip it), a token
        directory's rows and a chunked text's windows by their token ids."""
        if self.digest_seed is None:
            return
        if chunk.texts and not isinstance(self.backend, Chunker):
            batch.digests = text_digests(chunk.texts, self.digest_seed)
        else:
            batch.digests = row_digests(batch.token_ids, batch.offsets, self.digest_seed)

    def _claim(self, unit: WorkUnit, chunk: RowChunk, progress: UnitProgress) -> None:
        """Until an owner has granted credit (they are still building their models and can answer no claim),
        chunks are tokenized and held, up to the read-ahead the batches of a job without --dedup have
        (TokenizerCore.holds); then they go without claims (_release). A chunk of a token directory or of a
        chunked job is claimed at once."""
        held = self._held
        if held is not None and chunk.tokens is None and not isinstance(self.backend, Chunker):
            budget = self.assembler.batch_tokens
            held_batches = sum(tokens.num_tokens for _, _, tokens in held) // budget \
                if budget else len(held)         # 0: a batch a chunk
            if self.core.holds(held_batches):
                start = time.perf_counter()
                held.append((unit, chunk, tokenize_chunk(self.backend, chunk, unit.unit)))
                self.read_ahead_rows += len(chunk.ids)
                self.busy += time.perf_counter() - start
                return
        self._release(progress)
        self._claim_now(unit, chunk, progress)

    def _release(self, progress: UnitProgress) -> None:
        """The held chunks (all of the unit being read) go to their digests' owners in batches marked unclaimed,
        whose repeats the owner finds as they come in, so the first batches leave as soon as credit comes.
        Claimed one chunk after another instead, each a round trip through the owner's loop, thirteen ranks'
        first batches left 0.14 s after the encoder rank was ready (bench/notes/dedup.md, session 28)."""
        held, self._held = self._held, None
        if not held:
            return
        start = time.perf_counter()
        owners = self.dedup.owners
        full = []
        for _, chunk, tokens in held:
            tokens.digests = text_digests(chunk.texts, self.digest_seed)
            full += self._assembled(tokens, owner_index(tokens.digests, len(owners)))
        for dest, assembler in self.owner_assemblers.items():
            rest = assembler.flush()        # not mixed with claimed rows, which the owner must not check again
            if rest is not None:
                full.append((dest, rest))
        self.busy += time.perf_counter() - start
        for dest, batch in full:
            batch.claimed = False
            self.sink.put(self, held[0][0], batch, progress, dest)

    def _claim_now(self, unit: WorkUnit, chunk: RowChunk, progress: UnitProgress) -> None:
        """Claim the chunk's digests, then tokenize the chunk claimed before it: its answers have had the time
        this chunk took to read to come back."""
        start = time.perf_counter()
        pending, sends = self.dedup.claim(unit, chunk, text_digests(chunk.texts, self.digest_seed))
        sent = time.perf_counter()
        self.busy += sent - start
        deliver(self.transport, sends, prompt=True)
        # A prompt send blocks until its owner takes the claim in (transport/mpi.py): time waiting on claims, as
        # _resolve's wait for the answers is. It went uncounted (2-3 s a rank of "untracked" on the H100 box).
        self.other["claim_wait"] += time.perf_counter() - sent
        self._resolve(progress)
        self._pending = pending

    def _resolve(self, progress: UnitProgress) -> None:
        """Tokenize the pending chunk's first claims into their owners' batches; its repeats become references."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        waiting = time.perf_counter()
        while not self.dedup.ready(pending):
            self.receive(None)
        start = time.perf_counter()
        self.other["claim_wait"] += start - waiting
        first = self.dedup.firsts(pending)
        self.dedup.refer(pending, np.flatnonzero(~first))
        keep = np.flatnonzero(first)
        full = []
        if len(keep):
            batch = tokenize_chunk(self.backend, pending.chunk.take(keep), pending.unit.unit)
            batch.digests = pending.digests[keep]
            full = self._assembled(batch, pending.owner[keep])
        self.busy += time.perf_counter() - start
        for dest, batch in full:
            self.sink.put(self, pending.unit, batch, progress, dest)

    def _assembled(self, batch: TokenBatch, owner: np.ndarray) -> list[tuple[int, TokenBatch]]:
        """The rows of `batch` into their owners' batches (`owner`: an index into the owner list per row); the
        batches now full, with the rank each goes to. Rows all of one owner (one encoder rank) are not copied."""
        owners, present = self.dedup.owners, np.unique(owner).tolist()
        full = []
        for k in present:
            rows = batch if len(present) == 1 else batch.take(np.flatnonzero(owner == k))
            full += [(owners[k], b) for b in self.owner_assemblers[owners[k]].add(rows)]
        return full

    def _send_rest(self, unit: WorkUnit, progress: UnitProgress) -> None:
        if self.dedup is not None:
            self._release(progress)
            self._resolve(progress)
            for dest, assembler in self.owner_assemblers.items():
                rest = assembler.flush()
                if rest is not None:
                    self.sink.put(self, unit, rest, progress, dest)
            # Sent last, just before UnitEnd on the same channel: an abandoned unit sends none.
            for dest, (ids, rows, digests) in self.dedup.take_references().items():
                self.transport.send(dest, References(unit.unit, ids, rows, digests))
                self.core.referenced(dest, len(ids), progress)
            return
        rest = self.assembler.flush()
        if rest is not None:
            self.sink.put(self, unit, rest, progress)

    def _clear(self) -> None:
        """The unit is dropped: nothing of it is sent any more."""
        self.assembler.clear()
        for assembler in self.owner_assemblers.values():
            assembler.clear()
        if self.dedup is not None:
            self.dedup.forget(self._pending)
            self._pending = None
            if self._held:              # read ahead, never claimed: nothing of them is owed
                self._held = []
            self.dedup.clear_references()
