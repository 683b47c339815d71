"""The output directory: Parquet shards (id, embedding), rejects.jsonl, _manifest.json, then _SUCCESS.

Shards are written to a temporary name, fsynced and renamed, so a shard that exists is complete. _SUCCESS is
written last, and only by a job in which every input row has an output row or a recorded reject."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError

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


class OutputDir:
    def __init__(self, path: str):
        self.path = Path(path)

    def ours(self) -> list[Path]:
        """Files an earlier hpcembed job leaves here."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir()
                if p.name in (MANIFEST, SUCCESS, REJECTS) or (p.name.startswith(("part-", ".part-"))
                                                              and ".parquet" in p.name)]

    def prepare(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output {self.path} exists and is not a directory")
        existing = self.ours()
        if existing and not overwrite:
            raise ConfigError(f"output directory {self.path} already holds the output of a job "
                              f"({len(existing)} files); pass --overwrite to replace it")
        for p in existing:
            p.unlink()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create output directory {self.path}: {exc.strerror}") from None

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

    def append_rejects(self, rejects: list[dict]) -> None:
        if rejects:
            with open(self.path / REJECTS, "a", encoding="utf-8") as fh:
                for r in rejects:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")

    def write_manifest(self, manifest: dict) -> None:
        _fsync_write(self.path / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    def write_success(self) -> None:
        _fsync_write(self.path / SUCCESS, b"")
