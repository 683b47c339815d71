"""Rank 0's ledger write of a merged sub-conductor batch (issue 22): the records written whole, as before session
21 (the baseline, run here in the same process), against io/ledger.Ledger.append_lines, which writes them in
WRITE_PIECE pieces; each in a small process and again once the process holds a large heap, as a simulation of 1000
nodes does and, less so, a real rank 0 at that scale.

    python -m bench.ledger_write [--batches 64] [--units 2160] [--heap-objects 20000000]

A batch is `--units` ledger records of one 4-shard unit each (about 340 bytes a record, 2,160 of them about 740 KB:
a relay's merged UnitsCommitted at 1000 nodes). JSON: bench/results/ledger_write-<device>.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import device_name, record, table
from hpcembed.io.ledger import CommittedUnit, Ledger


def _batch(units: int, first: int) -> str:
    records = []
    for unit in range(first, first + units):
        shards = {f"part-{unit:08d}-r{r:06d}.parquet": 1844 for r in range(4)}
        files = {name: [2_900_000, "xxh3:" + f"{unit:032x}"] for name in shards}
        records.append(Ledger.unit_line(CommittedUnit(unit, shards, 96_000, 0, [], files)))
    return "".join(records)


def _whole(directory: Path, batches: list[str]) -> list[float]:
    """The write before session 21: the batch's lines joined and written in one call, then flushed."""
    spent = []
    with open(directory / "_ledger.jsonl", "a", encoding="utf-8") as fh:
        for batch in batches:
            start = time.perf_counter()
            fh.write("".join(["", batch]))
            fh.flush()
            spent.append(time.perf_counter() - start)
    return spent


def _pieces(directory: Path, batches: list[str]) -> list[float]:
    ledger = Ledger(str(directory))
    ledger.clock = lambda: 0.0          # no fsync inside the timed writes: both sides leave it to the OS
    spent = []
    for batch in batches:
        start = time.perf_counter()
        ledger.append_lines(["", batch])
        spent.append(time.perf_counter() - start)
    ledger.close()
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=64)
    ap.add_argument("--units", type=int, default=2160)
    ap.add_argument("--heap-objects", type=int, default=20_000_000, help="small dicts held for the large-heap runs")
    args = ap.parse_args()
    batches = [_batch(args.units, k * args.units) for k in range(args.batches)]
    results, heap = {}, []
    for heap_name in ("small heap", "large heap"):
        if heap_name == "large heap":
            heap = [{"unit": k} for k in range(args.heap_objects)]
        for name, write in (("whole (baseline)", _whole), ("64 KiB pieces", _pieces)):
            with tempfile.TemporaryDirectory() as tmp:
                spent = write(Path(tmp), batches)
            results[f"{heap_name}, {name}"] = {"mean_ms": round(1e3 * statistics.mean(spent), 3),
                                               "median_ms": round(1e3 * statistics.median(spent), 3),
                                               "max_ms": round(1e3 * max(spent), 3)}
    del heap
    print(table([(k, r["mean_ms"], r["median_ms"], r["max_ms"]) for k, r in results.items()],
                ("write of a batch", "mean ms", "median ms", "max ms")))
    print("wrote", record("ledger_write", device_name().split(" (")[0].replace(" ", "_"),
                          {"batches": args.batches, "units_per_batch": args.units,
                           "batch_bytes": len(batches[0].encode()), "heap_objects": args.heap_objects,
                           "results": results}))


if __name__ == "__main__":
    main()
