"""Rank 0's work on a merged sub-conductor batch's ledger records (issue 22): taking the records out of the message
(unpickling) and writing them to the ledger. At the end of the billion-row job at 1000 nodes rank 0 does this for
135,575 units in about 65 batches, after the GPUs are done (bench/notes/scale_out.md, session 22).

    python -m bench.ledger_write [--batches 64] [--units 2160] [--heap-objects 20000000]

Baseline, run here in the same process: session 21's form, the records a str, written through a text file in 64 KiB
pieces (io/ledger.py then). Now: the records UTF-8 bytes, as sub-conductors send them, and
io/ledger.Ledger.append_lines. Each in a small process and again once the process holds a large heap, as a
simulation of 1000 nodes does and, less so, a real rank 0 at that scale.

A batch is `--units` ledger records of one 4-shard unit each (about 340 bytes a record, 2,160 of them about 740 KB:
a relay's merged UnitsCommitted at 1000 nodes). JSON: bench/results/ledger_write-<device>-s22.json (session 21's
comparison, whole against pieces, is ledger_write-<device>.json).
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import device_name, record, table
from hpcembed.io.ledger import CommittedUnit, Ledger

TEXT_PIECE = 1 << 16        # session 21's io/ledger.WRITE_PIECE


def _batch(units: int, first: int) -> str:
    records = []
    for unit in range(first, first + units):
        shards = {f"part-{unit:08d}-r{r:06d}.parquet": 1844 for r in range(4)}
        files = {name: [2_900_000, "xxh3:" + f"{unit:032x}"] for name in shards}
        records.append(Ledger.unit_line(CommittedUnit(unit, shards, 96_000, 0, [], files)))
    return "".join(records)


def _text_pieces(directory: Path, messages: list[bytes]) -> list[float]:
    """Session 21: the records a str, written through a text file in pieces, then flushed."""
    spent = []
    with open(directory / "_ledger.jsonl", "a", encoding="utf-8") as fh:
        for message in messages:
            start = time.perf_counter()
            records = pickle.loads(message)["records"]
            for piece in range(0, len(records), TEXT_PIECE):
                fh.write(records[piece: piece + TEXT_PIECE])
            fh.flush()
            spent.append(time.perf_counter() - start)
    return spent


def _bytes(directory: Path, messages: list[bytes]) -> list[float]:
    ledger = Ledger(str(directory))
    ledger.clock = lambda: 0.0          # no fsync inside the timed writes: both sides leave it to the OS
    spent = []
    for message in messages:
        start = time.perf_counter()
        ledger.append_lines([b"", pickle.loads(message)["records"]])
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
    as_sent = {"str records (session 21, baseline)": [pickle.dumps({"records": b}, 5) for b in batches],
               "bytes records (now)": [pickle.dumps({"records": b.encode()}, 5) for b in batches]}
    results, heap = {}, []
    for heap_name in ("small heap", "large heap"):
        if heap_name == "large heap":
            heap = [{"unit": k} for k in range(args.heap_objects)]
        for name, write in (("str records (session 21, baseline)", _text_pieces), ("bytes records (now)", _bytes)):
            with tempfile.TemporaryDirectory() as tmp:
                spent = write(Path(tmp), as_sent[name])
            results[f"{heap_name}, {name}"] = {"mean_ms": round(1e3 * statistics.mean(spent), 3),
                                               "median_ms": round(1e3 * statistics.median(spent), 3),
                                               "max_ms": round(1e3 * max(spent), 3),
                                               "us_per_unit": round(1e6 * statistics.mean(spent) / args.units, 3)}
    del heap
    print(table([(k, r["mean_ms"], r["median_ms"], r["max_ms"], r["us_per_unit"]) for k, r in results.items()],
                ("unpickle and write a batch", "mean ms", "median ms", "max ms", "µs a unit")))
    print("wrote", record("ledger_write", device_name().split(" (")[0].replace(" ", "_") + "-s22",
                          {"batches": args.batches, "units_per_batch": args.units,
                           "batch_bytes": len(batches[0].encode()), "heap_objects": args.heap_objects,
                           "results": results}))


if __name__ == "__main__":
    main()
