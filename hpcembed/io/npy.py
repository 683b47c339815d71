"""--output-format npy: each shard's embeddings as a little-endian `.npy` beside the Parquet file of its ids (and a
chunked job's window columns), for readers that memory-map one array per shard (FAISS, numpy). Row k of the array
is row k of the Parquet file.

The array is written first and the Parquet file second, each under a temporary name, fsynced and renamed, and the
ledger records both files' sizes and checksums: a shard counts only once the ledger names it, so a crash between
the two leaves files of an uncommitted unit, which a rerun deletes.
"""
from __future__ import annotations

import io

import numpy as np

from . import location


def companion(shard: str) -> str:
    """The name of a shard's `.npy` (of its embeddings), from the shard's name."""
    return shard.rsplit(".", 1)[0] + ".npy"


def encode(array: np.ndarray) -> bytes:
    """A `.npy` file's bytes: the array as it is stored, little-endian, C order."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array, array.dtype.newbyteorder("<")), allow_pickle=False)
    return buf.getvalue()


def read(path: str) -> np.ndarray:
    """The embeddings of a shard: memory-mapped from a path, read whole from a URL."""
    if location.is_url(path):
        with location.open_input(path) as fh:
            return np.load(io.BytesIO(fh.read()), allow_pickle=False)
    return np.load(path, mmap_mode="r", allow_pickle=False)
