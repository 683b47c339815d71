"""The conductor's committed units: its own records and sub-conductors' batches as they came (io/ledger.py writes
them; protocol/conductor.py keeps them here)."""
from __future__ import annotations

import json
from itertools import repeat

from .ledger import CommittedUnit


class RecordedUnit:
    """A unit a sub-conductor committed: the counts the conductor keeps for every unit, and its ledger line (UTF-8
    bytes), parsed only where the rest is needed (the manifest's shard list, a drop). Parsing each line on arrival
    would cost the conductor more than all else it does per unit."""
    __slots__ = ("unit", "rows", "rejected", "line")

    def __init__(self, unit: int, rows: int, rejected: int, line: bytes):
        self.unit, self.rows, self.rejected, self.line = unit, rows, rejected, line

    def parse(self) -> CommittedUnit:
        return CommittedUnit.from_record(json.loads(self.line))


class CommittedUnits:
    """The conductor's committed units, by number: records of its own (CommittedUnit, or parsed on demand) and
    sub-conductors' batches (UnitsCommitted) kept as they came. A batch is taken as it is, its units indexed only
    when one is looked up: rank 0 takes most of a large job's batches in its last moments, when nobody looks (at 1000
    nodes a third of its time on them went to the index, bench/notes/scale_out.md). A unit's RecordedUnit is made
    only when someone asks for it; `items` goes through each batch's lines once."""

    def __init__(self, records: dict[int, CommittedUnit]):
        self._records: dict[int, CommittedUnit | RecordedUnit] = dict(records)
        self._batches: list = []
        self._batched = 0                            # units in _batches
        self._batch_of: dict[int, int] = {}          # unit -> index in _batches, for the first _indexed batches
        self._indexed = 0
        self._parsed: dict[int, CommittedUnit] = {}  # batch units whose whole record was asked for

    def add_batch(self, batch) -> None:
        """`batch`: a UnitsCommitted (its `records`, a ledger line per unit, and `counts`: unit, rows, rejected
        per unit)."""
        self._batches.append(batch)
        self._batched += len(batch.counts) // 3

    def _index(self) -> dict[int, int]:
        for k in range(self._indexed, len(self._batches)):
            self._batch_of.update(zip(self._batches[k].counts[0::3], repeat(k)))
        self._indexed = len(self._batches)
        return self._batch_of

    def __setitem__(self, unit: int, record: CommittedUnit | RecordedUnit) -> None:
        (self._parsed if unit in self._index() else self._records)[unit] = record

    def __getitem__(self, unit: int) -> CommittedUnit | RecordedUnit:
        record = self._records.get(unit) or self._parsed.get(unit)
        if record is not None:
            return record
        batch = self._batches[self._index()[unit]]
        k = batch.counts[0::3].index(unit)
        # "\n" only: json.dumps(ensure_ascii=False) leaves U+2028 and the like in a line, where splitlines cuts.
        line = batch.records.split(b"\n")[k]
        return RecordedUnit(unit, batch.counts[3 * k + 1], batch.counts[3 * k + 2], line)

    def __contains__(self, unit: int) -> bool:
        return unit in self._records or unit in self._index()

    def __len__(self) -> int:
        return len(self._records) + self._batched

    def __iter__(self):
        yield from self._records
        for batch in self._batches:
            yield from batch.counts[0::3]

    def items(self):
        yield from self._records.items()
        for batch in self._batches:
            counts, lines = batch.counts, batch.records.split(b"\n")
            for k in range(0, len(counts), 3):
                if counts[k] in self._parsed:
                    yield counts[k], self._parsed[counts[k]]
                else:
                    yield counts[k], RecordedUnit(counts[k], counts[k + 1], counts[k + 2], lines[k // 3])

    def values(self):
        return (record for _, record in self.items())

    def whole_records(self):
        """Every committed unit's CommittedUnit, a batch's lines split once (the manifest's shard list: looked up
        one by one, each lookup split its whole batch, about 0.65 ms a unit at 1000 nodes)."""
        for _, record in self.items():
            yield record.parse() if isinstance(record, RecordedUnit) else record
