"""The encoder rank's shard writers alone: rows/s that `OutputDir.write_shard` (Parquet encode, BLAKE2b checksum,
temporary file, fsync, rename) commits with 1, 2 and 4 writer threads, as roles/encoder.py runs them. Under --dedup
and --reuse every row is still written, so this rate bounds a rerun however few rows it encodes.

    python -m bench.writer [--shard-rows 20000] [--shards 24] [--dim 384] [--dir DIR]

Shards of random float32 embeddings with ids and digests, like a job's; the best of --repeats runs each. The
baseline, in the same run: the writer as it was before session 20 (a BLAKE2b-128 checksum, Parquet statistics for
every column).
JSON: bench/results/writer-<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import device_name, record, table
import hpcembed.io.writer as writer_module
from hpcembed.io.writer import OutputDir, shard_name


@contextlib.contextmanager
def _writer_before_session_20():
    """OutputDir.write_shard with the checksum and Parquet statistics it had before session 20."""
    checksum, write_table = writer_module.checksum, pq.write_table

    def all_statistics(*args, **kw):
        kw.pop("write_statistics", None)
        return write_table(*args, **kw)
    writer_module.checksum = lambda data: hashlib.blake2b(data, digest_size=16).hexdigest()
    pq.write_table = all_statistics
    try:
        yield
    finally:
        writer_module.checksum, pq.write_table = checksum, write_table


def _write_all(where: Path, threads: int, shards: int, ids, embeddings, digests) -> float:
    where.mkdir(parents=True, exist_ok=True)
    output = OutputDir(str(where))
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(output.write_shard, shard_name(k, 1), ids, embeddings, None, digests)
                  for k in range(shards)]:
            f.result()
    seconds = time.perf_counter() - start
    shutil.rmtree(where)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shard-rows", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=24)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3, help="runs per thread count, best kept (the first run of a "
                                                          "process also pays for warming the disk and allocator)")
    ap.add_argument("--dir", default="", help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.shard_rows
    embeddings = rng.random((n, args.dim), dtype=np.float32)
    ids = pa.array([f"doc-{k:09d}" for k in range(n)], type=pa.string())
    digests = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    root = Path(args.dir or tempfile.mkdtemp(prefix="hpcembed-writer-"))
    results, baseline = {}, {}
    for repeat in range(args.repeats):
        for threads in args.threads:
            for kept, before in ((baseline, True), (results, False)):
                with _writer_before_session_20() if before else contextlib.nullcontext():
                    seconds = _write_all(root / f"t{threads}", threads, args.shards, ids, embeddings, digests)
                best = kept.get(str(threads))
                if best is None or seconds < best["seconds"]:
                    kept[str(threads)] = {"rows_per_s": round(args.shards * n / seconds), "seconds": round(seconds, 3)}
    base = results[str(args.threads[0])]["rows_per_s"]
    print(table([(t, f"{baseline[t]['rows_per_s']:,}", f"{r['rows_per_s']:,}",
                  f"{r['rows_per_s'] / baseline[t]['rows_per_s']:.2f}x", f"{r['rows_per_s'] / base:.2f}x")
                 for t, r in results.items()],
                ("writer threads", "rows/s before", "rows/s", "vs before", f"vs {args.threads[0]} thread(s)")))
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print("wrote", record("writer", device_name().split(" (")[0].replace(" ", "_"),
                          {"shard_rows": n, "shards": args.shards, "dim": args.dim, "results": results,
                           "baseline": {"what": "the writer before session 20: BLAKE2b-128 checksum, Parquet "
                                                "statistics for every column", "results": baseline}}))


if __name__ == "__main__":
    main()
