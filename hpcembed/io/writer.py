"""The output directory: Parquet shards (id, embedding), _rejects.jsonl, _ledger.jsonl, _manifest.json, then
_SUCCESS.

Shards are written to a temporary name, fsynced and renamed, so a shard that exists is complete. The ledger
(io/ledger.py) says which units are committed; opening a directory that holds a ledger of the same job resumes
it. _SUCCESS is written last, and only by a job in which every input row has an output row or a recorded reject."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from .ledger import LEDGER, Ledger, LedgerState, describe_difference

log = logging.getLogger("hpcembed")

# Underscore names are skipped by pyarrow.dataset and Spark, so DIR stays readable as one Parquet dataset.
MANIFEST, SUCCESS, REJECTS = "_manifest.json", "_SUCCESS", "_rejects.jsonl"


def shard_name(unit: int, rank: int) -> str:
    return f"part-{unit:08d}-r{rank:05d}.parquet"


def output_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def parquet_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


class OutputDir:
    """An embedding job's output (Parquet shards `part-*.parquet`), or with `tokens=True` a tokenize job's
    (Arrow IPC shards `tokens-*.arrow`, io/tokens.py). Everything else is the same."""

    def __init__(self, path: str, tokens: bool = False):
        self.path = Path(path)
        if tokens:
            from .tokens import token_shard_rows
            self.shard_prefix, self.shard_suffix, self.shard_rows = "tokens-", ".arrow", token_shard_rows
        else:
            self.shard_prefix, self.shard_suffix, self.shard_rows = "part-", ".parquet", parquet_rows

    def _is_shard(self, name: str) -> bool:
        return name.startswith(self.shard_prefix) and name.endswith(self.shard_suffix)

    def ours(self) -> list[Path]:
        """Files an hpcembed job leaves here."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir()
                if p.name in (MANIFEST, SUCCESS, REJECTS, LEDGER) or p.name.startswith(("." + self.shard_prefix, "._"))
                or self._is_shard(p.name)]

    def open(self, fingerprint: dict, header_rejects: list[dict], overwrite: bool) -> tuple[str, LedgerState]:
        """Make the directory ready for this job: 'fresh' (new ledger), 'resume' (the committed units of an
        earlier run of the same job kept, everything else cleared), or 'complete' (nothing to do)."""
        try:
            return self._open(fingerprint, header_rejects, overwrite)
        except PermissionError as exc:
            raise ConfigError(f"cannot write to output directory {self.path}: {exc.strerror} ({exc.filename})") \
                from None

    def _open(self, fingerprint: dict, header_rejects: list[dict], overwrite: bool) -> tuple[str, LedgerState]:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output {self.path} exists and is not a directory")
        existing = self.ours()
        ledger = Ledger(self.path)
        if existing and overwrite:
            for p in existing:
                p.unlink()
        elif existing:
            if not ledger.exists():
                raise ConfigError(f"output directory {self.path} holds files of an earlier job but no {LEDGER}, so "
                                  "it cannot be resumed; pass --overwrite to replace them")
            state = ledger.load()
            if state.fingerprint != fingerprint:
                raise ConfigError(f"output directory {self.path} holds the output of a different job (it differs "
                                  f"in {describe_difference(state.fingerprint, fingerprint)}); pass --overwrite "
                                  "to replace it, or choose another --output")
            if (self.path / SUCCESS).exists():
                return "complete", state
            self._keep_committed(state)
            ledger.write_fresh(state)
            self.rewrite_rejects(state.all_rejects())
            return "resume", state
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create output directory {self.path}: {exc.strerror}") from None
        state = LedgerState(fingerprint, header_rejects, {})
        ledger.write_fresh(state)
        self.rewrite_rejects(header_rejects)
        return "fresh", state

    def _keep_committed(self, state: LedgerState) -> None:
        """Drop units whose shards do not match their ledger record (a crash mid-rewrite), then delete every
        shard and temporary file no committed unit names: the uncommitted units are redone from scratch."""
        for number, unit in sorted(state.units.items()):
            for name, rows in unit.shards.items():
                path = self.path / name
                found = self.shard_rows(path) if path.exists() else None
                if found != rows:
                    log.warning("output %s: unit %d is redone: shard %s has %s rows, the ledger says %d",
                                self.path, number, name, found, rows)
                    del state.units[number]
                    break
        keep = {name for unit in state.units.values() for name in unit.shards}
        stray = [p for p in self.ours() if p.name.startswith(("." + self.shard_prefix, "._"))
                 or (self._is_shard(p.name) and p.name not in keep)]
        for p in stray:
            p.unlink()
        if stray:
            log.info("output %s: removed %d files of uncommitted units", self.path, len(stray))

    def write_shard(self, name: str, ids: pa.Array, embeddings: np.ndarray) -> None:
        rows, dim = embeddings.shape
        values = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
        table = pa.Table.from_arrays([ids, pa.FixedSizeListArray.from_arrays(values, dim)], schema=output_schema(dim))
        final = self.path / name
        tmp = self.path / f".{name}.tmp"
        # Float embeddings barely compress (zstd saves ~7%), so only the ids are compressed.
        pq.write_table(table, tmp, compression={"id": "zstd", "embedding": "none"},
                       use_dictionary=["id"], row_group_size=64 * 1024)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    def drop_ids(self, name: str, digests: set[bytes]) -> list[str]:
        """Rewrite a shard without the rows whose id digest is in `digests`; return the ids removed."""
        from .ids import id_digest
        table = pq.read_table(self.path / name)
        ids = table.column("id").to_pylist()
        keep = [id_digest(i) not in digests for i in ids]
        removed = [i for i, k in zip(ids, keep) if not k]
        if removed:
            kept = table.filter(pa.array(keep))
            self.write_shard(name, kept.column("id").combine_chunks(),
                             kept.column("embedding").combine_chunks().flatten().to_numpy()
                             .reshape(kept.num_rows, table.schema.field("embedding").type.list_size))
        return removed

    def rewrite_rejects(self, rejects: list[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode()
        if data or (self.path / REJECTS).exists():
            _fsync_write(self.path / REJECTS, data)

    def append_rejects(self, rejects: list[dict]) -> None:
        if rejects:
            with open(self.path / REJECTS, "a", encoding="utf-8") as fh:
                for r in rejects:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")

    def write_manifest(self, manifest: dict) -> None:
        _fsync_write(self.path / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    def read_manifest(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path} has {SUCCESS} but its {MANIFEST} cannot be read ({exc}); pass "
                              "--overwrite to redo the job") from None

    def write_success(self) -> None:
        _fsync_write(self.path / SUCCESS, b"")
