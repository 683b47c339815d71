"""The control-rank probe (hpcembed/scaling/probe.py) on this machine: alone, and with every other core busy as
in a job (one spinning process per other core). `hpcembed scaling simulate --control-probe` takes the busy figure
as the target node's core.

    python -m bench.control_probe [--slug NAME] [--repeats 15]

Writes bench/results/control_probe-<slug or device>.json.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform

from bench.common import device_name, record, table
from hpcembed.scaling.probe import PROBE_VERSION, probe_seconds


def _spin(stop) -> None:
    count = 0
    while not stop.is_set():
        count += 1


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slug", default="")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    alone = probe_seconds(args.repeats)
    others = max(0, len(os.sched_getaffinity(0)) - 1)
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(others)]
    for proc in spinners:
        proc.start()
    try:
        busy = probe_seconds(args.repeats)
    finally:
        stop.set()
        for proc in spinners:
            proc.join(timeout=10)
    print(table([("alone", f"{alone * 1e3:.2f}"), (f"{others} other cores busy", f"{busy * 1e3:.2f}")],
                ("probe", "ms")))
    out = record("control_probe", args.slug or device_name().replace(" ", "_"),
                 {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "probe_version": PROBE_VERSION,
                  "repeats": args.repeats, "alone_s": alone, "busy_s": busy, "busy_processes": others,
                  "how": "hpcembed/scaling/probe.py's workload, fastest of `repeats` runs"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
