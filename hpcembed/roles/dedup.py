"""Each distinct text embedded once per job (--dedup): digest-partitioned ownership among the encoder ranks.

Every row's digest (io/digest.py) has one owner, the encoder rank `owners[first 8 bytes mod len(owners)]`. Before
tokenizing a chunk, a tokenizer rank sends each owner one Claim with the chunk's digests it owns. The owner
answers digest by digest: the first claim of a digest in the job is told to encode it (the tokenizer tokenizes the
row and sends it in a batch to that owner), every later one is not (the tokenizer skips tokenizing it and sends
the owner a Reference at the end of the unit: id, input row, digest). The owner keeps each embedding it made for a
claimed digest and writes a referenced row, with a copy of that embedding under the row's own id, into its own
shard of the referencing row's unit. So the commit rule is unchanged: the rows of a unit sent to an encoder rank,
in batches or as references, are the rows its shard of the unit holds; a resumed job starts with empty tables and
only re-encodes.

Cost: one Claim and one Claimed per chunk and owner (16 bytes and 1 bit a row); memory on the owner, about
DIGEST_ENTRY_BYTES per digest plus its embedding, bounded by --dedup-memory: once full, new digests are encoded
without being recorded (their repeats are encoded again). Rows of a batch go to their owners, not to the rank
with the most free credit, so every tokenizer rank links to every encoder rank (bench/notes/dedup.md: why this
holds to a few nodes and what takes it to 1000).

The chunks a tokenizer rank reads before any owner has granted credit (the owners are building their models and
answer no claim) go without claims, in batches marked unclaimed; the owner claims their digests itself as they
arrive, encodes the first claims and files the repeats as References (roles/encoder.py, EncoderRank._admit).

--reuse seeds the tables with earlier outputs' digests and embeddings (io/reuse.py); a row that finds its digest
there is a Reference like any repeat.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import compress, repeat

import numpy as np

from ..protocol.messages import Claim, Claimed, Send

PENDING = -1                    # claimed, its embedding not yet made
DIGEST_ENTRY_BYTES = 160        # a 16-byte bytes key, its dict entry and slot int: ~157 B by tracemalloc
BLOCK_ROWS = 1 << 14            # embeddings are kept in blocks of this many rows


def owner_index(digests: np.ndarray, owners: int) -> np.ndarray:
    """Which owner (an index into the owner list) each digest [rows, 16] belongs to."""
    return np.ascontiguousarray(digests[:, :8]).view("<u8").ravel() % np.uint64(owners)


@dataclass
class PendingChunk:
    """A chunk whose claims are out: the driver tokenizes its first claims once every owner has answered."""
    unit: object                        # the WorkUnit
    chunk: object                       # the RowChunk (rows already validated)
    digests: np.ndarray                 # [rows, 16]
    owner: np.ndarray                   # owner index per row
    seq: int
    answers: dict[int, bytes] = field(default_factory=dict)       # owner index -> packed answer bits


class Claims:
    """The tokenizer rank's side: claims out, answers in, and the references each owner is owed for a unit."""

    def __init__(self, owners: list[int]):
        self.owners = list(owners)
        self._rank_index = {r: k for k, r in enumerate(self.owners)}
        self._seq = 0
        self.waiting: dict[int, PendingChunk] = {}          # seq -> chunk whose answers are not all in
        self.expected: dict[int, set[int]] = {}             # seq -> owner indices still to answer
        self.references: dict[int, list] = {}               # owner index -> [(ids, rows, digests)] of this unit

    @property
    def outstanding(self) -> bool:
        return any(self.expected.values())

    def claim(self, unit, chunk, digests: np.ndarray) -> tuple[PendingChunk, list[Send]]:
        owner = owner_index(digests, len(self.owners))
        seq, self._seq = self._seq, self._seq + 1
        pending = PendingChunk(unit, chunk, digests, owner, seq)
        present = np.unique(owner).tolist()
        self.waiting[seq] = pending
        self.expected[seq] = set(present)
        return pending, [Send(self.owners[k], Claim(seq, digests[owner == k].tobytes())) for k in present]

    def answered(self, source: int, message: Claimed) -> None:
        k = self._rank_index[source]
        pending = self.waiting.get(message.seq)
        if pending is not None:
            pending.answers[k] = message.first
        self.expected[message.seq].discard(k)
        if not self.expected[message.seq]:
            del self.expected[message.seq]
            self.waiting.pop(message.seq, None)

    def ready(self, pending: PendingChunk) -> bool:
        return pending.seq not in self.expected

    def forget(self, pending: PendingChunk | None) -> None:
        """An abandoned chunk: its answers are still received (outstanding), and ignored."""
        if pending is not None:
            self.waiting.pop(pending.seq, None)

    def firsts(self, pending: PendingChunk) -> np.ndarray:
        """bool per row of the chunk: the first claim of its digest in the job."""
        first = np.zeros(len(pending.owner), dtype=bool)
        for k, bits in pending.answers.items():
            mine = pending.owner == k
            first[mine] = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=int(mine.sum())).astype(bool)
        return first

    def refer(self, pending: PendingChunk, rows: np.ndarray) -> None:
        """Rows (positions in the chunk) whose digests their owners already have: kept for the unit's end."""
        chunk = pending.chunk
        for k in np.unique(pending.owner[rows]).tolist():
            sel = rows[pending.owner[rows] == k]
            self.references.setdefault(k, []).append(
                ([chunk.ids[i] for i in sel.tolist()], chunk.rows[sel].tolist(), pending.digests[sel].tobytes()))

    def take_references(self) -> dict[int, tuple[list[str], list[int], bytes]]:
        """Owner rank -> (ids, rows, digests) owed for the unit just read, and the slate cleared."""
        out = {}
        for k, parts in self.references.items():
            out[self.owners[k]] = ([i for p in parts for i in p[0]], [r for p in parts for r in p[1]],
                                   b"".join(p[2] for p in parts))
        self.references.clear()
        return out

    def clear_references(self) -> None:
        self.references.clear()


@dataclass
class KeptRows:
    """A part's referenced rows whose embeddings stay in the owner's table until the part is written: the shard
    writer copies them to their places (DigestTable.place), once, and off the loop thread."""
    table: "DigestTable"
    slots: np.ndarray

    def __len__(self) -> int:
        return len(self.slots)


@dataclass
class Filled:
    """Referenced rows of one unit whose embeddings are known: the encoder rank stores them as embedded rows."""
    unit: int
    ids: list[str]
    rows: np.ndarray                # int64 input rows
    digests: np.ndarray             # uint8 [n, 16]
    slots: np.ndarray               # int64: where each one's embedding is kept


class DigestTable:
    """The owner's side (an encoder rank): digest -> slot of its embedding, the embeddings themselves, and the
    references waiting for an embedding not yet made. A dict of 16-byte keys: about 0.3 µs a lookup from this
    loop (bench/dedup_host.py), faster here than a numpy hash table worked a batch at a time."""

    def __init__(self, memory_bytes: int):
        self.memory_bytes = memory_bytes
        self.slots: dict[bytes, int] = {}
        # Embeddings made in this job: slot reused_slots + s at [s // BLOCK_ROWS][s % BLOCK_ROWS].
        self._blocks: list[np.ndarray] = []
        # --reuse: the first slots, the earlier outputs' arrays as they were read (not copied), array k holding
        # slots _loaded_starts[k] onwards.
        self._loaded: list[np.ndarray] = []
        self._loaded_starts: list[int] = []
        self._width = 0
        self._dtype = None                          # what they all fit in (--reuse of float16 beside float32)
        self._used = 0                  # slots holding an embedding
        self.reused_slots = 0           # the first slots: embeddings loaded from earlier outputs (--reuse)
        self.waiting: dict[bytes, list[tuple[int, str, int]]] = {}      # digest -> (unit, id, row)
        self.rows_deduplicated = self.rows_reused = 0
        self.shards_ignored = 0         # --reuse shards left out as damaged (io/reuse.py)
        self.full = False

    # --- memory -----------------------------------------------------------------------------------------------
    def _capacity(self, width_bytes: int = 0) -> int:
        """Digests the memory bound allows, each with its embedding (of `width_bytes`, or the width stored so
        far; 4 KiB, a 1024-dimension float32 row, before any is known)."""
        width = width_bytes or self._width_bytes() or 4096
        return self.memory_bytes // (DIGEST_ENTRY_BYTES + width)

    def _width_bytes(self) -> int:
        return self._width * np.dtype(self._dtype).itemsize if self._width else 0

    def _note_rows(self, embeddings: np.ndarray) -> None:
        self._width = embeddings.shape[1]
        self._dtype = embeddings.dtype if self._dtype is None else np.result_type(self._dtype, embeddings.dtype)

    def _put(self, embeddings: np.ndarray) -> int:
        """Copy rows made in this job into the blocks, in one slice assignment a block; the first of the
        consecutive slots they got. Copied rather than kept as the batch's own array: on CUDA that array is the
        batch's pinned result buffer, which kept here never went back to torch's host pool (bench/notes/dedup.md,
        session 25). Blocks are allocated whole but touched only as they fill."""
        first = self._used
        self._note_rows(embeddings)
        dtype = embeddings.dtype if not self._blocks else np.result_type(self._blocks[0].dtype, embeddings.dtype)
        if self._blocks and dtype != self._blocks[0].dtype:
            self._blocks = [block.astype(dtype) for block in self._blocks]
        done = 0
        while done < len(embeddings):
            block, offset = divmod(self._used - self.reused_slots, BLOCK_ROWS)
            if block == len(self._blocks):
                self._blocks.append(np.empty((BLOCK_ROWS, embeddings.shape[1]), dtype=dtype))
            n = min(BLOCK_ROWS - offset, len(embeddings) - done)
            self._blocks[block][offset: offset + n] = embeddings[done: done + n]
            done, self._used = done + n, self._used + n
        return first

    def embeddings(self, slots: np.ndarray) -> np.ndarray:
        """The embeddings kept at `slots`, as a new array."""
        out = np.empty((len(slots), self.width), dtype=self._dtype)
        self.place(slots, out, np.arange(len(slots)))
        return out

    @property
    def width(self) -> int:
        return self._width

    @property
    def dtype(self):
        return self._dtype

    def place(self, slots: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
        """Copy the embeddings kept at `slots` to out[positions]: one gather a block they touch. Safe on a shard
        writer thread while the loop thread stores more: the slots read were filled before (a part is written
        only once all its rows are), filled rows never change, and blocks are only added (numpy's copies release
        the GIL, so the loop runs on meanwhile)."""
        slots = np.asarray(slots, dtype=np.int64)
        if self.reused_slots:
            loaded = slots < self.reused_slots
            if loaded.any():
                self._place_loaded(slots[loaded], out, positions[loaded])
                if loaded.all():
                    return
                slots, positions = slots[~loaded], positions[~loaded]
            slots = slots - self.reused_slots
        block, offset = np.divmod(slots, BLOCK_ROWS)
        blocks = self._blocks
        touched = np.unique(block).tolist()
        if len(touched) == 1:
            out[positions] = blocks[touched[0]][offset]
            return
        for b in touched:
            sel = block == b
            out[positions[sel]] = blocks[b][offset[sel]]

    def _place_loaded(self, slots: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
        """place() for slots of loaded arrays: one gather an array they touch, found by sorting, not by a mask
        an array (a part's references spread over every shard of an earlier output)."""
        which = np.searchsorted(self._loaded_starts, slots, side="right") - 1
        order = np.argsort(which, kind="stable")
        which, slots, positions = which[order], slots[order], positions[order]
        bounds = np.flatnonzero(np.diff(which)) + 1
        for lo, hi in zip(np.concatenate(([0], bounds)).tolist(), np.concatenate((bounds, [len(which)])).tolist()):
            k = int(which[lo])
            out[positions[lo:hi]] = self._loaded[k][slots[lo:hi] - self._loaded_starts[k]]

    # --- the protocol -----------------------------------------------------------------------------------------
    def claim(self, digests: bytes) -> np.ndarray:
        """uint8 per digest: 1 where it is claimed here first (recorded, as memory allows), 0 where it was
        claimed before. Once full, digests go unrecorded and are answered 1 wherever they come."""
        slots = self.slots
        room = self._capacity() - len(slots)
        keys = _keys(digests)
        flags = np.zeros(len(keys), dtype=np.uint8)
        for k, d in enumerate(keys):
            if d not in slots:
                flags[k] = 1
                if room > 0:
                    slots[d] = PENDING
                    room -= 1
                else:
                    self.full = True
        return flags

    def load(self, digests: np.ndarray, embeddings: np.ndarray) -> int:
        """Embeddings of earlier outputs (--reuse), before any claim; returns the rows kept (memory allowing).
        The array is kept as it is where every row is kept (an earlier output holds each digest once), not
        copied into blocks: with one owner, a 1M-row earlier output took 3.6-4.1 s to load with the copies and
        2.6-2.8 s without, 1.3 s of either reading and checking it (CPU box, bench/reuse_load.py)."""
        if self._blocks:
            raise RuntimeError("--reuse embeddings are loaded before any is made")
        slots, keys = self.slots, _keys(np.ascontiguousarray(digests).tobytes())
        # Each new digest's first row, in C loops: built backwards, a repeated key ends with its first row.
        first_row = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))
        if not slots.keys().isdisjoint(first_row):      # digests another output (or shard) gave already
            first_row = {d: k for d, k in first_row.items() if d not in slots}
        room = max(0, self._capacity(embeddings.shape[1] * embeddings.itemsize) - len(slots))
        rows = np.sort(np.fromiter(first_row.values(), dtype=np.int64, count=len(first_row)))[:room]
        self.full = self.full or len(first_row) > room
        if not len(rows):
            return 0
        kept = embeddings if len(rows) == len(embeddings) else embeddings[rows]
        first = self._used
        self._note_rows(kept)
        self._loaded.append(kept)
        self._loaded_starts.append(first)
        slots.update(zip(keys if len(rows) == len(keys) else [keys[k] for k in rows.tolist()],
                         range(first, first + len(rows))))
        self._used += len(rows)
        self.reused_slots = self._used
        return len(rows)

    def references(self, unit: int, ids: list[str], rows: list[int], digests: bytes) -> Filled:
        """Rows referring to digests here: those whose embedding is made come back filled; the rest wait."""
        keys = _keys(digests)
        # A reference is only sent for a digest recorded here.
        found = np.fromiter(map(self.slots.__getitem__, keys), dtype=np.int64, count=len(keys))
        ready = found != PENDING
        array = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 16)
        if ready.all():
            return self._filled(Filled(unit, list(ids), np.asarray(rows, np.int64), array, found))
        for k in np.flatnonzero(~ready).tolist():
            self.waiting.setdefault(keys[k], []).append((unit, ids[k], rows[k]))
        return self._filled(Filled(unit, list(compress(ids, ready.tolist())), np.asarray(rows, np.int64)[ready],
                                   array[ready], found[ready]))

    def _filled(self, filled: Filled) -> Filled:
        reused = int((filled.slots < self.reused_slots).sum())
        self.rows_reused += reused
        self.rows_deduplicated += len(filled.slots) - reused
        return filled

    def encoded(self, digests: np.ndarray, embeddings: np.ndarray) -> list[Filled]:
        """Embeddings made for rows owned here: kept where claimed, and the references waiting for them filled."""
        slots, keys = self.slots, _keys(np.ascontiguousarray(digests).tobytes())
        if not self.full:
            # A batch holds only rows whose claim was the first (the tokenizer rank tokenizes no other), and until
            # the table is full every first claim is recorded pending: no lookup needed (about 0.2 µs a row off the
            # loop thread on the CPU box, bench/notes/dedup.md, session 27).
            new_keys, new = keys, np.arange(len(keys))
            first = self._put(embeddings)
        else:
            claimed = np.fromiter(map(slots.get, keys, repeat(0)), dtype=np.int64, count=len(keys)) == PENDING
            new = np.flatnonzero(claimed)
            if not len(new):
                return []
            first = self._put(embeddings if len(new) == len(keys) else embeddings[new])
            new_keys = list(compress(keys, claimed.tolist()))
        slots.update(zip(new_keys, range(first, first + len(new))))
        if not self.waiting:
            return []
        by_unit: dict[int, list] = {}
        hits = np.fromiter(map(self.waiting.__contains__, new_keys), dtype=bool, count=len(new_keys))
        for n in np.flatnonzero(hits).tolist():
            for unit, row_id, row in self.waiting.pop(new_keys[n]):
                by_unit.setdefault(unit, []).append((row_id, row, int(new[n]), first + n))
        return [self._filled(Filled(unit, [r[0] for r in refs], np.array([r[1] for r in refs], np.int64),
                                    digests[[r[2] for r in refs]], np.array([r[3] for r in refs], np.int64)))
                for unit, refs in by_unit.items()]


def _keys(digests: bytes) -> list[bytes]:
    """Each 16-byte digest of a packed run of them, as a bytes key (numpy slices them in C)."""
    return np.frombuffer(digests, dtype="V16").tolist()


def answer(table: DigestTable, message: Claim) -> Claimed:
    """The owner's answer to a claim: one bit per digest, packed (np.packbits order)."""
    return Claimed(message.seq, np.packbits(table.claim(message.digests)).tobytes())
