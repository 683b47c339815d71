"""Token-budget batch assembly, on both sides of the transport. A tokenizer rank cuts its rows into batches of the
encoder's token budget (BatchAssembler), so that an encoder which does not pad takes each as it is; the encoder
rank's TokenBudgetBatcher passes such batches through and re-batches the rest, longest-first, in batches whose
cost (padding counted where the encoder pads) stays within the budget. How much may wait is the encoder core's
window rule (protocol/encoder.py)."""
from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from .tokenize.batch import TokenBatch


class TokenBudgetBatcher:
    """Arriving batches are kept as they are; only an index of their rows (source batch, row, length) is sorted.
    A pop copies the tokens of the rows it takes and nothing else. (Re-sorting the whole window's tokens on every
    pop measured 27M tokens/s on one core of the CPU box: no faster than the H100 it feeds.)"""

    READY_FRACTION = 0.5        # a batch this full (and within the budget) passes through as it is
    # Longest-first from a window that keeps filling would leave a unit's short rows waiting to the job's end, and
    # with them every part's completion: a CPU job of 6,000 rows committed nothing until all of it was encoded. Once
    # this many later batches have arrived (about an encoder window's worth), the oldest batch's rows go next,
    # longest first among themselves.
    OVERTAKEN_AT_MOST = 8

    def __init__(self, max_batch_tokens: int, cost: Callable[[np.ndarray], int], pass_through: bool = False):
        """pass_through: take arriving batches that fit the budget and fill at least READY_FRACTION of it as
        they are (for an encoder that does not pad, where sorting by length buys next to nothing)."""
        self.max_batch_tokens = max_batch_tokens
        self._cost = cost
        self.pass_through = pass_through
        self._ready: deque[TokenBatch] = deque()
        self._sorted_tokens = 0                      # tokens waiting in the sorted index (not in _ready)
        self._batches: dict[int, TokenBatch] = {}
        self._left: dict[int, int] = {}              # rows of each source batch still waiting
        self._next_id = 0
        self._incoming: list[int] = []               # source batches not yet in the sorted index
        # The sorted index, longest first: source batch id, row within it, length.
        self._src = np.empty(0, np.int64)
        self._row = np.empty(0, np.int64)
        self._len = np.empty(0, np.int64)
        self.tokens = 0
        self.rows = 0

    def add(self, batch: TokenBatch) -> None:
        if batch.num_rows and self.pass_through and \
                self.READY_FRACTION * self.max_batch_tokens <= self._cost(batch.lengths) <= self.max_batch_tokens:
            self._ready.append(batch)
            self.tokens += batch.num_tokens
            self.rows += batch.num_rows
        elif batch.num_rows:
            self._sorted_tokens += batch.num_tokens
            self._batches[self._next_id] = batch
            self._left[self._next_id] = batch.num_rows
            self._incoming.append(self._next_id)
            self._next_id += 1
            self.tokens += batch.num_tokens
            self.rows += batch.num_rows

    def _merge_incoming(self) -> None:
        srcs, rows, lens = [self._src], [self._row], [self._len]
        for b in self._incoming:
            n = self._batches[b].num_rows
            srcs.append(np.full(n, b, np.int64))
            rows.append(np.arange(n, dtype=np.int64))
            lens.append(self._batches[b].lengths.astype(np.int64))
        self._incoming = []
        src, row, length = np.concatenate(srcs), np.concatenate(rows), np.concatenate(lens)
        # Stable: arrival order among equal lengths, so output is deterministic.
        order = np.argsort(-length, kind="stable")
        self._src, self._row, self._len = src[order], row[order], length[order]

    def pop(self) -> TokenBatch | None:
        """The next batch: a ready batch as it arrived, or the longest rows waiting, as many as fit the budget (at
        least one), longest first."""
        if not self.rows:
            return None
        # Ready batches go first, in arrival order, unless the re-batched rows already make up a full batch.
        if self._ready and self._sorted_tokens < self.max_batch_tokens:
            out = self._ready.popleft()
            self.tokens -= out.num_tokens
            self.rows -= out.num_rows
            return out
        if self._incoming:
            self._merge_incoming()
        overdue = self._overdue()
        lengths = self._len if overdue is None else self._len[overdue]
        # Sorted longest-first, so the cost of the prefix [0, n) is monotone in n: binary search the cut.
        lo, hi = 1, len(lengths)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._cost(lengths[:mid]) <= self.max_batch_tokens:
                lo = mid
            else:
                hi = mid - 1
        if overdue is None:
            src, row = self._src[:lo], self._row[:lo]
            self._src, self._row, self._len = self._src[lo:], self._row[lo:], self._len[lo:]
        else:
            src, row = self._src[overdue[:lo]], self._row[overdue[:lo]]
            keep = np.ones(len(self._src), dtype=bool)
            keep[overdue[:lo]] = False
            self._src, self._row, self._len = self._src[keep], self._row[keep], self._len[keep]
        parts, positions = [], []
        for b in np.unique(src):
            picked = np.flatnonzero(src == b)
            parts.append(self._batches[int(b)].take(row[picked]))
            positions.append(picked)
            self._left[int(b)] -= len(picked)
            if not self._left[int(b)]:
                del self._left[int(b)], self._batches[int(b)]
        grouped = TokenBatch.concat(parts)
        # Back to longest-first: output position k is grouped row where[k].
        where = np.empty(lo, np.int64)
        where[np.concatenate(positions)] = np.arange(lo)
        out = grouped.take(where) if len(parts) > 1 else grouped
        self._sorted_tokens -= out.num_tokens
        self.tokens -= out.num_tokens
        self.rows -= out.num_rows
        return out


    def _overdue(self) -> np.ndarray | None:
        """Positions in the sorted index of the oldest waiting batch's rows, once OVERTAKEN_AT_MOST later batches
        have arrived; else None."""
        oldest = next(iter(self._left), None)
        if oldest is None or self._next_id - oldest <= self.OVERTAKEN_AT_MOST:
            return None
        return np.flatnonzero(self._src == oldest)


class BatchAssembler:
    """The tokenizer's side of encoder-ready batches. The rows of one unit, tokenized chunk by chunk, leave in
    batches of at most `batch_tokens` real tokens (at least one row), cut at row boundaries in input order, so an
    encoder that does not pad encodes each batch as it arrives instead of re-batching it (the encoder's batcher
    passes such batches through). The rest of a unit leaves as one smaller batch when the unit is read.
    batch_tokens 0: every chunk is a batch (a tokenize job's token shards).

    A chunked job's windows of one text stay in one batch (so one encoder rank, which pools them, has them all):
    cuts fall only where a text's first window starts, and a text with more windows than the budget holds leaves
    as one batch of its own, which the encoder rank re-batches."""

    def __init__(self, batch_tokens: int):
        self.batch_tokens = batch_tokens
        self._pending: list[TokenBatch] = []
        self._tokens = 0

    def add(self, batch: TokenBatch) -> list[TokenBatch]:
        """Take a chunk's batch; return the batches now full."""
        if not self.batch_tokens:
            return [batch] if batch.num_rows else []
        if batch.num_rows:
            self._pending.append(batch)
            self._tokens += batch.num_tokens
        out = []
        while self._tokens >= self.batch_tokens:
            joined = TokenBatch.concat(self._pending)
            ends = np.cumsum(joined.lengths)
            cut = max(1, int(np.searchsorted(ends, self.batch_tokens, side="right")))
            if joined.chunks is not None:
                cut = _text_boundary(joined.chunks[:, 0], cut)
            out.append(joined.slice(0, cut))
            rest = joined.slice(cut, joined.num_rows)
            self._pending = [rest] if rest.num_rows else []
            self._tokens = rest.num_tokens
        return out

    def flush(self) -> TokenBatch | None:
        """What is left of the unit, as one batch (None if nothing is)."""
        rest = TokenBatch.concat(self._pending) if self._pending else None
        self.clear()
        return rest

    def clear(self) -> None:
        self._pending, self._tokens = [], 0


def _text_boundary(chunk_numbers: np.ndarray, cut: int) -> int:
    """The last cut at or before `cut` that starts a text (a row whose window number is 0), else the first one
    after it (or the end)."""
    starts = np.flatnonzero(chunk_numbers == 0)
    starts = np.append(starts[starts > 0], len(chunk_numbers))
    at_or_before = starts[starts <= cut]
    return int(at_or_before[-1]) if len(at_or_before) else int(starts[0])
