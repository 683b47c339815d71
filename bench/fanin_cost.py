"""What rank 0 really spends per control message, fitted from fan-in rehearsals (bench/fanin.py's JSON), beside
what the simulation charges for the same messages.

A rehearsal's conductor CPU is split, by least squares over the runs of one file, into a cost per message and a
cost per second of the job (what does not grow with messages: the ledger's fsync once a second, progress), so
that a run with few messages does not read as expensive messages. Runs the simulation did not reproduce within
its tolerance are left out: there the machine's cores, not the protocol, were the limit (129 ranks on 16). Usage:

    python -m bench.fanin_cost bench/results/fanin-h200-box-off.json bench/results/fanin-h200-box-per-node.json \
        [--batch-cost bench/results/commit_batch_cost-<device>.json]

The rehearsals' sub-conductors sent batches of up to 64 units, so the fit says what rank 0 spends beyond the
simulation's charge at that size, not how it grows with the batch. `--batch-cost` (bench/commit_batch_cost.py: rank
0's real cost against the charge for batches of 1 to 2,160 units) says that: its least-squares slope of real cost
over charge, never taken below 1, becomes the batched plane's ratio, and what the fan-in measured per message beyond
that ratio times the charge becomes a cost added per message. With a slope of 1 the gap is charged per message, as
the batch-size runs found it (a ratio of 2.12 on a 2,100-unit batch would charge twice what rank 0 spends).

That added cost is in µs of the core the rehearsals ran on. The projections charge the core of their control probe
(`hpcembed scaling simulate --control-probe`); where the rehearsals ran on another machine, `--core-probe` (the
control probe of theirs) and `--target-probe` (the projections') scale it by the two cores' probe times.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def fit(runs: list[dict]) -> dict:
    used = [r for r in runs if r["within_tolerance"]]
    messages = np.array([r["conductor_messages"] for r in used], float)
    cpu = messages * np.array([r["conductor_cpu_us_per_message_measured"] for r in used]) * 1e-6
    wall = np.array([r["wall_seconds"] for r in used], float)
    (per_message, per_second), *_ = np.linalg.lstsq(np.stack([messages, wall], 1), cpu, rcond=None)
    simulated = float(np.average([r["conductor_us_per_message_simulated"] for r in used], weights=messages))
    return {"runs": [r["ranks"] for r in used], "per_message_us": round(1e6 * per_message, 2),
            "per_second_ms": round(1e3 * per_second, 3), "simulated_per_message_us": round(simulated, 2),
            "measured_over_simulated": round(1e6 * per_message / simulated, 2)}


def per_batch(row: dict, batch_cost: dict, source: str, core_scale: dict | None = None) -> dict:
    """The batched plane's charge as a ratio on the simulation's charge plus a cost per message (see the module's
    docstring), from a fan-in fit and a commit_batch_cost result; `core_scale` ({"factor": target core's probe time
    over the rehearsals' core's, ...}) puts the added cost in the target core's µs."""
    slope = max(1.0, batch_cost["fit"]["ratio"])
    extra = max(0.0, row["per_message_us"] - slope * row["simulated_per_message_us"])
    out = {"batch_slope": round(slope, 3),
           "batch_cost": {"file": source, "device": batch_cost["device"], "measured_on": batch_cost["date"],
                          "fit": batch_cost["fit"]}}
    if core_scale is not None:
        out["per_message_extra_us_here"] = round(extra, 2)
        out["core_scale"] = core_scale
        extra *= core_scale["factor"]
    out["per_message_extra_us"] = round(extra, 2)
    return out


def core_scale(here: str, target: str) -> dict:
    """Target core's control-probe time over the rehearsals' core's (bench/control_probe.py's JSON, each)."""
    probes = {name: json.loads(Path(path).read_text()) for name, path in (("here", here), ("target", target))}
    return {"factor": round(probes["target"]["alone_s"] / probes["here"]["alone_s"], 4),
            "core_probe": {"file": here, "device": probes["here"]["device"], "alone_s": probes["here"]["alone_s"]},
            "target_probe": {"file": target, "device": probes["target"]["device"],
                             "alone_s": probes["target"]["alone_s"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="bench/fanin.py result files")
    ap.add_argument("--batch-cost", help="bench/commit_batch_cost.py's JSON: how rank 0's cost grows with a batch")
    ap.add_argument("--core-probe", help="control probe of the machine the rehearsals ran on (with --target-probe)")
    ap.add_argument("--target-probe", help="control probe of the projections' target core (with --core-probe)")
    ap.add_argument("--out", default="bench/results/fanin_cost.json")
    args = ap.parse_args()
    if bool(args.core_probe) != bool(args.target_probe):
        ap.error("--core-probe and --target-probe go together")
    batch_cost = json.loads(Path(args.batch_cost).read_text()) if args.batch_cost else None
    scale = core_scale(args.core_probe, args.target_probe) if args.core_probe else None
    rows = []
    print(f"{'file':<44} {'runs (ranks)':<14} {'µs/msg':>8} {'ms/s':>7} {'sim µs/msg':>11} {'measured/sim':>13}")
    for path in args.results:
        data = json.loads(Path(path).read_text())
        row = {"file": path, "device": data["device"], "measured_on": data["date"], "versions": data["versions"],
               "sub_conductors": data["sub_conductors"], "cpus": data["cpus"],
               **fit(data["runs"])}
        if batch_cost is not None and data["sub_conductors"] == "per-node":
            row.update(per_batch(row, batch_cost, args.batch_cost, scale))
        rows.append(row)
        print(f"{Path(path).name:<44} {','.join(map(str, row['runs'])):<14} {row['per_message_us']:>8.1f} "
              f"{row['per_second_ms']:>7.2f} {row['simulated_per_message_us']:>11.1f} "
              f"{row['measured_over_simulated']:>13.2f}")
        if "batch_slope" in row:
            print(f"  batched: {row['batch_slope']:.3f} x the charge + {row['per_message_extra_us']:.1f} µs a message"
                  + (f" (x {scale['factor']} from this core's {row['per_message_extra_us_here']:.1f})"
                     if scale else ""))
    Path(args.out).write_text(json.dumps({"benchmark": "fanin_cost", "date": time.strftime("%Y-%m-%d"),
                                          "fits": rows}, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
