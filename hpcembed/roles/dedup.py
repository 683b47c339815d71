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

Cost: one Claim and one Claimed per chunk and owner (16 bytes and 1 byte a row); memory on the owner, about
DIGEST_ENTRY_BYTES per digest plus its embedding, bounded by --dedup-memory: once full, new digests are encoded
without being recorded (their repeats are encoded again). Rows of a batch go to their owners, not to the rank
with the most free credit, so every tokenizer rank links to every encoder rank (bench/notes/dedup.md: why this
holds to a few nodes and what takes it to 1000).

--reuse seeds the tables with earlier outputs' digests and embeddings (io/reuse.py); a row that finds its digest
there is a Reference like any repeat.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..protocol.messages import Claim, Claimed, Send

PENDING = -1                    # claimed, its embedding not yet made
DIGEST_ENTRY_BYTES = 160        # a 16-byte bytes key, its dict entry and slot int: ~157 B by tracemalloc
_BLOCK_ROWS = 1 << 12         # embeddings are stored in blocks of this many rows


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
    answers: dict[int, bytes] = field(default_factory=dict)       # owner index -> flags


class Claims:
    """The tokenizer rank's side: claims out, answers in, and the references each owner is owed for a unit."""

    def __init__(self, owners: list[int]):
        self.owners = list(owners)
        self._rank_index = {r: k for k, r in enumerate(self.owners)}
        self._seq = 0
        self.waiting: dict[int, PendingChunk] = {}          # seq -> chunk whose answers are not all in
        self.expected: dict[int, set[int]] = {}             # seq -> owner indices still to answer
        self.references: dict[int, list] = {}               # owner index -> [(ids, rows, digests)] of this unit
        self.rows_referenced = 0

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
            self.rows_referenced += len(out[self.owners[k]][0])
        self.references.clear()
        return out

    def clear_references(self) -> None:
        self.references.clear()


@dataclass
class Filled:
    """Referenced rows of one unit whose embeddings are known: the encoder rank stores them as embedded rows."""
    unit: int
    ids: list[str]
    rows: list[int]
    digests: list[bytes]
    slots: list[int]


class DigestTable:
    """The owner's side (an encoder rank): digest -> slot of its embedding, the embeddings themselves, and the
    references waiting for an embedding not yet made."""

    def __init__(self, memory_bytes: int):
        self.memory_bytes = memory_bytes
        self.slots: dict[bytes, int] = {}
        self._blocks: list[np.ndarray] = []
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
        return self._blocks[0].shape[1] * self._blocks[0].itemsize if self._blocks else 0

    def _put(self, embeddings: np.ndarray) -> int:
        """Store rows; the first slot they got (they take consecutive slots)."""
        first = done = self._used
        while done < first + len(embeddings):
            block, pos = divmod(done, _BLOCK_ROWS)
            if block == len(self._blocks):
                self._blocks.append(np.empty((_BLOCK_ROWS, embeddings.shape[1]), dtype=embeddings.dtype))
            n = min(_BLOCK_ROWS - pos, first + len(embeddings) - done)
            self._blocks[block][pos: pos + n] = embeddings[done - first: done - first + n]
            done += n
        self._used = done
        return first

    def embeddings(self, slots: list[int]) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        block, pos = np.divmod(slots, _BLOCK_ROWS)
        first = self._blocks[0]
        out = np.empty((len(slots), first.shape[1]), dtype=first.dtype)
        for b in np.unique(block).tolist():
            sel = block == b
            out[sel] = self._blocks[b][pos[sel]]
        return out

    # --- the protocol -----------------------------------------------------------------------------------------
    def claim(self, digests: bytes) -> bytes:
        """1 for each digest claimed here first (recorded, where memory allows), 0 for one already claimed."""
        slots, capacity = self.slots, self._capacity()
        flags = bytearray(len(digests) // 16)
        for k in range(len(flags)):
            d = digests[16 * k: 16 * k + 16]
            if d not in slots:
                flags[k] = 1
                if len(slots) < capacity:
                    slots[d] = PENDING
                else:
                    self.full = True
        return bytes(flags)

    def load(self, digests: np.ndarray, embeddings: np.ndarray) -> int:
        """Embeddings of earlier outputs (--reuse), before any claim; returns the rows kept (memory allowing)."""
        raw, slots = np.ascontiguousarray(digests).tobytes(), self.slots
        keys = [raw[16 * k: 16 * k + 16] for k in range(len(digests))]
        keep = [(k, key) for k, key in enumerate(keys) if key not in slots]
        room = max(0, self._capacity(embeddings.shape[1] * embeddings.itemsize) - len(slots))
        if len(keep) > room:
            self.full, keep = True, keep[:room]
        if not keep:
            return 0
        first = self._put(embeddings[[k for k, _ in keep]])
        for n, (_, key) in enumerate(keep):
            self.slots[key] = first + n
        self.reused_slots = self._used
        return len(keep)

    def references(self, unit: int, ids: list[str], rows: list[int], digests: bytes) -> Filled:
        """Rows referring to digests here: those whose embedding is made come back filled; the rest wait."""
        filled = Filled(unit, [], [], [], [])
        for k, row_id in enumerate(ids):
            d = digests[16 * k: 16 * k + 16]
            slot = self.slots[d]            # a reference is only sent for a digest recorded here
            if slot == PENDING:
                self.waiting.setdefault(d, []).append((unit, row_id, rows[k]))
            else:
                self._filled(filled, row_id, rows[k], d, slot)
        return filled

    def _filled(self, filled: Filled, row_id: str, row: int, digest: bytes, slot: int) -> None:
        filled.ids.append(row_id)
        filled.rows.append(row)
        filled.digests.append(digest)
        filled.slots.append(slot)
        if slot < self.reused_slots:
            self.rows_reused += 1
        else:
            self.rows_deduplicated += 1

    def encoded(self, digests: np.ndarray, embeddings: np.ndarray) -> list[Filled]:
        """Embeddings made for rows owned here: kept where claimed, and the references waiting for them filled."""
        slots = self.slots
        keys = [bytes(d) for d in digests]
        new = [k for k, d in enumerate(keys) if slots.get(d) == PENDING]
        if not new:
            return []
        first = self._put(embeddings[new])
        by_unit: dict[int, Filled] = {}
        for n, k in enumerate(new):
            d = keys[k]
            slots[d] = first + n
            for unit, row_id, row in self.waiting.pop(d, ()):
                self._filled(by_unit.setdefault(unit, Filled(unit, [], [], [], [])), row_id, row, d, first + n)
        return list(by_unit.values())


def answer(table: DigestTable, message: Claim) -> Claimed:
    """The owner's answer to a claim: one bit per digest, packed (np.packbits order)."""
    flags = np.frombuffer(table.claim(message.digests), dtype=np.uint8)
    return Claimed(message.seq, np.packbits(flags).tobytes())
