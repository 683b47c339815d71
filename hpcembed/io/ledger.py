"""The ledger: which work units of a job are committed, kept in the output directory by the conductor.

`_ledger.jsonl` is append-only. Its first line is the job's fingerprint (inputs, model, pooling, dtype, max
length, columns, unit size), then one record per event:
    {"kind": "unit", "unit": 7, "shards": {"part-00000007-r00002.parquet": 4096}, "tokens": ..., "rejects": [...],
     "files": {"part-00000007-r00002.parquet": [6340123, "<BLAKE2b-128 hex>"]}}
    {"kind": "drop", "unit": 7, "shard": "part-...", "removed": 1, "rejects": [...], "file": [bytes, checksum],
     "rows": 4095}
    (a drop: ids repeated across ranks removed from a committed shard, which was rewritten; "rows" is what the
    shard holds now, which a chunked shard's removed ids took several rows each from)
    {"kind": "calibration", "ranges": [[min, ...], [max, ...]]}
    (int8/uint8 output: the ranges its shards are quantized with, recorded before the first commit)
    {"kind": "split", "unit": 7, "at": 31000}
    (tail stealing, protocol/stealing.py: unit 7 ends before row 31000, and a piece (io/sources.split_unit) holds
    the rest; recorded before either is committed, and applied in order to a resumed job's plan)
The shards' sizes and checksums let a rerun verify the output before trusting it (io/writer.py).
On an object store, which cannot append, `_ledger.jsonl` holds the header and the records of the last compaction,
and later records go to segment objects `_ledger.jsonl.<generation>.<n>`, one per flush, read in order of n up to
the first gap; a compaction writes the next generation's `_ledger.jsonl` whole and deletes the older segments
(the header names its generation, so a segment a crash left behind is never read into another generation).
A unit counts as done only once its record is in the ledger; shards are renamed into place before the record is
written, so a record never names a shard that is not there. A crash can leave shards with no record (they are
deleted and the unit redone) or a torn last line (ignored). Writes are flushed at once and fsynced at most once a
second, on a thread of their own (an object store's segments: every SEGMENT_SECONDS): a record lost to a crash
costs only the redo of its unit, and a per-record fsync would make a parallel file system the bottleneck at
thousands of commits per second.

Rejects live in the ledger with the unit that produced them, so `_rejects.jsonl` can always be rebuilt to match
exactly the committed units, whatever a crash left in it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .store import open_dir

LEDGER = "_ledger.jsonl"
FSYNC_INTERVAL = 1.0
SEGMENT_SECONDS = 2.0
# Records go to the file in pieces of at most this many bytes: a sub-conductor's merged batch is about 740 KB, and
# one write() of it took 3.9-4.1 ms on the CPU box where 64 KiB pieces took 0.5 ms, with a small or a large heap
# alike (bench/notes/scale_out.md, session 22).
WRITE_PIECE = 1 << 16


def is_segment(name: str) -> bool:
    return name.startswith(LEDGER + ".")


@dataclass
class CommittedUnit:
    unit: int
    shards: dict[str, int]          # shard name -> rows it holds now
    tokens: int
    rejected: int = 0               # rows rejected (a record can stand for many: a file that broke mid-unit)
    rejects: list[dict] = field(default_factory=list)
    files: dict[str, list] = field(default_factory=dict)   # shard name -> [bytes, checksum] (none before 0.3)

    @property
    def rows(self) -> int:
        return sum(self.shards.values())

    @classmethod
    def from_record(cls, rec: dict) -> "CommittedUnit":
        return cls(rec["unit"], dict(rec["shards"]), rec["tokens"], rec.get("rejected", 0),
                   list(rec.get("rejects", [])), dict(rec.get("files", {})))


@dataclass
class LedgerState:
    fingerprint: dict
    header_rejects: list[dict]      # files found unreadable when the job was planned (--on-invalid skip)
    units: dict[int, CommittedUnit]
    ranges: list | None = None      # int8/uint8 output's calibration ranges [2][dim]
    splits: list = field(default_factory=list)     # [unit, cut] of each split, in the order made

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units.values())

    @property
    def rejected(self) -> int:
        """Rejected rows of the committed units (an unreadable file's rows were never planned)."""
        return sum(u.rejected for u in self.units.values())

    def all_rejects(self) -> list[dict]:
        out = list(self.header_rejects)
        for unit in sorted(self.units):
            out.extend(self.units[unit].rejects)
        return out


def model_identity(model_dir: str, cache: Path | None = None, module_dirs: tuple = ()) -> str:
    """A digest of the model's configuration files and weights, by content: two models that differ in one
    weight differ here. Weight digests are cached in `cache` (io/digest.py), so only the first run reads them.
    `module_dirs`: directories of modules after the transformer (Dense), digested the same way after it."""
    from .digest import file_content_digest
    h = hashlib.sha256()
    for k, directory in enumerate((model_dir, *module_dirs)):
        root = Path(directory)
        for p in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
            h.update((f"{k}/" if k else "").encode() + p.name.encode())
            h.update(p.read_bytes() if p.suffix == ".json" else file_content_digest(p, cache).encode())
    return h.hexdigest()[:16]


def describe_difference(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for k in keys:
        if k == "inputs":
            before = {i[0]: i for i in old.get(k, [])}
            after = {i[0]: i for i in new.get(k, [])}
            changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
            parts.append(f"inputs ({len(changed)} files differ, e.g. {changed[0]})" if changed else "inputs")
        else:
            parts.append(f"{k} ({old.get(k)!r} then, {new.get(k)!r} now)")
    return ", ".join(parts)


class Ledger:
    def __init__(self, directory):
        """`directory`: a path or URL, or the store (io/store.py) of one."""
        self.dir = directory if hasattr(directory, "appendable") else open_dir(directory)
        self.location = self.dir.file(LEDGER)
        self.generation = 0                 # an object store's: the segments that belong to the header
        self._fh = None
        self._last_sync = 0.0
        # When to make records durable is decided by this clock: the simulation (scaling/sim.py) sets its virtual
        # time, so rank 0 pays an fsync once a simulated second, as a real one does, not once a second of its own run.
        self.clock = time.monotonic
        self._segment: list[bytes] = []     # records not yet in a segment
        self._segments = 0
        # The fsync (or an object store's segment write) runs on a thread of its own, one at a time and in order,
        # so rank 0's handler does not wait for the disk: a parallel file system's fsync can take tens of ms, and at
        # the end of a job at 1000 nodes each ms of rank 0 is the job's (bench/notes/scale_out.md, session 22).
        self._syncer: ThreadPoolExecutor | None = None
        self._syncing: Future | None = None

    def exists(self) -> bool:
        return self.dir.exists(LEDGER)

    def _read(self) -> list[bytes]:
        lines = self.dir.read(LEDGER).split(b"\n")
        if self.dir.appendable:
            return lines
        try:
            self.generation = json.loads(lines[0]).get("generation", 0)
        except (ValueError, AttributeError):
            return lines
        prefix = f"{LEDGER}.{self.generation}."
        numbers = sorted(int(n[len(prefix):]) for n in self.dir.names()
                         if n.startswith(prefix) and n[len(prefix):].isdigit())
        numbers = [n for k, n in enumerate(numbers) if n == k + 1]     # up to the first gap
        with ThreadPoolExecutor(max_workers=8) as pool:
            for data in pool.map(lambda n: self.dir.read(f"{prefix}{n:08d}"), numbers):
                lines += data.split(b"\n")
        self._segments = len(numbers)
        return lines

    def load(self) -> LedgerState:
        lines = self._read()
        records = []
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if any(rest.strip() for rest in lines[k + 1:]):
                    raise ConfigError(f"{self.location} line {k + 1} is corrupt; the output directory cannot be "
                                      "resumed (pass --overwrite to start again)") from None
                break                      # a torn last line: the write a crash interrupted
        if not records or records[0].get("kind") != "job":
            raise ConfigError(f"{self.location} has no job header; pass --overwrite to start again")
        state = LedgerState(records[0]["fingerprint"], records[0].get("rejects", []), {})
        for rec in records[1:]:
            if rec["kind"] == "unit":
                state.units[rec["unit"]] = CommittedUnit.from_record(rec)
            elif rec["kind"] == "calibration":
                state.ranges = rec["ranges"]
            elif rec["kind"] == "split":
                state.splits.append([rec["unit"], rec["at"]])
            elif rec["kind"] == "drop":
                unit = state.units.get(rec["unit"])
                if unit is not None and rec["shard"] in unit.shards:
                    unit.shards[rec["shard"]] = rec.get("rows", unit.shards[rec["shard"]] - rec["removed"])
                    unit.rejected += rec["removed"]
                    unit.rejects.extend(rec.get("rejects", []))
                    if "file" in rec:
                        unit.files[rec["shard"]] = rec["file"]
        return state

    def write_fresh(self, state: LedgerState) -> None:
        """Start the ledger over (a new job, or a resumed one compacted to its valid records), written whole."""
        self.close()
        header = {"kind": "job", "fingerprint": state.fingerprint, "rejects": state.header_rejects}
        if not self.dir.appendable:
            older = [n for n in self.dir.names() if is_segment(n)]
            self.generation = 1 + max([self.generation] + [int(n.split(".")[2]) for n in older
                                                           if n.split(".")[2].isdigit()])
            header["generation"] = self.generation
        lines = [json.dumps(header, ensure_ascii=False) + "\n"]
        if state.ranges is not None:
            lines.append(self._calibration_line(state.ranges))
        lines += [self.split_line(unit, cut) for unit, cut in state.splits]
        lines += [self.unit_line(state.units[unit]) for unit in sorted(state.units)]
        self.dir.write(LEDGER, "".join(lines).encode())
        if not self.dir.appendable:
            for name in older:
                self.dir.delete(name)
            self._segments = 0

    @staticmethod
    def unit_line(unit: CommittedUnit) -> str:
        return json.dumps({"kind": "unit", "unit": unit.unit, "shards": unit.shards, "tokens": unit.tokens,
                           "rejected": unit.rejected, "rejects": unit.rejects, "files": unit.files},
                          ensure_ascii=False) + "\n"

    @staticmethod
    def _calibration_line(ranges: list) -> str:
        return json.dumps({"kind": "calibration", "ranges": ranges}) + "\n"

    @staticmethod
    def split_line(unit: int, cut: int) -> str:
        # As json.dumps writes it, formatted directly: rank 0 writes one per split, and json.dumps is the slower.
        return f'{{"kind": "split", "unit": {int(unit)}, "at": {int(cut)}}}\n'

    def record_split(self, unit: int, cut: int) -> None:
        self._append(self.split_line(unit, cut))

    def record_calibration(self, ranges: list) -> None:
        self._append(self._calibration_line(ranges))

    def commit_units(self, units: list[CommittedUnit]) -> None:
        self.append_lines([self.unit_line(u) for u in units])

    def append_lines(self, lines: list[str | bytes]) -> None:
        """Unit records (unit_line) in one write: one unit's, or a sub-conductor's batch (UTF-8 bytes)."""
        if any(lines):
            self._append(*lines)

    def record_drop(self, unit: int, shard: str, removed: int, rejects: list[dict], file: list | None = None,
                    rows: int = -1) -> None:
        """`removed`: ids; `file`: the rewritten shard's [bytes, checksum]; `rows`: the rows it holds now."""
        record = {"kind": "drop", "unit": unit, "shard": shard, "removed": removed, "rejects": rejects}
        if rows >= 0:
            record["rows"] = rows
        if file is not None:
            record["file"] = file
        self._append(json.dumps(record, ensure_ascii=False) + "\n")

    def _append(self, *lines: str | bytes) -> None:
        """Lines (each ending in a newline) written after the records so far, in one flush. A sub-conductor's batch
        comes as UTF-8 bytes and is written as it came: no text layer to encode it in a copy (rank 0's work per unit
        at the end of a job at 1000 nodes, bench/ledger_write.py)."""
        data = [line.encode() if isinstance(line, str) else line for line in lines]
        if not self.dir.appendable:
            self._segment.extend(data)
        else:
            if self._fh is None:
                self._fh = open(self.dir.path / LEDGER, "ab")
            for chunk in data:
                view = memoryview(chunk)
                for start in range(0, len(view), WRITE_PIECE):
                    self._fh.write(view[start: start + WRITE_PIECE])
            self._fh.flush()
        self.tick()

    def tick(self) -> None:
        """Make the records so far durable if it is time and the last sync is done: fsync the file, or write an
        object store's segment, on the sync thread."""
        if self._syncing is not None:
            if not self._syncing.done():
                return
            self._wait_for_sync()          # a failed sync fails the job here rather than pass unseen
        now = self.clock()
        if not self.dir.appendable:
            if self._segment and now - self._last_sync >= SEGMENT_SECONDS:
                self._syncing = self._sync_thread().submit(self.dir.write, *self._take_segment())
                self._last_sync = now
        elif self._fh is not None and now - self._last_sync >= FSYNC_INTERVAL:
            self._syncing = self._sync_thread().submit(os.fsync, self._fh.fileno())
            self._last_sync = now

    def _sync_thread(self) -> ThreadPoolExecutor:
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sync")
        return self._syncer

    def _wait_for_sync(self) -> None:
        if self._syncing is not None:
            self._syncing, done = None, self._syncing
            done.result()

    def _take_segment(self) -> tuple[str, bytes]:
        self._segments += 1
        data = b"".join(self._segment)
        self._segment.clear()
        return f"{LEDGER}.{self.generation}.{self._segments:08d}", data

    def close(self) -> None:
        self._wait_for_sync()
        if self._segment:
            self.dir.write(*self._take_segment())
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        if self._syncer is not None:
            self._syncer.shutdown()
            self._syncer = None
