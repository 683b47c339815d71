"""What one committed unit costs rank 0: the conductor's own commit rule against a sub-conductor's batched commits.

    python -m bench.conductor_cost [--units 12800] [--batch 64] [--repeats 5]

Direct: the ConductorCore receives a unit's UnitRead and the PartWritten of the two encoder ranks it reached, as
a job of 1.36 parts per unit mostly sends (scaling_results/h100-box/notes.md), and appends its ledger record.
Batched: a SubConductorCore has found the same units complete and sends them on in UnitsCommitted messages of
`--batch` units; the conductor appends each batch's lines in one write. Both time the core's handler and the
unpickling of every message it receives (the MPI receive itself is the same per message, and is what
bench/mpi_overhead.py measures). The ledger is a real file in a temporary directory, fsynced as the job does.
Writes bench/results/conductor_cost-<device>.json.
"""
from __future__ import annotations

import argparse
import gc
import pickle
import tempfile
import time

from bench.common import device_name, record, table
from hpcembed.io.ledger import CommittedUnit, LedgerState
from hpcembed.io.sources import InputFile, Plan, WorkUnit
from hpcembed.io.writer import OutputDir, shard_name
from hpcembed.protocol.conductor import ConductorCore
from hpcembed.protocol.messages import PartWritten, UnitRead
from hpcembed.protocol.subconductor import SubConductorCore
from hpcembed.topology import RoleMap

ROWS = 20_000
DIGEST = "0123456789abcdef0123456789abcdef"


def _conductor(units: int, roles: RoleMap, directory: str) -> ConductorCore:
    file = InputFile(0, "corpus.parquet", "parquet")
    plan = Plan([file], {0: units * ROWS}, [WorkUnit(u, file, u * ROWS, (u + 1) * ROWS) for u in range(units)], [])
    output = OutputDir(directory)
    return ConductorCore(roles, plan, output, output.ledger(), LedgerState({}, [], {}))


def _timed(core: ConductorCore, messages: list[tuple[int, bytes]]) -> float:
    """Seconds to unpickle and handle every message, with the collector kept out of the timing."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for source, data in messages:
            core.handle(source, pickle.loads(data))
        return time.perf_counter() - start
    finally:
        gc.enable()


def direct(units: int) -> float:
    roles = RoleMap(0, [1], [2, 3], {r: "h" for r in range(4)})
    messages = []
    for u in range(units):
        messages.append((1, pickle.dumps(UnitRead(u, {2: 15_000, 3: 5_000}, ROWS * 147))))
        for rank, rows in ((2, 15_000), (3, 5_000)):
            messages.append((rank, pickle.dumps(PartWritten(u, shard_name(u, rank), rows, rows * 147, 6_000_000,
                                                            DIGEST))))
    with tempfile.TemporaryDirectory() as d:
        core = _conductor(units, roles, d)
        seconds = _timed(core, messages)
        assert core.all_committed
        core.ledger.close()
    return seconds


def batched(units: int, batch: int) -> tuple[float, float]:
    """(the conductor's seconds, the sub-conductors' seconds to make the batches)."""
    roles = RoleMap(0, [1], [2, 3], {r: "h" for r in range(5)}, deputies={1: 4})
    sub = SubConductorCore(4, roles, commit_batch=batch)
    messages, making = [], 0.0
    for first in range(0, units, batch):
        sub.complete = [CommittedUnit(u, {shard_name(u, 2): 15_000, shard_name(u, 3): 5_000}, ROWS * 147, 0, [],
                                      {shard_name(u, 2): [6_000_000, DIGEST], shard_name(u, 3): [2_000_000, DIGEST]})
                        for u in range(first, min(units, first + batch))]
        start = time.perf_counter()
        (_, message), = sub.poll(now=1e9)
        making += time.perf_counter() - start
        messages.append((4, pickle.dumps(message)))
    with tempfile.TemporaryDirectory() as d:
        core = _conductor(units, roles, d)
        seconds = _timed(core, messages)
        assert core.all_committed
        core.ledger.close()
    return seconds, making


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=12_800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slug", default="", help="name the JSON by this instead of the device")
    args = ap.parse_args()
    runs = [(direct(args.units), *batched(args.units, args.batch)) for _ in range(args.repeats)]
    best = [min(r[k] for r in runs) for k in range(3)]
    per_unit = [1e6 * s / args.units for s in best]
    print(table([("conductor, direct (UnitRead + 2 PartWritten per unit)", f"{per_unit[0]:.2f}"),
                 (f"conductor, sub-conductor batches of {args.batch}", f"{per_unit[1]:.2f}"),
                 ("sub-conductor, making the batches", f"{per_unit[2]:.2f}")], ("who", "us per unit")))
    path = record("conductor_cost", args.slug or device_name().replace(" ", "_"), {
        "units": args.units, "batch": args.batch, "repeats": args.repeats,
        "direct_us_per_unit": round(per_unit[0], 3), "batched_us_per_unit": round(per_unit[1], 3),
        "subconductor_us_per_unit": round(per_unit[2], 3), "speedup": round(per_unit[0] / per_unit[1], 2),
        "baseline": "the conductor's own commit rule (direct), same run; best of the repeats"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
