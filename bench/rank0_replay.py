"""Rank 0's handler times inside a simulation against the same messages replayed in a process of its own.

The simulation charges rank 0 what its real handlers take on this machine (scaling/sim.py `_handled`), timed
inside the process that holds the whole simulated cluster. This runs a job of the seed's 8-GPU shape, records
every message rank 0 handles, then replays them in order into a twin ConductorCore (the same roles and plan) in
a fresh process, timed the same way, and compares the two by message type.

    python -m bench.rank0_replay [--nodes 1000] [--rows 1000000000] [--slug NAME]

Writes bench/results/rank0_replay-<slug or device>.json.
"""
from __future__ import annotations

import argparse
import multiprocessing
import pickle
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.common import device_name, record, table
from hpcembed.io.ledger import LedgerState
from hpcembed.io.writer import OutputDir
from hpcembed.protocol.conductor import ConductorCore
from hpcembed.protocol.messages import RequestUnit
from hpcembed.scaling import read_json
from hpcembed.scaling.calibration import node_from, rates_from
from hpcembed.scaling.layout import build_world, unit_plan
from hpcembed.scaling.probe import HandlerClock
from hpcembed.scaling.project import conductor_factors, control_probe
from hpcembed.scaling.sim import JobShape, NodeShape, Simulation

REPO = Path(__file__).resolve().parent.parent
CALIBRATION = REPO / "scaling_results" / "h100-box" / "calibration.json"
FANIN = REPO / "bench" / "results" / "fanin_cost.json"
PROBE = REPO / "bench" / "results" / "control_probe-h200-box.json"


class RecordingSimulation(Simulation):
    """A Simulation whose rank 0 keeps each message it is handed, pickled, with its source."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.rank0_mail: list[tuple[int, bytes]] = []
        handle = self.conductor.handle

        def recording(source, message):
            self.rank0_mail.append((source, pickle.dumps(message, pickle.HIGHEST_PROTOCOL)))
            return handle(source, message)
        self.conductor.handle = recording


def replay(nodes: int, shape: NodeShape, job: JobShape, rates, mail: list[tuple[int, bytes]]) -> dict:
    """In a process of its own: the messages into a twin conductor, each timed as the simulation times it
    (probe.HandlerClock)."""
    roles, _ = build_world(nodes, shape, rates)
    with tempfile.TemporaryDirectory() as tmp:
        output = OutputDir(tmp)
        core = ConductorCore(roles, unit_plan(job, job.rows), output, output.ledger(), LedgerState({}, [], {}),
                             steal_rows=job.steal_rows)
        step = [0]
        core.ledger.clock = lambda: step[0] * 1e-3
        timer, spent = HandlerClock(RequestUnit()), defaultdict(list)
        for step[0], (source, data) in enumerate(mail):
            _, seconds = timer.run(data, lambda message: core.handle(source, message))
            spent[type(pickle.loads(data)).__name__].append(seconds)
        core.ledger.close()
    return {name: [len(times), 1e6 * sum(times) / len(times)] for name, times in spent.items()}


def projection_rates():
    """(calibration, rates) as the committed seed-shape projections take them: the validated h100-box
    calibration, rank 0's fan-in fits and the H200 box's control probe, over InfiniBand HDR."""
    calibration = read_json(CALIBRATION, "calibration")
    calibration["rates"].update(conductor_factors(read_json(FANIN, "fan-in cost fits"), FANIN))
    calibration["rates"].update(control_probe(read_json(PROBE, "control probe"), PROBE))
    return calibration, rates_from(calibration, "infiniband-hdr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1_000_000_000)
    ap.add_argument("--slug", default="")
    args = ap.parse_args()
    calibration, rates = projection_rates()
    shape = NodeShape(cores=128, gpus=8, gpu_name=node_from(calibration).gpu_name)
    job = JobShape(rows=args.rows, unit_rows=20_000, chunk_rows=1024, credits=4, tokenizer_batch_tokens=262_144,
                   steal_rows=4096)
    sim = RecordingSimulation(args.nodes, shape, job, rates)
    result = sim.run()
    in_sim = result.conductor_us_by_message
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        clean = pool.apply(replay, (args.nodes, shape, job, rates, sim.rank0_mail))
    rows = [(name, n, f"{in_sim[name][1]:.1f}", f"{clean[name][1]:.1f}", f"{in_sim[name][1] / clean[name][1]:.2f}")
            for name, (n, _) in sorted(clean.items(), key=lambda kv: -kv[1][0])]
    print(f"{args.nodes} nodes of 8 GPUs, {args.rows:,} rows: rank 0 busy {result.conductor_busy:.1%} as charged, "
          f"simulation {result.wall_seconds:.0f} s")
    print(table(rows, ("message", "count", "in the simulation µs", "own process µs", "ratio")))
    out = record("rank0_replay", args.slug or device_name().replace(" ", "_"),
                 {"nodes": args.nodes, "gpus_per_node": 8, "rows": args.rows, "makespan_s": result.makespan_s,
                  "conductor_busy_charged": result.conductor_busy, "simulation_wall_s": result.wall_seconds,
                  "in_simulation_us": in_sim, "own_process_us": clean,
                  "how": "every message rank 0 handled in the simulation, replayed in order into a twin "
                         "ConductorCore in a fresh process; both timed as scaling/sim.py _handled times"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
