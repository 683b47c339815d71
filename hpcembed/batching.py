"""Token-budget batch assembly: rows wait and leave longest-first, in batches whose cost (padding counted where the
encoder pads) stays within the budget. How much may wait is the encoder core's window rule
(protocol/encoder.py)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .tokenize.batch import TokenBatch


class TokenBudgetBatcher:
    """Arriving batches are kept as they are; only an index of their rows (source batch, row, length) is sorted.
    A pop copies the tokens of the rows it takes and nothing else. (Re-sorting the whole window's tokens on every
    pop measured 27M tokens/s on one core of the CPU box: no faster than the H100 it feeds.)"""

    def __init__(self, max_batch_tokens: int, cost: Callable[[np.ndarray], int]):
        self.max_batch_tokens = max_batch_tokens
        self._cost = cost
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
        if batch.num_rows:
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
        """The next batch: the longest rows waiting, as many as fit the budget (at least one), longest first."""
        if not self.rows:
            return None
        if self._incoming:
            self._merge_incoming()
        lengths = self._len
        # Sorted longest-first, so the cost of the prefix [0, n) is monotone in n: binary search the cut.
        lo, hi = 1, len(lengths)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._cost(lengths[:mid]) <= self.max_batch_tokens:
                lo = mid
            else:
                hi = mid - 1
        src, row = self._src[:lo], self._row[:lo]
        self._src, self._row, self._len = self._src[lo:], self._row[lo:], self._len[lo:]
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
        self.tokens -= out.num_tokens
        self.rows -= out.num_rows
        return out
