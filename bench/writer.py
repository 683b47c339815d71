"""The encoder rank's shard writers alone: rows/s that `OutputDir.write_shard` (Parquet encode, BLAKE2b checksum,
temporary file, fsync, rename) commits with 1, 2 and 4 writer threads, as roles/encoder.py runs them. Under --dedup
and --reuse every row is still written, so this rate bounds a rerun however few rows it encodes.

    python -m bench.writer [--shard-rows 20000] [--shards 24] [--dim 384] [--dir DIR]

Shards of random float32 embeddings with ids and digests, like a job's; the best of --repeats runs each.
JSON: bench/results/writer-<device>.json.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.common import device_name, record, table
from hpcembed.io.writer import OutputDir, shard_name


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
    results = {}
    for repeat in range(args.repeats):
        for threads in args.threads:
            where = root / f"t{threads}"
            where.mkdir(parents=True, exist_ok=True)
            output = OutputDir(str(where))
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for f in [pool.submit(output.write_shard, shard_name(k, 1), ids, embeddings, None, digests)
                          for k in range(args.shards)]:
                    f.result()
            seconds = time.perf_counter() - start
            best = results.get(str(threads))
            if best is None or seconds < best["seconds"]:
                results[str(threads)] = {"rows_per_s": round(args.shards * n / seconds), "seconds": round(seconds, 3)}
            shutil.rmtree(where)
    base = results[str(args.threads[0])]["rows_per_s"]
    print(table([(t, f"{r['rows_per_s']:,}", f"{r['rows_per_s'] / base:.2f}x") for t, r in results.items()],
                ("writer threads", "rows/s", f"vs {args.threads[0]}")))
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print("wrote", record("writer", device_name().split(" (")[0].replace(" ", "_"),
                          {"shard_rows": n, "shards": args.shards, "dim": args.dim, "results": results}))


if __name__ == "__main__":
    main()
