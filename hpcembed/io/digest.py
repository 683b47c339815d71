"""Content digests: BLAKE2b-128 of bytes and of files (shards, inputs), and of large files (model weights) cached
so that a file costs one full read, not one per run.

A cache entry is keyed by the file's absolute path and holds its size, modification time and inode with the
digest; any change to those and the file is read again. Entries live in the kernel cache directory
(engine/cache.py) under digests/, written under a temporary name and renamed, so ranks and jobs may share it. An
unwritable cache only costs the read."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def checksum(data) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: Path | str) -> str:
    """Of a file's bytes (a path, or an input's URL: io/location.py)."""
    from .location import open_input
    h = hashlib.blake2b(digest_size=16)
    with open_input(str(path)) as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)            # releases the GIL for large buffers: files are digested in parallel threads
    return h.hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def file_content_digest(path: Path, cache: Path | None) -> str:
    """file_digest, from `cache` where the file has not changed since (None: no cache)."""
    path = Path(path).resolve()
    stamp = _stamp(path)
    entry = None
    if cache is not None:
        entry = cache / "digests" / (hashlib.blake2b(str(path).encode(), digest_size=16).hexdigest() + ".json")
        try:
            cached = json.loads(entry.read_text())
            if cached.get("path") == str(path) and cached.get("stamp") == stamp:
                return cached["digest"]
        except (OSError, ValueError, AttributeError):
            pass
    digest = file_digest(path)
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": str(path), "stamp": stamp, "digest": digest}))
            os.replace(tmp, entry)
        except OSError:
            pass
    return digest
