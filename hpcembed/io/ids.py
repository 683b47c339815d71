"""Duplicate-id detection over a whole job.

Keys are 128-bit BLAKE2 digests of the ids (a false match is ~1e-20 likely at a billion rows), mapped to where
the id was first seen so the error can name both places. Memory is ~150 bytes per row in this process.
"""
from __future__ import annotations

import hashlib

from ..errors import InputError


class IdRegistry:
    def __init__(self) -> None:
        self._seen: dict[bytes, tuple[str, int]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, path: str, rows, ids: list[str]) -> list[tuple[int, InputError]]:
        """Record ids; return (position in `ids`, error) for each one that repeats an id seen before."""
        dups: list[tuple[int, InputError]] = []
        seen = self._seen
        for k, row_id in enumerate(ids):
            key = hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            first = seen.get(key)
            if first is None:
                seen[key] = (path, int(rows[k]))
                continue
            where = "earlier in this file" if first[0] == path else f"in {first[0]}"
            dups.append((k, InputError(path, f"duplicate id, first seen {where} at row {first[1]}",
                                       int(rows[k]), row_id)))
        return dups
