"""Duplicate-id detection over a whole job.

Keys are 128-bit BLAKE2 digests of the ids (a false match is ~1e-20 likely at a billion rows), mapped to where
the id was first seen so the error can name both places. Memory is ~150 bytes per row in the process that read
the row.

Each tokenizer rank checks its own rows as it reads them. Ids repeated across tokenizer ranks are found after
reading, by one all-to-all exchange that sends every digest to the rank owning its hash partition
(`find_cross_duplicates`): no rank ever holds more than its share, and the conductor sees only the duplicates.
"""
from __future__ import annotations

import hashlib

import numpy as np

from ..errors import InputError

# One exchanged record: the digest, and where the row is (the first occurrence is the smallest (file, row)).
RECORD = np.dtype([("digest", "V16"), ("file", "<i8"), ("row", "<i8"), ("unit", "<i8")])


def id_digest(row_id: str) -> bytes:
    return hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class SoloAlltoall:
    """The exchange when one tokenizer reads everything: it owns every partition."""
    size = 1

    def __call__(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        return parts

    def any(self, flag: bool) -> bool:
        return bool(flag)


class IdRegistry:
    def __init__(self) -> None:
        self._seen: dict[bytes, tuple[int, int, int]] = {}     # digest -> (file index, row, unit)
        self._paths: dict[int, str] = {}
        self._committed: list[np.ndarray] = []                  # RECORDs of rows earlier runs committed

    def add_committed(self, ids: list[str], unit: int, first_position: int) -> None:
        """Ids already in the output (a resumed job). They sort before every row read now (file -1), so a
        repeat among the new rows is the one dropped; `first_position` orders them among themselves."""
        records = np.empty(len(ids), dtype=RECORD)
        records["digest"] = np.frombuffer(b"".join(id_digest(i) for i in ids), dtype="V16") if ids else []
        records["file"], records["unit"] = -1, unit
        records["row"] = np.arange(first_position, first_position + len(ids))
        self._committed.append(records)

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, path: str, rows, ids: list[str], file_index: int = 0, unit: int = 0
            ) -> list[tuple[int, InputError]]:
        """Record ids; return (position in `ids`, error) for each one that repeats an id seen before."""
        dups: list[tuple[int, InputError]] = []
        seen = self._seen
        self._paths.setdefault(file_index, path)
        for k, row_id in enumerate(ids):
            key = id_digest(row_id)
            first = seen.get(key)
            if first is None:
                seen[key] = (file_index, int(rows[k]), unit)
                continue
            where = "earlier in this file" if first[0] == file_index else f"in {self._paths[first[0]]}"
            dups.append((k, InputError(path, f"duplicate id, first seen {where} at row {first[1]}",
                                       int(rows[k]), row_id)))
        return dups

    def partitions(self, parts: int) -> list[np.ndarray]:
        """Every recorded id as a RECORD, split by owner: digest (low 8 bytes) modulo `parts`."""
        records = np.empty(len(self._seen), dtype=RECORD)
        digests = b"".join(self._seen)
        records["digest"] = np.frombuffer(digests, dtype="V16")
        if len(self._seen):
            where = np.array(list(self._seen.values()), dtype=np.int64)
            records["file"], records["row"], records["unit"] = where[:, 0], where[:, 1], where[:, 2]
        records = np.concatenate([records] + self._committed)
        owner = np.frombuffer(records["digest"].tobytes(), dtype="<u8")[::2] % parts
        return [records[owner == p] for p in range(parts)]


def duplicates_among(records: np.ndarray) -> list[tuple[np.void, np.void]]:
    """(duplicate, first occurrence) for every record whose digest also appears at a smaller (file, row)."""
    if len(records) < 2:
        return []
    keys = records["digest"].view("S16")
    order = np.lexsort((records["row"], records["file"], keys))
    ordered, ordered_keys = records[order], keys[order]
    repeat = np.flatnonzero(ordered_keys[1:] == ordered_keys[:-1]) + 1
    out = []
    for k in repeat:
        first = k - 1
        while first > 0 and ordered_keys[first - 1] == ordered_keys[k]:
            first -= 1
        out.append((ordered[k], ordered[first]))
    return out


def find_cross_duplicates(registry: IdRegistry, alltoall) -> list[tuple[np.void, np.void]]:
    """Run on every tokenizer rank together. `alltoall(list of arrays, one per peer) -> arrays received`."""
    received = alltoall(registry.partitions(alltoall.size))
    return duplicates_among(np.concatenate(received))
