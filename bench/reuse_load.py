"""The --reuse start-up on an encoder rank: an earlier output's shards read, checked and put into the owner's table
(io/reuse.py load_owned into roles/dedup.py DigestTable), against the same shards only read and checked in the
same run (read_shard on the same thread pool, nothing kept: the floor of what loading can cost).

    python -m bench.reuse_load [--rows 1000000] [--shard-rows 20000] [--owners 1 2]

The earlier output is written first by hpcembed's own shard writer (float32 Parquet with a digest column, random
ids, digests and 384-wide embeddings), into a temporary directory, so its files are in the page cache as a
rerun's would be on a node that just wrote them. With one owner, DigestTable.load is also timed alone, on arrays
read beforehand (the table's share, apart from reading). Each measurement runs in a fresh process, as an encoder
rank's load does once at its start (in one process, what an earlier load left in the heap changed the next one's
page faults), twice, alternating with the read-only one; the figure is the lower. JSON:
bench/results/reuse_load-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from bench.common import device_name, record, table
from hpcembed.io.reuse import _READ_THREADS, ReuseShard, load_owned, read_shard
from hpcembed.io.writer import OutputDir, shard_name
from hpcembed.roles.dedup import DigestTable

WIDTH = 384


def _earlier_output(path: str, rows: int, shard_rows: int) -> list[ReuseShard]:
    rng = np.random.default_rng(0)
    out = OutputDir(path)
    shards = []
    for unit, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        name = shard_name(unit, 1)
        written = out.write_shard(name, pa.array([f"row-{start + k}" for k in range(n)]),
                                  rng.standard_normal((n, WIDTH), dtype=np.float32),
                                  digests=rng.integers(0, 256, (n, 16), dtype=np.uint8))
        shards.append(ReuseShard(out.file(name), n, [written.size, written.digest]))
    return shards


def _read_only(shards: list[ReuseShard]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        for _ in pool.map(read_shard, shards):
            pass
    return time.perf_counter() - started


def _loaded(shards: list[ReuseShard], owners: int) -> tuple[float, int]:
    table_ = DigestTable(64 << 30)
    started = time.perf_counter()
    ignored = load_owned(shards, table_, owners, 0, 0)
    seconds = time.perf_counter() - started
    assert ignored == 0
    return seconds, table_.reused_slots


def _fresh(listing: str, what: str, owners: int) -> tuple[float, int]:
    """One measurement in a process of its own: (seconds, rows kept)."""
    done = subprocess.run([sys.executable, "-m", "bench.reuse_load", "--measure", listing, what, str(owners)],
                          capture_output=True, text=True, check=True)
    seconds, kept = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, kept


def _table_only(shards: list[ReuseShard]) -> tuple[float, int]:
    """DigestTable.load alone (one owner), on the shards' arrays read beforehand."""
    arrays = [read_shard(s) for s in shards]
    table_ = DigestTable(64 << 30)
    started = time.perf_counter()
    for digests, embeddings in arrays:
        table_.load(digests, embeddings)
    return time.perf_counter() - started, table_.reused_slots


def _measure(listing: str, what: str, owners: int) -> None:
    shards = [ReuseShard(**s) for s in json.loads(open(listing).read())]
    took = {"load": lambda: _loaded(shards, owners), "table": lambda: _table_only(shards),
            "read": lambda: (_read_only(shards), 0)}[what]()
    print(json.dumps(took))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-rows", type=int, default=20_000)
    ap.add_argument("--owners", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--slug", default="")
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)       # LISTING load|read OWNERS: one, inside
    args = ap.parse_args()
    if args.measure:
        return _measure(args.measure[0], args.measure[1], int(args.measure[2]))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = _earlier_output(tmp, args.rows, args.shard_rows)
        listing = f"{tmp}/shards.json"
        with open(listing, "w") as fh:
            json.dump([vars(s) for s in shards], fh)
        for owners in args.owners:
            read, load, kept = [], [], 0
            for _ in range(2):
                read.append(_fresh(listing, "read", owners)[0])
                seconds, kept = _fresh(listing, "load", owners)
                load.append(seconds)
            table_only = min(_fresh(listing, "table", 1)[0] for _ in range(2)) if owners == 1 else None
            results.append({"owners": owners, "rows": args.rows, "rows_kept": kept,
                            **({"table_load_alone_us_per_row": round(table_only / kept * 1e6, 3)}
                               if table_only is not None else {}),
                            "read_only_seconds": round(min(read), 3), "load_seconds": round(min(load), 3),
                            "load_us_per_kept_row_over_read": round((min(load) - min(read)) / kept * 1e6, 3)})
            print(results[-1], flush=True)
    print(table([(r["owners"], f"{r['rows_kept']:,}", r["read_only_seconds"], r["load_seconds"],
                  r["load_us_per_kept_row_over_read"], r.get("table_load_alone_us_per_row", "")) for r in results],
                ("owners", "rows kept", "read only s", "load s", "µs a kept row over reading",
                 "DigestTable.load alone µs a row")))
    slug = args.slug or device_name().split(" (")[0].replace(" ", "_")
    # Which code ran: a before/after comparison is two runs of this script on two commits.
    code = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    print("wrote", record("reuse_load", slug, {"code": code,
        "shard_rows": args.shard_rows, "width": WIDTH, "dtype": "float32", "read_threads": _READ_THREADS,
        "baseline": "the same shards read and checked only (read_shard on the same pool), same run",
        "results": results}))


if __name__ == "__main__":
    main()
