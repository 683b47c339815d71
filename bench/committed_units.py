"""Rank 0's work on committed units at the end of the billion-row job at 1000 nodes (issue 22): 135,575 units come in
65 merged batches of about 2,086 (bench/notes/scale_out.md, session 22), then the manifest lists every shard.

    python -m bench.committed_units [--batches 65] [--units 2086] [--heap-objects 20000000] [--sample 5000]

Two costs, each beside its baseline measured here in the same run:
  - taking a batch (io/committed.CommittedUnits.add_batch, which now indexes nothing until a unit is looked up)
    against session 21's index built as each batch came (a dict update per batch), in a small process and again
    once it holds a large heap, as the simulation of 1000 nodes does;
  - the manifest's shard list (protocol/conductor.result): now through CommittedUnits.whole_records, each batch's
    lines split once; session 21's looked each unit up, which split its whole batch each time. The baseline is
    timed on the first `--sample` units (it would take minutes for all) and its total given as that rate times
    the units, labelled so.

JSON: bench/results/committed_units-<device>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time
from array import array
from itertools import repeat

from bench.common import device_name, record, table
from hpcembed.io.committed import CommittedUnits, RecordedUnit
from hpcembed.io.ledger import CommittedUnit, Ledger
from hpcembed.io.writer import shard_name
from hpcembed.protocol.messages import UnitsCommitted


def commit_batches(batches: int, units: int, progress: bool = False) -> list[UnitsCommitted]:
    """`batches` sub-conductor batches of `units` units each, a unit being 7,376 rows in 4 shards (the billion-row
    job's at 1000 nodes). `progress`: the batch carries its units' tokens and input rows, as a real one does."""
    out = []
    for first in range(0, batches * units, units):
        records = []
        for unit in range(first, first + units):
            shards = {shard_name(unit, r): 1844 for r in range(4)}
            files = {name: [2_900_000, "xxh3:" + f"{unit:032x}"] for name in shards}
            records.append(CommittedUnit(unit, shards, 96_000, 0, [], files))
        out.append(UnitsCommitted("".join(Ledger.unit_line(r) for r in records).encode(),
                                  array("q", [n for r in records for n in (r.unit, r.rows, r.rejected)]), [],
                                  96_000 * units if progress else 0, 4 * 1844 * units if progress else 0))
    return out


def _take(batches: list[UnitsCommitted], eager: bool) -> list[float]:
    done, index, spent = CommittedUnits({}), {}, []
    for k, batch in enumerate(batches):
        start = time.perf_counter()
        if eager:       # session 21's add_batch: the unit -> batch index updated as each batch came
            index.update(zip(batch.counts[0::3], repeat(k)))
        done.add_batch(batch)
        spent.append(time.perf_counter() - start)
    return spent


def _shard_list_by_lookup(done: CommittedUnits, sample: int) -> tuple[float, int]:
    """Session 21's result(): each unit looked up and parsed on its own."""
    start, units = time.perf_counter(), 0
    for unit in done:
        record = done[unit]
        if isinstance(record, RecordedUnit):
            record = record.parse()
        [{"path": name, "rows": rows} for name, rows in record.shards.items()]
        units += 1
        if units == sample:
            break
    return time.perf_counter() - start, units


def _shard_list_whole(done: CommittedUnits) -> float:
    start = time.perf_counter()
    shards = [{"path": name, "rows": rows} for unit in done.whole_records() for name, rows in unit.shards.items()]
    spent = time.perf_counter() - start
    assert len(shards) == 4 * len(done)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=65)
    ap.add_argument("--units", type=int, default=2086)
    ap.add_argument("--heap-objects", type=int, default=20_000_000, help="small dicts held for the large-heap runs")
    ap.add_argument("--sample", type=int, default=5000, help="units the per-unit lookup baseline is timed on")
    args = ap.parse_args()
    batches = commit_batches(args.batches, args.units)
    total = args.batches * args.units
    results, rows, heap = {}, [], []
    for heap_name in ("small heap", "large heap"):
        if heap_name == "large heap":
            heap = [{"unit": k} for k in range(args.heap_objects)]
        for name, eager in (("index as each batch comes (session 21, baseline)", True),
                            ("no index until a lookup (now)", False)):
            spent = _take(batches, eager)
            results[f"take a batch, {heap_name}, {name}"] = entry = {
                "mean_ms": round(1e3 * statistics.mean(spent), 3), "max_ms": round(1e3 * max(spent), 3),
                "all_batches_ms": round(1e3 * sum(spent), 1)}
            rows.append((f"take a batch, {heap_name}, {name}", entry["mean_ms"], entry["all_batches_ms"]))
    del heap
    done = CommittedUnits({})
    for batch in batches:
        done.add_batch(batch)
    spent, sampled = _shard_list_by_lookup(done, args.sample)
    per_unit = spent / sampled
    results["shard list, each unit looked up (session 21, baseline)"] = {
        "us_per_unit": round(1e6 * per_unit, 2), "units_timed": sampled,
        "all_units_s_extrapolated": round(per_unit * total, 2)}
    whole = _shard_list_whole(done)
    results["shard list, batches split once (now)"] = {"us_per_unit": round(1e6 * whole / total, 2),
                                                      "units_timed": total, "all_units_s": round(whole, 3)}
    rows.append(("shard list, each unit looked up (session 21, baseline)", "", f"{per_unit * total:.1f} s "
                 f"({1e6 * per_unit:.0f} µs a unit x {total:,}, {sampled:,} timed)"))
    rows.append(("shard list, batches split once (now)", "", f"{whole:.3f} s ({1e6 * whole / total:.1f} µs a unit)"))
    print(table(rows, ("rank 0's end-of-job work", "mean ms", "all")))
    print("wrote", record("committed_units", device_name().split(" (")[0].replace(" ", "_"),
                          {"batches": args.batches, "units_per_batch": args.units, "units": total,
                           "heap_objects": args.heap_objects, "results": results}))


if __name__ == "__main__":
    main()
