"""Token directories: what `hpcembed tokenize` writes and `hpcembed run --input TOKDIR` reads.

A token directory is an output directory (io/writer.py: ledger, _manifest.json, _rejects.jsonl, _SUCCESS) whose
shards are Arrow IPC files, `tokens-<unit>-r<rank>.arrow`, with the columns `id` (string) and `input_ids`
(list<int32>, truncated, special tokens included). Its manifest has `"kind": "tokens"` and names the tokenizer
that made it (`tokenizer_identity`), so an embedding job can refuse shards that another tokenizer made.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa

from ..errors import ConfigError
from ..tokenize.batch import SCHEMA as TOKEN_SCHEMA
from .mark import WRITTEN_BY

TOKENS_KIND = "tokens"


def token_shard_name(unit: int, rank: int) -> str:
    return f"tokens-{unit:08d}-r{rank:05d}.arrow"


def token_shard_rows(path: str | Path) -> int:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).count_rows()


def tokenizer_identity(backend, model_name: str) -> dict:
    """What must match between a token directory and the model that embeds it. The backend is left out: every
    backend gives the same ids."""
    return {"model": model_name, "fingerprint": backend.fingerprint(), "max_seq_length": backend.max_seq_length,
            "lowercase": backend.lowercase}


class TokenShardWriter:
    """One shard, written as record batches arrive, then fsynced and renamed into place (so a shard that
    exists is complete, as for embedding shards)."""

    def __init__(self, directory: Path, name: str):
        self.final = directory / name
        self.tmp = directory / f".{name}.tmp"
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, TOKEN_SCHEMA.with_metadata(WRITTEN_BY))
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def read_token_manifest(directory: str | Path) -> dict | None:
    """The manifest of a token directory, or None when `directory` is not one."""
    path = Path(directory) / "_manifest.json"
    if not path.is_file():
        _refuse_unfinished(Path(directory))
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("kind") == TOKENS_KIND else None


def _refuse_unfinished(directory: Path) -> None:
    """A tokenize job that has not finished leaves a ledger and no manifest: say so, rather than 'no input'."""
    try:
        with open(directory / "_ledger.jsonl", encoding="utf-8") as fh:
            header = json.loads(fh.readline())
    except (OSError, ValueError):
        return
    if isinstance(header, dict) and (header.get("fingerprint") or {}).get("kind") == TOKENS_KIND:
        raise ConfigError(f"token directory {directory} is incomplete (no _manifest.json or _SUCCESS): rerun its "
                          "`hpcembed tokenize` job to finish it")


def token_directory_files(directory: str | Path, manifest: dict) -> list[str]:
    """The shards of a complete token directory, in the order its manifest lists them."""
    directory = Path(directory)
    if not (directory / "_SUCCESS").exists():
        raise ConfigError(f"token directory {directory} is incomplete (no _SUCCESS): rerun its `hpcembed tokenize` "
                          "job to finish it")
    inside = directory.resolve()
    files = []
    for shard in manifest.get("shards", []):
        path = directory / str(shard.get("path", ""))
        # A manifest is input too: it names shards of this directory, never files elsewhere.
        if not path.resolve().is_relative_to(inside) or path.resolve() == inside:
            raise ConfigError(f"token directory {directory}: its manifest names {shard.get('path')!r}, which is not "
                              "a shard inside the directory")
        files.append(str(path))
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise ConfigError(f"token directory {directory} is missing {len(missing)} shards its manifest lists, "
                          f"e.g. {os.path.basename(missing[0])}")
    return files


def check_tokenizer_matches(directory: str, made_by: dict, expected: dict) -> None:
    """Refuse token shards made by another tokenizer (or truncation) than the model's."""
    differs = [k for k in ("fingerprint", "max_seq_length", "lowercase") if made_by.get(k) != expected.get(k)]
    if differs:
        what = ", ".join(f"{k} {made_by.get(k)!r} there, {expected.get(k)!r} here" for k in differs)
        raise ConfigError(f"token directory {directory} was made by a different tokenizer than this job's model "
                          f"{expected.get('model')!r} uses (it was tokenized for {made_by.get('model')!r}; {what}). "
                          "Tokenize again with this model, or embed with the model it was tokenized for")
