"""Token-budget batch assembly: rows wait in a bounded window and leave longest-first, in batches whose cost
(padding counted where the encoder pads) stays within the budget."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .tokenize.batch import TokenBatch


class TokenBudgetBatcher:
    def __init__(self, max_batch_tokens: int, window_tokens: int, cost: Callable[[np.ndarray], int]):
        self.max_batch_tokens = max_batch_tokens
        self.window_tokens = window_tokens
        self._cost = cost
        self._incoming: list[TokenBatch] = []
        self._sorted: TokenBatch | None = None   # rows already ordered longest-first
        self.tokens = 0
        self.rows = 0

    @property
    def full(self) -> bool:
        return self.tokens >= self.window_tokens

    @property
    def has_full_batch(self) -> bool:
        return self.tokens >= self.max_batch_tokens

    def add(self, batch: TokenBatch) -> None:
        if batch.num_rows:
            self._incoming.append(batch)
            self.tokens += batch.num_tokens
            self.rows += batch.num_rows

    def pop(self) -> TokenBatch | None:
        """The next batch: the longest rows waiting, as many as fit the budget (at least one)."""
        if not self.rows:
            return None
        if self._incoming:
            parts = ([self._sorted] if self._sorted is not None else []) + self._incoming
            merged = TokenBatch.concat(parts)
            # Stable sort keeps arrival order among equal lengths, so output is deterministic.
            self._sorted = merged.take(np.argsort(-merged.lengths, kind="stable"))
            self._incoming = []
        assert self._sorted is not None
        lengths = self._sorted.lengths
        # Sorted longest-first, so the cost of the prefix [0, n) is monotone in n: binary search the cut.
        lo, hi = 1, len(lengths)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._cost(lengths[:mid]) <= self.max_batch_tokens:
                lo = mid
            else:
                hi = mid - 1
        out = self._sorted.take(np.arange(lo))
        rest = len(lengths) - lo
        self._sorted = self._sorted.take(np.arange(lo, len(lengths))) if rest else None
        self.tokens -= out.num_tokens
        self.rows -= out.num_rows
        return out
