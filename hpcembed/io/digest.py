"""Content digests: BLAKE2b-128 of files (inputs, token shards), and of large files (model weights) cached so that
a file costs one full read, not one per run; the checksum of an embedding shard as written (xxh3-128, tagged, where
BLAKE2b took a quarter of a writer thread's time; shards of earlier releases carry an untagged BLAKE2b-128 and
still verify); and each row's digest (xxh3-128): of its text where the input is text, of its token ids where it is
a token directory or a chunked text's window.

A cache entry is keyed by the file's absolute path and holds its size, modification time and inode with the
digest; any change to those and the file is read again. Entries live in the kernel cache directory
(hpcembed/cache.py) under digests/, written under a temporary name and renamed, so ranks and jobs may share it. An
unwritable cache only costs the read."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..cache import read_entry, write_entry


SHARD_CHECKSUM_TAG = "xxh3:"


def checksum(data) -> str:
    """An embedding shard's checksum, of the bytes written: 1.45 µs a 1.5 KB row with BLAKE2b-128, 0.06 with
    xxh3-128 on the CPU box. It guards against damage, not forgery."""
    import xxhash
    return SHARD_CHECKSUM_TAG + xxhash.xxh3_128_hexdigest(data)


def checksum_matches(data, recorded: str) -> bool:
    """Whether bytes are the ones `recorded` (a checksum of this release, or an untagged BLAKE2b of before)."""
    if recorded.startswith(SHARD_CHECKSUM_TAG):
        return checksum(data) == recorded
    return hashlib.blake2b(data, digest_size=16).hexdigest() == recorded


def file_checksum_matches(path: Path | str, recorded: str) -> bool:
    """checksum_matches for a file, read in pieces (a path, or a URL: io/location.py)."""
    if not recorded.startswith(SHARD_CHECKSUM_TAG):
        return file_digest(path) == recorded
    import xxhash
    return SHARD_CHECKSUM_TAG + _hashed_file(path, xxhash.xxh3_128()) == recorded


def file_digest(path: Path | str) -> str:
    """Of a file's bytes (a path, or an input's URL: io/location.py)."""
    return _hashed_file(path, hashlib.blake2b(digest_size=16))


def _hashed_file(path: Path | str, h) -> str:
    """`h` (a hashlib or xxhash object) fed the file's bytes in pieces; its hex digest."""
    from .location import open_input
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
        cached = read_entry(entry)
        if cached is not None and cached.get("path") == str(path) and cached.get("stamp") == stamp:
            return cached["digest"]
    digest = file_digest(path)
    if entry is not None:
        write_entry(entry, {"path": str(path), "stamp": stamp, "digest": digest})
    return digest


def digest_seed(identity: dict) -> int:
    """The 64-bit seed of a job's row digests: what, besides a row's text or token ids, shapes its embedding
    (model and tokenizer by content, pooling, normalization, compute dtype, dimensions, the prompt, and for text
    digests max_seq_length; launch/setup.py)."""
    import xxhash
    return xxhash.xxh3_64_intdigest(json.dumps(identity, sort_keys=True).encode())


def text_digests(texts: list[str], seed: int) -> np.ndarray:
    """uint8 [rows, 16]: xxh3-128, seeded with the job's digest_seed, of each text's UTF-8 bytes. The seed holds
    everything between the text and what the encoder sees (the tokenizer by content, max_seq_length, the prompt),
    so equal digests mean equal token ids, and the digest is known before tokenizing (--dedup skips repeats)."""
    import xxhash
    h = xxhash.xxh3_128_digest
    out = b"".join([h(t.encode("utf-8", "surrogatepass"), seed=seed) for t in texts])
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, 16)


def row_digests(token_ids: np.ndarray, offsets: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [rows, 16]: xxh3-128, seeded with the job's digest_seed, of each row's token ids (int32,
    little-endian; truncated, prompt included: exactly what the encoder sees). About 0.4 µs a row."""
    import xxhash
    data = memoryview(np.ascontiguousarray(token_ids, dtype="<i4").view(np.uint8))
    starts = (offsets - offsets[0]) * 4
    out = b"".join(xxhash.xxh3_128_digest(data[a:b], seed=seed) for a, b in zip(starts[:-1].tolist(),
                                                                                 starts[1:].tolist()))
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, 16)


def combined_digests(digests: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """uint8 [texts, 16]: for a chunked text stored as the mean of its windows, the xxh3-128 of its windows'
    digests in order (`starts`: each text's first window)."""
    import xxhash
    ends = np.append(starts[1:], len(digests))
    out = b"".join(xxhash.xxh3_128_digest(digests[a:b].tobytes()) for a, b in zip(starts.tolist(), ends.tolist()))
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, 16)
