"""The control plane under fan-in, with real processes (issue 22): `hpcembed run --rehearse` under mpiexec at
several scales of virtual nodes, every rank in its real role (conductor, sub-conductors where asked, tokenizer
and encoder ranks over the MPI transport, the ledger, shard writing), the two compute stages stood in for at set
rates (hpcembed/rehearsal.py). Each run is then replayed in the simulation, and the two are compared: throughput
within the study's ±10%, and the conductor's handling time per message.

    python -m bench.fanin [--scales 1,2,4,8] [--tokenizers-per-node 7] [--encoders-per-node 1] \\
        [--unit-rows 500] [--rows-per-tokenizer 20000] [--rehearse 1e5,4e6] [--sub-conductors off]

Weak scaling: each scale's corpus holds rows-per-tokenizer rows for each of its tokenizer ranks, in Parquet row
groups of unit-rows (a work unit is whole row groups). Texts are 120 characters (32 stand-in tokens). The
simulation runs on this machine, where the runs were measured, so it is replayed with cpu_slowdown 1 and the
same-machine network. JSON: bench/results/fanin-<slug>.json, `benchmark: "fanin"`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import device_name, record, table
from hpcembed.scaling.measure import measure_local, with_efficiency
from hpcembed.scaling.project import validate

TEXT_CHARS = 120
STUDY_CALIBRATION = Path(__file__).resolve().parent.parent / "scaling_results" / "h100-box" / "calibration.json"


def write_corpus(directory: Path, rows: int, unit_rows: int, files: int = 8) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    for f in range(files):
        n = min(per_file, rows - f * per_file)
        if n <= 0:
            break
        texts = [f"row {f}-{k} " + "x" * (TEXT_CHARS - len(f"row {f}-{k} ")) for k in range(n)]
        pq.write_table(pa.table({"id": [f"{f}-{k}" for k in range(n)], "text": texts}),
                       directory / f"part-{f:03d}.parquet", row_group_size=unit_rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="1,2,4,8", help="virtual node counts")
    ap.add_argument("--tokenizers-per-node", type=int, default=7)
    ap.add_argument("--encoders-per-node", type=int, default=1)
    ap.add_argument("--unit-rows", type=int, default=500)
    ap.add_argument("--rows-per-tokenizer", type=int, default=20_000)
    ap.add_argument("--model", default="", help="model directory (default: the bundled one); a rehearsal reads only "
                    "its configuration and tokenizer files")
    ap.add_argument("--rehearse", default="1e5,4e6", help="tokenizer,encoder tokens/s (hpcembed run --rehearse)")
    ap.add_argument("--sub-conductors", default="off", choices=("auto", "per-node", "off"))
    ap.add_argument("--calibration", default=str(STUDY_CALIBRATION),
                    help="the study calibration whose fixed costs (message sizes, conductor receive) the replay uses")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--slug", default="", help="result file suffix (default: the device name)")
    args = ap.parse_args()
    scales = [int(x) for x in args.scales.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hpcembed-fanin-"))
    # Under --sub-conductors per-node one tokenizer rank of each node becomes its sub-conductor.
    per_node = args.tokenizers_per_node + args.encoders_per_node
    for n in scales:
        write_corpus(work / f"corpus-n{n}", n * args.tokenizers_per_node * args.rows_per_tokenizer, args.unit_rows)
    series = f"fanin-{args.sub_conductors}"
    run_args = ["--input", str(work / "corpus-n{nodes}"), "--rehearse", args.rehearse, "--unit-rows",
                str(args.unit_rows), "--sub-conductors", args.sub_conductors, "--transport", "mpi",
                *(["--model", args.model] if args.model else [])]
    rows = measure_local(series, scales, per_node, run_args, work, virtual=True,
                         tokenizers_per_node=args.tokenizers_per_node, timeout=args.timeout)
    for row in rows:        # replayed on the machine that measured them
        row["sim"]["rates"]["cpu_slowdown"] = 1.0
    rows = with_efficiency(rows)
    calibration = json.loads(Path(args.calibration).read_text())
    checks = validate(calibration, rows)
    out = []
    for row, check in zip(rows, checks):
        conductor = row.get("conductor", {})
        manifest = json.loads((work / "runs" / f"{series}-n{row['nodes']}.manifest.json").read_text())
        steady = manifest.get("steady_seconds") or 1.0
        out.append({"nodes": row["nodes"], "ranks": row["ranks"], "tokenizers": row["tokenizers"],
                    "encoders": row["gpus"], "units": manifest.get("units"),
                    "measured_texts_per_s": row["throughput_texts_per_s"], "efficiency": row["efficiency"],
                    "simulated_texts_per_s": check["simulated_texts_per_s"], "error": check["error"],
                    "within_tolerance": check["within_tolerance"],
                    "conductor_messages": conductor.get("messages_handled"),
                    "conductor_us_per_message_measured": check["conductor_us_per_message_measured"],
                    "conductor_cpu_us_per_message_measured": conductor.get("handling_cpu_us_per_message"),
                    "conductor_us_per_message_simulated": check["conductor_us_per_message_simulated"],
                    "conductor_busy_measured": round(conductor.get("handling_seconds", 0.0) / steady, 4),
                    "conductor_busy_simulated": check["conductor_busy_simulated"],
                    "busiest_subconductor": row.get("busiest_subconductor"),
                    "subconductor_busy_measured": round(row.get("busiest_subconductor", {}).get("handling_seconds",
                                                                                                0.0) / steady, 4),
                    "subconductor_busy_simulated": check["subconductor_busy_simulated"],
                    "rates": row["sim"]["rates"], "wall_seconds": row["wall_seconds"]})
    print(table([(r["nodes"], r["ranks"], f"{r['measured_texts_per_s']:,.0f}", f"{r['simulated_texts_per_s']:,.0f}",
                  f"{r['error']:+.1%}", r["conductor_messages"], r["conductor_us_per_message_measured"],
                  r["conductor_cpu_us_per_message_measured"],
                  r["conductor_us_per_message_simulated"], f"{r['conductor_busy_measured']:.1%}",
                  f"{r['conductor_busy_simulated']:.1%}") for r in out],
                ("nodes", "ranks", "measured t/s", "simulated t/s", "error", "conductor msgs", "µs/msg real",
                 "cpu µs/msg", "µs/msg sim", "busy real", "busy sim")))
    result = {"scales": scales, "tokenizers_per_node": args.tokenizers_per_node,
              "encoders_per_node": args.encoders_per_node, "unit_rows": args.unit_rows,
              "rows_per_tokenizer": args.rows_per_tokenizer, "rehearse": args.rehearse,
              "sub_conductors": args.sub_conductors, "cpus": len(os.sched_getaffinity(0)),
              "calibration": str(args.calibration), "runs": out,
              "validated": bool(out) and all(r["within_tolerance"] for r in out)}
    print("wrote", record("fanin", args.slug or device_name().replace(" ", "_"), result))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
