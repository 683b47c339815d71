"""The simulation's wall time with its cycle collector tuned for a large heap (heap.py
`collector_for_a_large_heap`, as scaling/sim.py runs it) against Python's defaults, on the same job in the same run.

    python -m bench.sim_collector [--nodes 30 100] [--cpu-node-cores 128]

The job is a projection's weak-scaling one (2 units of 20,000 rows per tokenizer rank), the seed's disaggregated
shape by default, with the calibration, fan-in fits and control probe the committed projections use. Writes
bench/results/sim_collector-<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib

from bench.common import device_name, record, table
from bench.rank0_replay import projection_rates
from hpcembed.scaling import sim
from hpcembed.scaling.calibration import node_from
from hpcembed.scaling.sim import JobShape, NodeShape, simulate, units_for


def _run(nodes: int, shape: NodeShape, job: JobShape, rates, tuned: bool) -> dict:
    default = sim.collector_for_a_large_heap
    if not tuned:
        sim.collector_for_a_large_heap = contextlib.nullcontext
    try:
        result = simulate(nodes, shape, job, rates)
    finally:
        sim.collector_for_a_large_heap = default
    return {"wall_s": round(result.wall_seconds, 2), "steady_texts_per_s": round(result.steady_texts_per_s, 1),
            "makespan_s": round(result.makespan_s, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[30, 100])
    ap.add_argument("--cpu-node-cores", type=int, default=128, help="0: the 8-GPU shape")
    ap.add_argument("--slug", default="")
    args = ap.parse_args()
    calibration, rates = projection_rates()
    shape = NodeShape(cores=128, gpus=8, gpu_name=node_from(calibration).gpu_name, cpu_node_cores=args.cpu_node_cores)
    job = JobShape(rows_per_node=units_for(1, shape, rates, 2, 20_000), unit_rows=20_000, chunk_rows=1024, credits=4,
                   tokenizer_batch_tokens=262_144, steal_rows=4096, encoder_lead_s=5.307)
    runs, rows = {}, []
    for nodes in args.nodes:
        # Python's defaults first, the baseline; then the tuned collector.
        runs[nodes] = {"defaults": _run(nodes, shape, job, rates, False), "tuned": _run(nodes, shape, job, rates, True)}
        d, t = runs[nodes]["defaults"], runs[nodes]["tuned"]
        rows.append((nodes, d["wall_s"], t["wall_s"], f"{d['wall_s'] / t['wall_s']:.2f}",
                     f"{d['steady_texts_per_s']:,.0f}", f"{t['steady_texts_per_s']:,.0f}"))
    print(table(rows, ("nodes", "defaults s", "tuned s", "speed-up", "steady texts/s (defaults)", "(tuned)")))
    out = record("sim_collector", args.slug or device_name().replace(" ", "_"),
                 {"shape": "disaggregated" if args.cpu_node_cores else "8-GPU", "cpu_node_cores": args.cpu_node_cores,
                  "units_per_tokenizer": 2, "unit_rows": 20_000, "encoder_lead_s": 5.307, "runs": runs,
                  "baseline": "the same simulation with Python's default cycle collector settings",
                  "how": "hpcembed.scaling.sim.simulate's wall time, each job run with both settings in this run"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
