"""What rank 0 really spends on a sub-conductor's batch of commits, by the batch's size, beside what the simulation
charges for the same message (issue 22).

The projections charge rank 0 its handler's time, timed live (scaling/probe.HandlerClock), times a factor fitted to
fan-in rehearsals whose batches held up to 64 units (bench/fanin_cost.py: 2.12). At the end of the billion-row job at
1000 nodes rank 0 takes about 65 batches of ~2,100 units each, and how much of that factor holds at that size (a
cost per message added, or a ratio on the handler's time) decides most of what the job loses there
(bench/notes/scale_out.md, session 22). This measures it with the real pieces: rank 1 sends `--batches` real
UnitsCommitted messages of each size over the MPI transport, all at once, as sub-conductors do at a job's end; rank 0
takes them with the real conductor driver's per-message steps (roles/conductor.run_conductor: receive, lock refresh,
ledger tick, ConductorCore.handle, replies, poll) into a real output directory, and its thread's CPU and wall time
for the burst are divided by the batches. Then the same messages go through HandlerClock on a second core, as the
simulation charges them (the calibrated receive it adds is not in that figure). A least-squares line of measured
against charged, over the sizes, splits the real cost into a part per message and a ratio.

    mpiexec -n 2 python -m bench.commit_batch_cost [--sizes 1,64,512,2160] [--batches 40]

JSON: bench/results/commit_batch_cost-<device or --slug>.json. A batch is records of 4-shard units
(bench/committed_units.commit_batches).
"""
from __future__ import annotations

import argparse
import pickle
import tempfile
import time

import numpy as np

from bench.common import device_name, record, table
from bench.committed_units import commit_batches
from hpcembed.io.sources import InputFile, Plan, WorkUnit
from hpcembed.io.writer import OutputDir
from hpcembed.protocol.conductor import ConductorCore
from hpcembed.protocol.messages import RequestUnit, RequestUnits, UnitsCommitted
from hpcembed.roles.common import deliver
from hpcembed.scaling.probe import HandlerClock
from hpcembed.topology import RoleMap

UNIT_ROWS = 7376            # the billion-row job's units at 1000 nodes, as commit_batches makes them
SUB_CONDUCTOR = 1
# Rank 0 conducts; rank 1 is the sub-conductor of tokenizer 2 (encoder 3 only makes the map whole).
ROLES = RoleMap(conductor=0, tokenizers=[2], encoders=[3], hosts={r: "h" for r in range(4)},
                deputies={2: SUB_CONDUCTOR})
FILE = InputFile(0, "corpus.jsonl", "jsonl")


def _core(directory: str, units: int) -> ConductorCore:
    plan = Plan([FILE], {0: units * UNIT_ROWS},
                [WorkUnit(k, FILE, k * UNIT_ROWS, (k + 1) * UNIT_ROWS) for k in range(units)], [])
    output = OutputDir(directory)
    _, state = output.open({"bench": "commit_batch_cost"}, [], overwrite=False)
    core = ConductorCore(ROLES, plan, output, output.ledger(), state)
    core.handle(SUB_CONDUCTOR, RequestUnits(units))         # every unit granted to the sub-conductor, untimed
    return core


def _take_burst(transport, core: ConductorCore, count: int) -> tuple[float, float]:
    """Rank 0 takes `count` batches already waiting, with run_conductor's steps for each: CPU and wall seconds."""
    t0, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(count):
        envelope = transport.recv(timeout=None)
        core.output.lock.refresh()
        core.ledger.tick()
        deliver(transport, core.handle(envelope.source, envelope.message))
        deliver(transport, core.poll(""))
    return time.thread_time() - cpu0, time.perf_counter() - t0


def _charged(core: ConductorCore, batches: list[UnitsCommitted]) -> float:
    """Seconds a batch, as the simulation's HandlerClock times it (the calibrated receive not included)."""
    clock, spent = HandlerClock(RequestUnit()), 0.0
    for batch in batches:
        spent += clock.run(pickle.dumps(batch), lambda message: core.handle(SUB_CONDUCTOR, message))[1]
    return spent / len(batches)


def main() -> None:
    from mpi4py import MPI
    from hpcembed.transport.mpi import CONTROL, MpiTransport
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,64,512,2160", help="units per batch")
    ap.add_argument("--batches", type=int, default=40, help="batches of each size, sent in one burst")
    ap.add_argument("--repeats", type=int, default=3, help="bursts of each size; the least CPU is kept")
    ap.add_argument("--slug", default="", help="result file suffix (default: the device name)")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    transport = MpiTransport(comm)
    if comm.Get_size() != 2:
        raise SystemExit("run under mpiexec -n 2")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        batches = commit_batches(args.batches, size, progress=True)
        best = None
        for _ in range(args.repeats):
            comm.Barrier()
            if comm.Get_rank() == SUB_CONDUCTOR:
                requests = [comm.isend(b, dest=0, tag=CONTROL) for b in batches]
                MPI.Request.Waitall(requests)
                comm.Barrier()
                continue
            with tempfile.TemporaryDirectory() as real_dir, tempfile.TemporaryDirectory() as sim_dir:
                core = _core(real_dir, size * args.batches)
                time.sleep(0.5)          # the burst is waiting, as at a job's end
                cpu, wall = _take_burst(transport, core, args.batches)
                core.ledger.close()
                comm.Barrier()
                charged = _charged(_core(sim_dir, size * args.batches), batches)
            run = (cpu / args.batches, wall / args.batches, charged)
            best = run if best is None or run[0] < best[0] else best
        if comm.Get_rank() == 0:
            rows.append({"units": size, "bytes": len(batches[0].records), "cpu_ms": round(1e3 * best[0], 4),
                         "wall_ms": round(1e3 * best[1], 4), "charged_ms": round(1e3 * best[2], 4),
                         "cpu_over_charged": round(best[0] / best[2], 3)})
    if comm.Get_rank() != 0:
        return
    charged, cpu = np.array([r["charged_ms"] for r in rows]), np.array([r["cpu_ms"] for r in rows])
    (ratio, per_message), *_ = np.linalg.lstsq(np.stack([charged, np.ones_like(charged)], 1), cpu, rcond=None)
    print(table([(r["units"], r["bytes"], r["cpu_ms"], r["wall_ms"], r["charged_ms"], r["cpu_over_charged"])
                 for r in rows], ("units", "bytes", "rank 0 CPU ms", "wall ms", "charged ms", "CPU / charged")))
    print(f"fit: rank 0 CPU = {ratio:.3f} x charged + {1e3 * per_message:.1f} µs a message")
    slug = args.slug or device_name().split(" (")[0].replace(" ", "_")
    print("wrote", record("commit_batch_cost", slug, {
        "batches": args.batches, "repeats": args.repeats, "unit_rows": UNIT_ROWS, "mpi": MPI.Get_library_version()
        .splitlines()[0], "sizes": rows, "fit": {"ratio": round(float(ratio), 3),
                                                  "per_message_us": round(1e3 * float(per_message), 2)}}))


if __name__ == "__main__":
    main()
