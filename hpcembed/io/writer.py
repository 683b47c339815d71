"""The output directory: Parquet shards (id, embedding), _rejects.jsonl, _ledger.jsonl, _manifest.json, then
_SUCCESS.

Shards are written to a temporary name, fsynced and renamed, so a shard that exists is complete. The ledger
(io/ledger.py) says which units are committed, with each shard's size and checksum; opening a directory that holds
a ledger of the same job verifies its shards and resumes it (`_lock`, io/lock.py, keeps a second job out).
_SUCCESS is written last, and only by a job in which every input row has an output row or a recorded reject.
The directory may be a prefix of an object store (io/store.py): the same files, each written whole as one object.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..arrow_arrays import numeric
from ..errors import ConfigError
from .digest import checksum, file_checksum_matches
from .ledger import LEDGER, Ledger, LedgerState, describe_difference, is_segment
from . import location, npy
from .lock import output_lock
from .mark import WRITTEN_BY, written_by_hpcembed
from .quantize import OUTPUT_DTYPES, convert, stored_width
from .store import open_dir

log = logging.getLogger("hpcembed")

# Underscore names are skipped by pyarrow.dataset and Spark, so DIR stays readable as one Parquet dataset.
MANIFEST, SUCCESS, REJECTS = "_manifest.json", "_SUCCESS", "_rejects.jsonl"


def shard_name(unit: int, rank: int) -> str:
    return f"part-{unit:08d}-r{rank:05d}.parquet"


# A chunked job's rows (--chunk-tokens) say which window of the text they are and which characters it covers.
CHUNK_FIELDS = [("chunk", pa.int32()), ("start_char", pa.int64()), ("end_char", pa.int64())]


# Each row's content digest (io/digest.py row_digests), where the job digests rows.
DIGEST_FIELD = ("digest", pa.binary(16))


def output_schema(dim: int, dtype: str = "float32", chunked: bool = False, digests: bool = False) -> pa.Schema:
    return pa.schema([("id", pa.string()), *([DIGEST_FIELD] if digests else []), *(CHUNK_FIELDS if chunked else []),
                      ("embedding", pa.list_(OUTPUT_DTYPES[dtype], stored_width(dim, dtype)))], metadata=WRITTEN_BY)


def shard_ids(path: str) -> list[str]:
    """The ids a shard (a path or URL) holds, each once: a chunked shard's first window of each text stands for
    it."""
    names = pq.ParquetFile(location.open_arrow(path)).schema_arrow.names
    table = pq.read_table(location.open_arrow(path), columns=["id", "chunk"] if "chunk" in names else ["id"])
    if "chunk" in names:
        table = table.filter(pc.equal(table.column("chunk"), 0))
    return table.column("id").to_pylist()


def parquet_rows(path: str) -> int:
    return pq.ParquetFile(location.open_arrow(path)).metadata.num_rows


class ShardFile(NamedTuple):
    """A shard as the ledger records it: its size and a checksum of its bytes (io/digest.checksum), and rows;
    `companion`: its `.npy`'s size and checksum (--output-format npy, io/npy.py)."""
    size: int
    digest: str
    rows: int = -1
    companion: tuple = ()

    @property
    def record(self) -> list:
        """The ledger's `files` entry: [bytes, checksum], then the .npy's where there is one."""
        return [self.size, self.digest, *self.companion]


class OutputDir:
    """An embedding job's output (Parquet shards `part-*.parquet`), or with `tokens=True` a tokenize job's
    (Arrow IPC shards `tokens-*.arrow`, io/tokens.py). Everything else is the same."""

    def __init__(self, path: str, tokens: bool = False, output_dtype: str = "float32",
                 ranges: np.ndarray | None = None, output_format: str = "parquet"):
        """`ranges`: int8 and uint8 output's calibration ranges [2, dim] (launch/calibrate.py); `output_format` npy:
        embeddings in a `.npy` beside each shard (io/npy.py)."""
        self.dir = open_dir(path)
        self.location = self.dir.location
        self.output_dtype, self.ranges, self.output_format = output_dtype, ranges, output_format
        self.lock = output_lock(self.dir)
        self._rejects: list[str] = []        # an object store's _rejects.jsonl, rewritten whole (flush)
        self._rejects_dirty = False
        self._ledger: Ledger | None = None
        if tokens:
            if not self.dir.appendable:
                raise ConfigError(f"output {path}: token shards are written to a local directory only")
            from .tokens import token_shard_rows
            self.shard_prefix, self.shard_suffix, self.shard_rows = "tokens-", ".arrow", token_shard_rows
        else:
            self.shard_prefix, self.shard_suffix, self.shard_rows = "part-", ".parquet", parquet_rows

    def _is_shard(self, name: str) -> bool:
        return name.startswith(self.shard_prefix) and name.endswith(self.shard_suffix)

    def _is_companion(self, name: str) -> bool:
        return name.startswith(self.shard_prefix) and name.endswith(".npy")

    def ours(self) -> list[str]:
        """Files an hpcembed job leaves here."""
        temporary = ("." + self.shard_prefix, "._")
        return [n for n in self.dir.names() if n in (MANIFEST, SUCCESS, REJECTS, LEDGER) or is_segment(n)
                or n.startswith(temporary) or self._is_shard(n) or self._is_companion(n)]

    def file(self, name: str) -> str:
        """A file of the directory, as a path or URL (io/location.py opens either)."""
        return self.dir.file(name)

    def ledger(self) -> Ledger:
        """The directory's ledger: one object, which knows the generation its segments belong to."""
        if self._ledger is None:
            self._ledger = Ledger(self.dir)
        return self._ledger

    def open(self, fingerprint: dict, header_rejects: list[dict], overwrite: bool) -> tuple[str, LedgerState]:
        """Take the directory's lock (io/lock.py; the caller releases it when the job ends) and make the
        directory ready for this job: 'fresh' (new ledger), 'resume' (the committed units of an earlier run of
        the same job kept, everything else cleared), or 'complete' (nothing to do)."""
        try:
            self.dir.make()
            self.lock.acquire()
            try:
                return self._open(fingerprint, header_rejects, overwrite)
            except BaseException:
                self.lock.release()
                raise
        except PermissionError as exc:
            raise ConfigError(f"cannot write to output directory {self.location}: {exc.strerror} ({exc.filename})") \
                from None
        except OSError as exc:
            raise ConfigError(f"output directory {self.location}: {exc}") from None

    def _open(self, fingerprint: dict, header_rejects: list[dict], overwrite: bool) -> tuple[str, LedgerState]:
        existing = self.ours()
        ledger = self.ledger()
        if existing and overwrite:
            listed = self._ledger_shards(ledger)
            foreign = [n for n in existing
                       if self._is_shard(n) and n not in listed and not written_by_hpcembed(self.file(n))]
            # A .npy is ours beside a shard of ours (an npy header has no room for a mark).
            kept = {n for n in existing if self._is_shard(n) and n not in foreign}
            foreign += [n for n in existing if self._is_companion(n) and self._shard_of(n) not in kept]
            if foreign:
                raise ConfigError(f"--overwrite: output directory {self.location} holds {len(foreign)} files named "
                                  f"like shards that no hpcembed job wrote (e.g. {foreign[0]}); nothing was "
                                  "removed. Move them away, or choose another --output")
            for n in existing:
                self.dir.delete(n)
        elif existing:
            if not ledger.exists():
                raise ConfigError(f"output directory {self.location} holds files of an earlier job but no {LEDGER}, "
                                  "so it cannot be resumed; pass --overwrite to replace them")
            state = ledger.load()
            if state.fingerprint != fingerprint:
                raise ConfigError(f"output directory {self.location} holds the output of a different job (it "
                                  f"differs in {describe_difference(state.fingerprint, fingerprint)}); pass "
                                  "--overwrite to replace it, or choose another --output")
            damaged = self.damaged(state)
            if self.dir.exists(SUCCESS):
                if not damaged:
                    return "complete", state
                self.dir.delete(SUCCESS)
                log.warning("output %s: the output of this complete job is damaged (%d units); they are redone",
                            self.location, len(damaged))
            for number, why in sorted(damaged.items()):
                log.warning("output %s: unit %d is redone: %s", self.location, number, why)
                del state.units[number]
            self._keep_committed(state)
            ledger.write_fresh(state)
            self.rewrite_rejects(state.all_rejects())
            return "resume", state
        state = LedgerState(fingerprint, header_rejects, {})
        ledger.write_fresh(state)
        self.rewrite_rejects(header_rejects)
        return "fresh", state

    def _shard_of(self, companion: str) -> str:
        return companion[: -len(".npy")] + self.shard_suffix

    @staticmethod
    def _ledger_shards(ledger: Ledger) -> set[str]:
        """The shards an existing ledger names (shards from before the mark was written are known this way)."""
        try:
            state = ledger.load() if ledger.exists() else None
        except (ConfigError, OSError, ValueError, KeyError):
            return set()
        return {name for unit in state.units.values() for name in unit.shards} if state else set()

    def damaged(self, state: LedgerState) -> dict[int, str]:
        """The committed units with a shard that is not as the ledger recorded it at commit (missing, another
        size, unreadable, other rows, other bytes), each with why. Every shard is read in full for its checksum,
        on several threads."""
        checks = [(number, name, rows, unit.files.get(name))
                  for number, unit in state.units.items() for name, rows in unit.shards.items()]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            found = list(pool.map(lambda check: self._check_shard(*check[1:]), checks))
        damaged: dict[int, str] = {}
        for (number, name, _, _), why in zip(checks, found):
            if why is not None and number not in damaged:
                damaged[number] = f"shard {name} {why}"
        return damaged

    def _check_shard(self, name: str, rows: int, file: list | None) -> str | None:
        path = self.file(name)
        size = self.dir.size(name)
        if size is None:
            return "is missing"
        if file is not None and size != file[0]:
            return f"has {size} bytes, the ledger says {file[0]}"
        try:
            found = self.shard_rows(path)
        except (OSError, pa.ArrowException) as exc:
            return f"cannot be read ({exc})"
        if found != rows:
            return f"has {found} rows, the ledger says {rows}"
        if file is not None and not file_checksum_matches(path, file[1]):
            return "is not what was written (its checksum differs)"
        if file is not None and len(file) == 4:
            return self._check_companion(npy.companion(name), rows, file[2:])
        return None

    def _check_companion(self, name: str, rows: int, file: list) -> str | None:
        size = self.dir.size(name)
        if size is None:
            return f"has no {name}"
        try:
            found = len(npy.read(self.file(name)))
        except (OSError, ValueError) as exc:
            return f"has a {name} that cannot be read ({exc})"
        if size != file[0] or found != rows:
            return f"has a {name} of {size} bytes and {found} rows, the ledger says {file[0]} and {rows}"
        if not file_checksum_matches(self.file(name), file[1]):
            return f"has a {name} that is not what was written (its checksum differs)"
        return None

    def _keep_committed(self, state: LedgerState) -> None:
        """Delete every shard and temporary file no committed unit names: the uncommitted units are redone from
        scratch."""
        keep = {name for unit in state.units.values() for name in unit.shards}
        keep |= {npy.companion(name) for name in keep}
        stray = [n for n in self.ours() if n.startswith(("." + self.shard_prefix, "._"))
                 or ((self._is_shard(n) or self._is_companion(n)) and n not in keep)]
        for n in stray:
            self.dir.delete(n)
        if stray:
            log.info("output %s: removed %d files of uncommitted units", self.location, len(stray))

    def write_shard(self, name: str, ids: pa.Array, embeddings: np.ndarray, chunks: np.ndarray | None = None,
                    digests: np.ndarray | None = None) -> ShardFile:
        """Write float32 embeddings [rows, dim] as a shard of this output's dtype (whole, io/store.py)
        and return its size and checksum for the ledger. `chunks`: [rows, 3] chunk number and character span of
        a chunked job's rows; `digests`: [rows, 16] their content digests."""
        dim = embeddings.shape[1]
        stored = convert(embeddings, self.output_dtype, self.ranges)
        extra = [] if digests is None else [pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), len(digests), [None, pa.py_buffer(np.ascontiguousarray(digests, np.uint8))])]
        extra += [] if chunks is None else [numeric(chunks[:, 0], pa.int32()), numeric(chunks[:, 1]),
                                            numeric(chunks[:, 2])]
        schema = output_schema(dim, self.output_dtype, chunks is not None, digests is not None)
        if self.output_format == "npy":
            return self._write_table(name, pa.Table.from_arrays([ids, *extra], schema=pa.schema(
                list(schema)[:-1], metadata=schema.metadata)), stored)
        values = numeric(stored.reshape(-1), OUTPUT_DTYPES[self.output_dtype])
        return self._write_table(name, pa.Table.from_arrays(
            [ids, *extra, pa.FixedSizeListArray.from_arrays(values, stored.shape[1])], schema=schema))

    def _write_table(self, name: str, table: pa.Table, array: np.ndarray | None = None) -> ShardFile:
        """The shard, and first its .npy where `array` is given (its rows are the table's)."""
        companion = ()
        if array is not None:
            data = npy.encode(array)
            self._write_file(npy.companion(name), data)
            companion = (len(data), checksum(data))
        # Built in memory, so the checksum is of the bytes written, without reading them back. Float embeddings
        # barely compress (zstd saves ~7%), so only the ids are compressed; they are all distinct, so no
        # dictionary. Statistics only for the ids: min/max over an embedding column serve no filter, and took a
        # quarter of the encoding's time.
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression={"id": "zstd", "embedding": "none"}, use_dictionary=False,
                       row_group_size=64 * 1024, write_statistics=["id"])
        data = sink.getvalue()
        self._write_file(name, data)
        return ShardFile(data.size, checksum(data), table.num_rows, companion)

    def _write_file(self, name: str, data) -> None:
        try:
            self.dir.write(name, data)
        except OSError as exc:
            fix = "Free space (or raise the quota)" if self.dir.appendable else "Check the store and its credentials"
            raise ConfigError(f"cannot write shard {name} in {self.location}: {exc.strerror or exc}. {fix} and run "
                              "the job again: it resumes") from None

    def drop_ids(self, name: str, digests: set[bytes]) -> tuple[list[str], ShardFile | None]:
        """Rewrite a shard without the rows whose id digest is in `digests`; return the ids removed (each once,
        though a chunked shard holds several rows of it) and the rewritten shard (None if nothing was removed)."""
        from .ids import id_digest
        table = pq.read_table(location.open_arrow(self.file(name)))
        ids = table.column("id").to_pylist()
        keep = [id_digest(i) not in digests for i in ids]
        removed = list(dict.fromkeys(i for i, k in zip(ids, keep) if not k))
        if not removed:
            return removed, None
        companion = npy.companion(name)
        array = np.array(npy.read(self.file(companion))[np.array(keep)]) if self.dir.exists(companion) else None
        return removed, self._write_table(name, table.filter(pa.array(keep)), array)    # already stored as it is

    def rewrite_rejects(self, rejects: list[dict]) -> None:
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rejects]
        if not self.dir.appendable:
            self._rejects, self._rejects_dirty = lines, True
            self.flush()
        elif lines or self.dir.exists(REJECTS):
            self.dir.write(REJECTS, "".join(lines).encode())

    def append_rejects(self, rejects: list[dict]) -> None:
        """Rejects of a committed unit: appended to the file, or on an object store kept for the next flush."""
        if not rejects:
            return
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rejects]
        if not self.dir.appendable:
            self._rejects += lines
            self._rejects_dirty = True
            return
        with open(self.dir.path / REJECTS, "a", encoding="utf-8") as fh:
            fh.writelines(lines)

    def flush(self) -> None:
        """An object store's _rejects.jsonl, rewritten whole if it changed (the ledger keeps every reject with its
        unit, so one lost to a crash is rebuilt on resume)."""
        if self._rejects_dirty:
            if self._rejects or self.dir.exists(REJECTS):
                self.dir.write(REJECTS, "".join(self._rejects).encode())
            self._rejects_dirty = False

    def read_rejects(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.dir.read(REJECTS).decode().splitlines() if line]
        except FileNotFoundError:
            return []

    def write_manifest(self, manifest: dict) -> None:
        self.flush()
        self.dir.write(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    def has_manifest(self) -> bool:
        return self.dir.exists(MANIFEST)

    def read_manifest(self) -> dict:
        try:
            return json.loads(self.dir.read(MANIFEST))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.location} has {SUCCESS} but its {MANIFEST} cannot be read ({exc}); pass "
                              "--overwrite to redo the job") from None

    def complete(self) -> bool:
        """Whether _SUCCESS is there."""
        return self.dir.exists(SUCCESS)

    def write_success(self) -> None:
        self.dir.write(SUCCESS, b"")
