"""What rank 0 really spends per control message, fitted from fan-in rehearsals (bench/fanin.py's JSON), beside
what the simulation charges for the same messages.

A rehearsal's conductor CPU is split, by least squares over the runs of one file, into a cost per message and a
cost per second of the job (what does not grow with messages: the ledger's fsync once a second, progress), so
that a run with few messages does not read as expensive messages. Runs the simulation did not reproduce within
its tolerance are left out: there the machine's cores, not the protocol, were the limit (129 ranks on 16). Usage:

    python -m bench.fanin_cost bench/results/fanin-h200-box-off.json bench/results/fanin-h200-box-per-node.json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="bench/fanin.py result files")
    ap.add_argument("--out", default="bench/results/fanin_cost.json")
    args = ap.parse_args()
    rows = []
    print(f"{'file':<44} {'runs (ranks)':<14} {'µs/msg':>8} {'ms/s':>7} {'sim µs/msg':>11} {'measured/sim':>13}")
    for path in args.results:
        data = json.loads(Path(path).read_text())
        row = {"file": path, "device": data["device"], "measured_on": data["date"], "versions": data["versions"],
               "sub_conductors": data["sub_conductors"], "cpus": data["cpus"],
               **fit(data["runs"])}
        rows.append(row)
        print(f"{Path(path).name:<44} {','.join(map(str, row['runs'])):<14} {row['per_message_us']:>8.1f} "
              f"{row['per_second_ms']:>7.2f} {row['simulated_per_message_us']:>11.1f} "
              f"{row['measured_over_simulated']:>13.2f}")
    Path(args.out).write_text(json.dumps({"benchmark": "fanin_cost", "date": time.strftime("%Y-%m-%d"),
                                          "fits": rows}, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
