"""TokenBatch: the unit of data that moves from tokenizers to encoders.

Arrow layout: token ids are one flat int32 buffer with int32 offsets (a list<int32> column), and row ids are a
string column (flat UTF-8 bytes plus offsets). Every field is a numpy array, so a transport can send the
buffers as they are, and `to_arrow` views them as an Arrow record batch without copying.

A chunked job (--chunk-tokens) sends one batch row per token window of a text: the rows of one text share its id
and input row, and `chunks` says which window each is and which characters of the text it covers.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..arrow_arrays import numeric, strings

# int64 count of: rows, tokens, id bytes, whether `chunks` follows, and whether `digests` follows (0: no; 1: yes;
# 2: yes, and not yet claimed)
_WIRE_HEADER = 5
_DIGESTS_UNCLAIMED = 2
SCHEMA = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32()))])


@dataclass
class TokenBatch:
    token_ids: np.ndarray    # int32 [total tokens]
    offsets: np.ndarray      # int32 [rows + 1]; row k is token_ids[offsets[k]:offsets[k+1]]
    id_offsets: np.ndarray   # int32 [rows + 1] into id_bytes
    id_bytes: np.ndarray     # uint8 UTF-8 of all row ids, concatenated
    rows: np.ndarray         # int64 row number within the input file
    units: np.ndarray        # int64 work unit of each row
    # int64 [rows, 3] in a chunked job: the window's number within its text (0-based), and the first and
    # one-past-last character of the text it covers; None otherwise.
    chunks: np.ndarray | None = None
    # uint8 [rows, 16] in an embedding job: each row's content digest (io/digest.py row_digests); None otherwise.
    digests: np.ndarray | None = None
    # --dedup: False for rows sent without claims (read ahead while the owners built their models); the owner
    # checks their digests itself as they come in (roles/encoder.py).
    claimed: bool = True

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def ids(self) -> list[str]:
        return self.id_array().to_pylist()

    def id_array(self) -> pa.StringArray:
        return pa.StringArray.from_buffers(self.num_rows, pa.py_buffer(self.id_offsets), pa.py_buffer(self.id_bytes))

    @classmethod
    def build(cls, token_lists: list, ids: list[str], rows: np.ndarray, unit: int,
              chunks: np.ndarray | None = None) -> "TokenBatch":
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        offsets = np.zeros(len(token_lists) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        if token_lists and all(isinstance(t, np.ndarray) for t in token_lists):
            flat = np.concatenate(token_lists).astype(np.int32, copy=False)
        else:   # lists (HF), or a mix with arrays (BudTikTok with some rows sent to HF)
            flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int32, count=int(offsets[-1]))
        id_arr = strings(ids)
        _, id_off, id_data = id_arr.buffers()
        id_offsets = np.frombuffer(id_off, dtype=np.int32, count=len(ids) + 1).copy()
        id_bytes = (np.frombuffer(id_data, dtype=np.uint8, count=int(id_offsets[-1])).copy()
                    if id_data is not None else np.empty(0, np.uint8))
        return cls(flat, offsets, id_offsets, id_bytes, np.asarray(rows, dtype=np.int64),
                   np.full(len(token_lists), unit, dtype=np.int64), chunks)

    @classmethod
    def from_token_lists(cls, tokens: pa.ListArray, ids: list[str], rows: np.ndarray, unit: int) -> "TokenBatch":
        """From a list<int32> column (a token shard), without a copy of the token ids where it is contiguous."""
        offsets = np.frombuffer(tokens.buffers()[1], dtype=np.int32, count=len(tokens) + 1,
                                offset=tokens.offset * 4)
        values = tokens.values.to_numpy(zero_copy_only=False)
        token_ids = values[offsets[0]: offsets[-1]]
        return cls.build_from_arrow_ids(token_ids, offsets - offsets[0], strings(ids), rows,
                                        np.full(len(tokens), unit, dtype=np.int64))

    def take(self, index: np.ndarray) -> "TokenBatch":
        """Rows `index`, in that order. numpy alone: pyarrow's take imports pyarrow.compute on its first call (28 ms
        on the CPU box), which an owner's first batch waited for under --dedup (bench/notes/dedup.md, session 28)."""
        index = np.asarray(index, dtype=np.int64)
        offsets, token_ids = _gather(self.offsets, self.token_ids, index)
        id_offsets, id_bytes = _gather(self.id_offsets, self.id_bytes, index)
        return TokenBatch(token_ids, offsets, id_offsets, id_bytes, self.rows[index], self.units[index],
                          None if self.chunks is None else self.chunks[index],
                          None if self.digests is None else self.digests[index])

    def slice(self, start: int, stop: int) -> "TokenBatch":
        """Rows [start, stop), as views of this batch's buffers (the offsets are rebased, a small copy)."""
        offsets = self.offsets[start: stop + 1]
        id_offsets = self.id_offsets[start: stop + 1]
        return TokenBatch(self.token_ids[offsets[0]: offsets[-1]], offsets - offsets[0], id_offsets - id_offsets[0],
                          self.id_bytes[id_offsets[0]: id_offsets[-1]],
                          self.rows[start:stop], self.units[start:stop],
                          None if self.chunks is None else self.chunks[start:stop],
                          None if self.digests is None else self.digests[start:stop])

    @classmethod
    def build_from_arrow_ids(cls, token_ids, offsets, ids: pa.Array, rows, units, chunks=None,
                             digests=None) -> "TokenBatch":
        ids = pa.concat_arrays([ids]) if ids.offset else ids   # normalise a sliced array
        _, id_off, id_data = ids.buffers()
        id_offsets = np.frombuffer(id_off, dtype=np.int32, count=len(ids) + 1)
        id_offsets = id_offsets - id_offsets[0]
        base = int(np.frombuffer(id_off, dtype=np.int32, count=1)[0])
        id_bytes = (np.frombuffer(id_data, dtype=np.uint8)[base: base + int(id_offsets[-1])].copy()
                    if id_data is not None else np.empty(0, np.uint8))
        return cls(np.ascontiguousarray(token_ids, dtype=np.int32), offsets.astype(np.int32, copy=False),
                   id_offsets.astype(np.int32), id_bytes, np.asarray(rows, np.int64), np.asarray(units, np.int64),
                   chunks, digests)

    @staticmethod
    def concat(batches: list["TokenBatch"]) -> "TokenBatch":
        if len(batches) == 1:
            return batches[0]
        lengths = np.concatenate([b.lengths for b in batches])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        ids = pa.concat_arrays([b.id_array() for b in batches])
        return TokenBatch.build_from_arrow_ids(
            np.concatenate([b.token_ids[b.offsets[0]: b.offsets[-1]] for b in batches]), offsets, ids,
            np.concatenate([b.rows for b in batches]), np.concatenate([b.units for b in batches]),
            None if batches[0].chunks is None else np.concatenate([b.chunks for b in batches]),
            None if batches[0].digests is None else np.concatenate([b.digests for b in batches]))

    def to_arrow(self) -> pa.RecordBatch:
        token_list = pa.ListArray.from_buffers(pa.list_(pa.int32()), self.num_rows,
                                               [None, pa.py_buffer(self.offsets)],
                                               children=[numeric(self.token_ids, pa.int32())])
        return pa.RecordBatch.from_arrays([self.id_array(), token_list], schema=SCHEMA)

    def to_wire(self) -> np.ndarray:
        """One contiguous byte buffer for a transport: header, then rows, units, (chunks,) (digests,) token ids,
        offsets, id offsets, id bytes."""
        n, t, b = self.num_rows, self.num_tokens, len(self.id_bytes)
        chunked, digested = self.chunks is not None, self.digests is not None
        header = np.array([n, t, b, int(chunked), 0 if not digested else 1 if self.claimed else _DIGESTS_UNCLAIMED],
                          dtype=np.int64)
        tokens = self.token_ids[self.offsets[0]: self.offsets[-1]]
        offsets = self.offsets - self.offsets[0]
        parts = [header.view(np.uint8), self.rows.view(np.uint8), self.units.view(np.uint8),
                 *([np.ascontiguousarray(self.chunks, np.int64).reshape(-1).view(np.uint8)] if chunked else []),
                 *([np.ascontiguousarray(self.digests, np.uint8).reshape(-1)] if digested else []),
                 tokens.view(np.uint8), offsets.view(np.uint8), self.id_offsets.view(np.uint8), self.id_bytes]
        return np.concatenate(parts)

    @classmethod
    def from_wire(cls, buf: np.ndarray) -> "TokenBatch":
        """The batch `to_wire` packed, as views into `buf` (no copy)."""
        n, t, b, chunked, digested = (int(v) for v in buf[: 8 * _WIRE_HEADER].view(np.int64))
        pos = 8 * _WIRE_HEADER

        def take(count: int, dtype) -> np.ndarray:
            nonlocal pos
            size = count * np.dtype(dtype).itemsize
            out = buf[pos: pos + size].view(dtype)
            pos += size
            return out

        rows, units = take(n, np.int64), take(n, np.int64)
        chunks = take(3 * n, np.int64).reshape(n, 3) if chunked else None
        digests = take(16 * n, np.uint8).reshape(n, 16) if digested else None
        tokens, offsets, id_offsets = take(t, np.int32), take(n + 1, np.int32), take(n + 1, np.int32)
        return cls(tokens, offsets, id_offsets, take(b, np.uint8), rows, units, chunks, digests,
                   claimed=digested != _DIGESTS_UNCLAIMED)


def _gather(offsets: np.ndarray, values: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows `index` of a variable-length layout (row k is values[offsets[k]:offsets[k+1]]): their offsets, from 0,
    and values, with one vectorised index (value j of new row r sits at offsets[index[r]] + j)."""
    lengths = (offsets[1:] - offsets[:-1])[index]
    out = np.zeros(len(index) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    starts = offsets[:-1][index]
    gather = np.repeat(starts - out[:-1], lengths) + np.arange(out[-1], dtype=np.int64)
    return out, values[gather]
