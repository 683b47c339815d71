"""The encoder rank's real-time driver: receives token batches from tokenizers, re-batches them by token budget
(longest-first within a bounded window), encodes them, and writes its own output shards: one shard per (work
unit, encoder rank), written as soon as every row of that unit sent here has been embedded. When to take a batch
in, when credits go back and when a part is complete are the EncoderCore's (protocol/encoder.py).

Shards are written by background threads (WRITER_THREADS), so the loop keeps feeding the encoders while a shard is
encoded, written and fsynced (pyarrow and fsync release the GIL); PartWritten goes out once the file is in place, in
the order the parts completed.

On a machine without CUDA the same role runs the encoder on CPU; that is how CI exercises it.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..arrow_arrays import numeric, strings
from ..batching import TokenBudgetBatcher
from ..engine.instances import InstancePool
from ..engine.pooling import mean_of_windows
from ..io.digest import combined_digests
from ..io.writer import OutputDir, ShardFile, shard_name
from ..manifest import EncoderStats
from ..protocol.encoder import EncoderCore
from ..protocol.messages import Calibrated, Claim, DropIds, PartRewritten, References
from ..tokenize.batch import TokenBatch
from ..transport.base import Transport
from .common import deliver
from .dedup import DigestTable, Filled, KeptRows, answer


WRITES_POLL_SECONDS = 0.002      # a finished shard write is reported at most this late
# Shards are assembled, checksummed and written on these threads (pyarrow, xxh3 and the file write release the GIL).
# Four, not two: on the H200 box two held short queries to 202k texts/s, four gave 305k (bench/notes/feed_the_gpu.md,
# calls 20-21). Eight, not four: under --dedup a unit's part completes only once its referenced rows are filled, so
# many complete with the job's last batches, and four threads left the last shard written 0.34 s after the last
# batch encoded, eight 0.08 s (H100 box, 1M rows at 30% repeats: 1.318x -> 1.337x; --dedup off 95.8k texts/s either
# way; bench/notes/dedup.md, session 28). HPCEMBED_WRITER_THREADS sets it for A/B runs.
WRITER_THREADS = int(os.environ.get("HPCEMBED_WRITER_THREADS", "8"))


@dataclass
class _UnitRows:
    """The embedded rows of one unit's part, until it is complete."""
    rows: list[np.ndarray] = field(default_factory=list)
    ids: list[pa.Array] = field(default_factory=list)
    embeddings: list = field(default_factory=list)          # arrays, and (--dedup) KeptRows
    chunks: list[np.ndarray] = field(default_factory=list)      # a chunked job's (chunk, start, end) per row
    digests: list[np.ndarray] = field(default_factory=list)     # each row's content digest, [rows, 16]


class EncoderRank:
    def __init__(self, transport: Transport, core: EncoderCore, instances: InstancePool, output: OutputDir,
                 startup: dict[str, float] | None = None, pool_chunks: bool = False, normalize: bool = False,
                 dedup: DigestTable | None = None):
        """`startup`: the epoch seconds at which the launcher saw this rank reach each step of start-up.
        `pool_chunks`: a chunked job's windows are stored as one row per id, their mean (`normalize`: made unit
        length again, for a model that normalizes). `dedup`: the digests this rank owns (roles/dedup.py)."""
        self.transport, self.core, self.pool, self.output = transport, core, instances, output
        self.dedup = dedup
        self.pool_chunks, self.normalize = pool_chunks, normalize
        self.startup = dict(startup or {})
        self.batches = 0
        first = instances.encoders[0]
        self.batcher = TokenBudgetBatcher(core.max_batch_tokens, first.batch_cost, pass_through=not first.pads)
        self.parts: dict[int, _UnitRows] = {}
        self._writer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="shard-writer")
        self._writes: deque[tuple[Future, int, str]] = deque()      # (write, unit, shard name)
        self.last_encoded_at = self.last_completed_at = self.last_written_at = self.writer_seconds = 0.0
        # Where the loop's time goes (seconds), reported with the rank: if the GPU idles, this says why.
        self.loop_time = {"receive": 0.0, "batch": 0.0, "store": 0.0, "wait": 0.0}
        self.claims_a_turn = max(1, len(core.roles.tokenizers))     # every tokenizer rank claims from every owner
        # --dedup's share of the loop (inside `receive`): wall and this thread's CPU seconds answering claims and
        # taking references in. Wall well above CPU means the loop thread waited for the GIL.
        self.dedup_time = {"claims": 0.0, "claims_cpu": 0.0, "references": 0.0, "references_cpu": 0.0}

    def run(self) -> None:
        ready_at = self.startup["ready"] = time.time()     # encoders built: from here the rank can take work
        cpu_at_ready, loop_cpu_at_ready = time.process_time(), time.thread_time()
        if self.output.ranges is not None:     # before any shard quantized with them (launch/calibrate.py)
            self.transport.send(self.core.roles.conductor, Calibrated(np.asarray(self.output.ranges).tolist()))
        deliver(self.transport, self.core.start())
        try:
            self._loop()
        finally:
            self.pool.close()
            self._writer.shutdown(wait=True)
        core = self.core
        rank = self.transport.rank
        stats = EncoderStats(rank, "encoder", core.roles.host_of(rank), core.rows, core.tokens, self.pool.busy_seconds,
                             **self.pool.describe(), ready_at=ready_at, stage_busy_seconds=self.pool.stage_busy_seconds,
                             loop_seconds=dict(self.loop_time), startup=self.startup,
                             host_cpu_seconds=time.process_time() - cpu_at_ready, batches=self.batches,
                             loop_cpu_seconds=time.thread_time() - loop_cpu_at_ready,
                             last_encoded_at=self.last_encoded_at, last_completed_at=self.last_completed_at,
                             last_written_at=self.last_written_at,
                             writer_seconds=self.writer_seconds,
                             **({"rows_deduplicated": self.dedup.rows_deduplicated,
                                 "rows_reused": self.dedup.rows_reused,
                                 "reuse_shards_ignored": self.dedup.shards_ignored,
                                 "dedup_full": self.dedup.full,
                                 "dedup_seconds": dict(self.dedup_time)} if self.dedup is not None else {}))
        deliver(self.transport, core.finish(stats))

    def _idle(self) -> bool:
        return not self.batcher.rows and not self.pool.in_flight and not self._writes

    def _receive_timeout(self) -> float | None:
        """How long a look for input may wait: not at all while there are batches to submit or in flight; until
        something comes when the rank has nothing at all to do; and otherwise (only shard writes to report, or
        stopping) a little, so that a rank waiting for input does not spin a core beside its writer thread."""
        if self.batcher.rows or self.pool.in_flight:
            return 0.0
        return None if not self._writes and not self.core.stopping else WRITES_POLL_SECONDS

    def _loop(self) -> None:
        clock, spent, core = time.perf_counter, self.loop_time, self.core
        while True:
            # Take in what has arrived while the window has room; block only when there is nothing to encode, in
            # flight or being written.
            t0 = clock()
            if self.dedup is not None:
                # Claims first, even with the window full: tokenizer ranks wait on the answers (behind batches,
                # 3.7 s a rank in a 1M-row job: bench/notes/dedup.md, fifth run), and a claim's sender blocks until
                # it is taken here (transport/mpi.py: prompt sends). At most one a tokenizer rank a turn: each
                # sends its next claim as soon as one is taken, so taking them until none is left kept every
                # batch out while thirteen ranks sent the claims of the chunks they read ahead (session 28).
                for _ in range(self.claims_a_turn):
                    envelope = self.transport.recv_prompt()
                    if envelope is None:
                        break
                    self._handle(envelope.source, envelope.message)
            while core.has_room(self.batcher.tokens):
                envelope = self.transport.recv(self._receive_timeout())
                if envelope is None:
                    break
                self._handle(envelope.source, envelope.message)
                if self.batcher.rows and not self.pool.in_flight:
                    break           # the encoders are idle: this batch goes now, not once the window is full
            t1 = clock()
            while self.batcher.rows and self.pool.capacity > 0:
                batch = self.batcher.pop()
                self.pool.submit(batch)
                self.batches += 1
                if "first_batch" not in self.startup:
                    self.startup["first_batch"] = time.time()
                deliver(self.transport, core.submitted(batch.num_tokens, window_empty=not self.batcher.rows))
            t2 = clock()
            # Wait a little for the oldest batch only when there is nothing else to do.
            waiting_only = not self.batcher.rows or self.pool.capacity == 0
            finished = self.pool.completed(wait=0.002 if waiting_only else 0.0)
            t3 = clock()
            for batch, embeddings in finished:
                self._store(batch, embeddings)
            if finished:
                self.last_encoded_at = time.time()
            self._report_writes(wait=core.stopping and not self.batcher.rows and not self.pool.in_flight)
            t4 = clock()
            spent["receive"] += t1 - t0
            spent["batch"] += t2 - t1
            spent["wait"] += t3 - t2
            spent["store"] += t4 - t3
            if core.stopping and self._idle():
                break

    def _report_writes(self, wait: bool) -> None:
        """PartWritten for every shard whose write has finished, in order (a failed write raises here)."""
        while self._writes and (wait or self._writes[0][0].done()):
            future, unit, name = self._writes.popleft()
            shard, seconds, self.last_written_at = future.result()
            self.writer_seconds += seconds
            deliver(self.transport, [self.core.written(unit, name, shard.size, shard.digest, shard.rows,
                                                       shard.companion)])

    def _handle(self, source: int, message) -> None:
        if isinstance(message, TokenBatch):
            if "first_batch_taken" not in self.startup:
                self.startup["first_batch_taken"] = time.time()
            if not message.claimed and self.dedup is not None:
                message = self._admit(message)
                if message is None:
                    deliver(self.transport, self.core.batch_emptied(source))
                    return
            self.batcher.add(message)
            self.core.batch_taken(source, message.num_tokens)
        elif isinstance(message, Claim):
            wall, cpu = time.perf_counter(), time.thread_time()
            self.transport.send(source, answer(self.dedup, message))
            if "first_claim_answered" not in self.startup:
                self.startup["first_claim_answered"] = time.time()
            self._spent("claims", wall, cpu)
        elif isinstance(message, References):
            wall, cpu = time.perf_counter(), time.thread_time()
            self._store_filled(self.dedup.references(message.unit, message.ids, message.rows, message.digests))
            self._spent("references", wall, cpu)
        elif isinstance(message, DropIds):
            removed, shard = self.output.drop_ids(message.shard, set(message.digests))
            size, digest, rows, companion = shard if shard is not None else (-1, "", -1, ())
            self.transport.send(self.core.roles.conductor, PartRewritten(message.unit, message.shard, removed, size,
                                                                         digest, rows, list(companion)))
        else:
            for unit in self.core.handle(source, message):
                self._write_part(unit)

    def _admit(self, batch: TokenBatch) -> TokenBatch | None:
        """Rows sent without claims (read ahead while this rank built its model): their digests are claimed here,
        and the repeats among them become references, filled from the table as a tokenizer rank's References are.
        What is left to encode, or None."""
        wall, cpu = time.perf_counter(), time.thread_time()
        first = self.dedup.claim(np.ascontiguousarray(batch.digests).tobytes()).astype(bool)
        repeats = np.flatnonzero(~first)
        if len(repeats):
            ids = batch.ids()
            units = batch.units[repeats]
            for unit in np.unique(units).tolist():
                sel = repeats[units == unit]
                self._store_filled(self.dedup.references(
                    unit, [ids[i] for i in sel.tolist()], batch.rows[sel].tolist(),
                    np.ascontiguousarray(batch.digests[sel]).tobytes()))
        self._spent("claims", wall, cpu)
        if not len(repeats):
            return batch
        return batch.take(np.flatnonzero(first)) if first.any() else None

    def _spent(self, what: str, wall: float, cpu: float) -> None:
        self.dedup_time[what] += time.perf_counter() - wall
        self.dedup_time[what + "_cpu"] += time.thread_time() - cpu

    def _store(self, batch: TokenBatch, embeddings: np.ndarray) -> None:
        ids, lengths = batch.id_array(), batch.lengths
        for unit in np.unique(batch.units):
            sel = np.flatnonzero(batch.units == unit)
            part = self.parts.setdefault(int(unit), _UnitRows())
            if len(sel) == batch.num_rows:
                # The whole batch (a tokenizer's batch holds one unit): its arrays are kept as they are.
                part.rows.append(batch.rows)
                part.ids.append(ids)
                part.embeddings.append(embeddings)
                if batch.chunks is not None:
                    part.chunks.append(batch.chunks)
                if batch.digests is not None:
                    part.digests.append(batch.digests)
            else:
                part.rows.append(batch.rows[sel])
                part.ids.append(ids.take(numeric(sel)))
                part.embeddings.append(embeddings[sel])
                if batch.chunks is not None:
                    part.chunks.append(batch.chunks[sel])
                if batch.digests is not None:
                    part.digests.append(batch.digests[sel])
            if self.core.embedded(int(unit), len(sel), int(lengths[sel].sum())):
                self._write_part(int(unit))
        if self.dedup is not None and batch.digests is not None:
            for filled in self.dedup.encoded(batch.digests, embeddings):
                self._store_filled(filled)

    def _store_filled(self, filled: Filled) -> None:
        """Referenced rows with a copy of their digest's embedding, stored as embedded rows of their unit."""
        if not filled.ids:
            return
        part = self.parts.setdefault(filled.unit, _UnitRows())
        part.rows.append(filled.rows)
        part.ids.append(strings(filled.ids))
        part.embeddings.append(KeptRows(self.dedup, filled.slots))        # copied by the shard writer
        part.digests.append(filled.digests)
        if self.core.embedded(filled.unit, len(filled.ids), 0):
            self._write_part(filled.unit)

    def _write_part(self, unit: int) -> None:
        """The shard is assembled and written on the writer thread, off the loop."""
        part = self.parts.pop(unit)
        self.last_completed_at = time.time()
        name = shard_name(unit, self.transport.rank)
        self._writes.append((self._writer.submit(_write_shard, self.output, name, part, self.pool_chunks,
                                                 self.normalize), unit, name))


def _in_order(pieces: list, order: np.ndarray | None) -> np.ndarray:
    """The pieces' rows (arrays, or KeptRows in the owner's table), concatenated and then taken in `order` (None:
    as they are), in one array and one copy."""
    if not any(isinstance(p, KeptRows) for p in pieces) and (order is None or len(pieces) == 1):
        whole = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        return whole if order is None else whole[order]
    rows = sum(len(p) for p in pieces)
    place = np.arange(rows)
    if order is not None:
        place[order] = np.arange(rows)                 # where each row of the concatenation goes
    arrays = [p for p in pieces if not isinstance(p, KeptRows)]
    kept = next((p.table for p in pieces if isinstance(p, KeptRows)), None)
    width = arrays[0].shape[1] if arrays else kept.width
    out = np.empty((rows, width), dtype=np.result_type(*arrays, *([kept.dtype] if kept is not None else [])))
    start = 0
    for piece in pieces:
        here = place[start: start + len(piece)]
        if isinstance(piece, KeptRows):
            piece.table.place(piece.slots, out, here)
        else:
            out[here] = piece
        start += len(piece)
    return out


def _write_shard(output: OutputDir, name: str, part: _UnitRows, pool_chunks: bool, normalize: bool
                 ) -> tuple[ShardFile, float, float]:
    """On a writer thread: the shard, the seconds it took, and the epoch seconds it was done."""
    start = time.perf_counter()
    shard = _assemble_and_write(output, name, part, pool_chunks, normalize)
    return shard, time.perf_counter() - start, time.time()


def _assemble_and_write(output: OutputDir, name: str, part: _UnitRows, pool_chunks: bool, normalize: bool
                        ) -> ShardFile:
    rows = np.concatenate(part.rows)
    ids = pa.concat_arrays(part.ids)
    chunks = np.concatenate(part.chunks) if part.chunks else None
    digests = np.concatenate(part.digests) if part.digests else None
    # Input order within the shard (a unit is rows of one file), a text's windows in order.
    order = None
    if chunks is not None:
        order = np.lexsort((chunks[:, 0], rows))
    elif len(rows) > 1 and not (rows[1:] > rows[:-1]).all():
        order = np.argsort(rows, kind="stable")
    # The embeddings go straight to their places in one array: a concatenation and then a gather made two copies
    # of the whole part where its rows are out of order, as --dedup's are (referenced rows come after the unit's
    # batches), and its writer threads took ~24 ms more a 10,000-row shard than without (bench/notes/dedup.md,
    # session 28; the one copy saves ~4 ms of that on the CPU box).
    embeddings = _in_order(part.embeddings, order)
    if order is not None:
        ids = ids.take(numeric(order))
        chunks = None if chunks is None else chunks[order]
        digests = None if digests is None else digests[order]
    if chunks is not None and pool_chunks:
        starts, embeddings = mean_of_windows(embeddings, chunks[:, 0], normalize)
        ids = ids.take(numeric(starts))
        digests = None if digests is None else combined_digests(digests, starts)
        chunks = None
    return output.write_shard(name, ids, embeddings, chunks, digests)

