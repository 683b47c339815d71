"""--reuse PREVIOUS_OUTPUT: the embeddings of earlier hpcembed outputs, found by row digest, so that a rerun over a
changed corpus encodes only what changed (roles/dedup.py does the finding).

The conductor checks each directory before the job starts (plan_reuse): complete (_SUCCESS), digests made the way
this job makes them (the same model and tokenizer by content, pooling, normalization, dtype, dimensions, prompt,
max_seq_length), embeddings stored exactly enough to pass on (float32 or float16), and not the job's own output.
Anything else is refused with the reason. Each encoder rank then reads every listed shard once, checks its size and
checksum against the earlier job's ledger, and keeps the rows whose digests it owns (load_owned); a shard that is
missing or not as its ledger recorded it is left out with a warning, never half-read.
"""
from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from . import location, npy
from .digest import checksum_matches, digest_seed
from .ledger import describe_difference

log = logging.getLogger("hpcembed")

EXACT_DTYPES = ("float32", "float16")       # stored values that can be written again as they were made
_READ_THREADS = 4


@dataclass
class ReuseShard:
    path: str                       # the shard's path or URL
    rows: int
    file: list                      # the ledger's record: [bytes, checksum] (+ the .npy's [bytes, checksum])
    companion: str = ""             # the .npy of an npy output


def digest_identity(fingerprint: dict, of: str, keys: tuple[str, ...]) -> dict:
    """What a job's row-digest seed is made of (launch/setup.py), from its fingerprint."""
    return {"of": of, **{k: fingerprint[k] for k in keys if k in fingerprint},
            **({"max_seq_length": fingerprint.get("max_seq_length")} if "text" in of else {})}


def plan_reuse(paths: list[str], output, identity: dict, seed: int, keys: tuple[str, ...]) -> list[ReuseShard]:
    """The shards of the earlier outputs `paths` that this job (`identity` and `seed` of its digests, `output` its
    OutputDir) may take embeddings from. Raises ConfigError naming the directory and the reason."""
    from .writer import OutputDir
    shards = []
    for path in paths:
        earlier = OutputDir(path)
        where = earlier.location
        if _same_place(where, output.location):
            raise ConfigError(f"--reuse {path} is this job's own output: a rerun resumes it without --reuse")
        if not earlier.dir.is_dir() or not earlier.has_manifest():
            raise ConfigError(f"--reuse {path}: not an hpcembed output (no _manifest.json)")
        if not earlier.complete():
            raise ConfigError(f"--reuse {path}: the job that wrote it is not complete (no _SUCCESS); finish or "
                              "resume it first")
        manifest = earlier.read_manifest()
        if manifest.get("kind") != "embeddings":
            raise ConfigError(f"--reuse {path}: a {manifest.get('kind')} directory, not embeddings")
        digests = manifest.get("row_digest") or {}
        if "of" not in digests:
            raise ConfigError(f"--reuse {path}: written by hpcembed {manifest.get('hpcembed_version')}, before "
                              "outputs kept the text digests a reuse looks rows up by")
        state = earlier.ledger().load()
        theirs = digest_identity(state.fingerprint, digests["of"], keys)
        if theirs != identity or digests.get("seed") != seed:
            if digest_seed(theirs) != digests.get("seed"):
                raise ConfigError(f"--reuse {path}: its manifest and ledger disagree on its row digests")
            raise ConfigError(f"--reuse {path}: embedded differently ({describe_difference(theirs, identity)} "
                              "differ); its embeddings are not this job's")
        dtype = manifest.get("output_dtype", "float32")
        if dtype not in EXACT_DTYPES:
            raise ConfigError(f"--reuse {path}: embeddings stored as {dtype}, which cannot be passed on as they "
                              f"were made (reuse takes {' or '.join(EXACT_DTYPES)} outputs)")
        npy_output = manifest.get("output_format") == "npy"
        for unit in state.units.values():
            for name, rows in unit.shards.items():
                if rows and name in unit.files:
                    shards.append(ReuseShard(earlier.file(name), rows, unit.files[name],
                                             earlier.file(npy.companion(name)) if npy_output else ""))
    return shards


def _same_place(a: str, b: str) -> bool:
    if location.is_url(a) or location.is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _read_checked(path: str, size: int, digest: str) -> bytes:
    with location.open_input(path) as fh:
        data = fh.read()
    if len(data) != size:
        raise ValueError(f"has {len(data)} bytes, its ledger says {size}")
    if not checksum_matches(data, digest):
        raise ValueError("is not what its job wrote (its checksum differs)")
    return data


def read_shard(shard: ReuseShard) -> tuple[np.ndarray, np.ndarray]:
    """(digests [rows, 16], embeddings [rows, dim]) of a shard, checked against its ledger record first."""
    data = _read_checked(shard.path, shard.file[0], shard.file[1])
    table = pq.read_table(pa.BufferReader(data), columns=["digest"] if shard.companion else ["digest", "embedding"])
    if table.num_rows != shard.rows:
        raise ValueError(f"has {table.num_rows} rows, its ledger says {shard.rows}")
    digests = np.frombuffer(table.column("digest").combine_chunks().buffers()[1], np.uint8,
                            count=16 * table.num_rows).reshape(-1, 16)
    if shard.companion:
        embeddings = np.load(io.BytesIO(_read_checked(shard.companion, shard.file[2], shard.file[3])),
                             allow_pickle=False)
    else:
        column = table.column("embedding").combine_chunks()
        embeddings = column.flatten().to_numpy().reshape(table.num_rows, column.type.list_size)
    if len(embeddings) != len(digests):
        raise ValueError(f"has {len(embeddings)} embeddings for {len(digests)} rows")
    return digests, embeddings


def load_owned(shards: list[ReuseShard], table, owners: int, mine: int, rank: int) -> int:
    """Rows of `shards` whose digests owner `mine` (of `owners`) holds, put into `table` (a DigestTable);
    returns the shards left out."""
    from ..roles.dedup import owner_index
    ignored = 0
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        reads = [pool.submit(read_shard, s) for s in shards]
        for shard, future in zip(shards, reads):
            try:
                digests, embeddings = future.result()
            except (OSError, ValueError, pa.ArrowException) as exc:
                log.warning("rank %d: --reuse shard %s left out: %s", rank, shard.path, exc)
                ignored += 1
                continue
            owned = owner_index(digests, owners) == mine
            if owned.all():                 # one owner: the arrays as read, not copies (DigestTable.load)
                table.load(digests, embeddings)
            else:
                table.load(digests[owned], embeddings[owned])
    return ignored
