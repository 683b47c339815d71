"""Token-batch transport: bandwidth and per-batch latency, MPI against UCX, through hpcembed's own transports.

    python -m bench.transport [--seconds 3] [--rates none,10gbit,1gbit]

Two ranks, as a tokenizer and an encoder rank use them: the sender sends TokenBatches (send_batch) while it holds a
credit, the receiver takes them (recv) and returns one Credit per batch over MPI, 4 credits (hpcembed's default).
- latency: 16-row batches with one credit, so each is a full round trip (batch there, credit back); reported as
  half the round trip.
- bandwidth: batches of 256, 1,024 (hpcembed's default chunk) and 4,096 rows of 147 tokens (the benchmark
  corpus's mean), payload bytes per second.
Placements: both ranks on this host (loopback: each transport picks its fastest way, shared memory included), and
on two network-namespace "hosts" (tests/netns.py) with UCX on TCP and a `tc tbf` rate limit on each link.
Writes bench/results/transport-<slug>.json; the figures feed the scaling model's network parameters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

MEAN_TOKENS = 147
SIZES = (256, 1024, 4096)


def make_batch(rows: int):
    import numpy as np
    from hpcembed.tokenize.batch import TokenBatch
    rng = np.random.default_rng(rows)
    lengths = np.clip(rng.normal(MEAN_TOKENS, 60, rows).astype(np.int64), 3, 256)
    tokens = rng.integers(1000, 30000, int(lengths.sum()), dtype=np.int32)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    ids = [f"doc-{k:09d}" for k in range(rows)]
    id_bytes = np.frombuffer("".join(ids).encode(), np.uint8)
    id_offsets = np.concatenate(([0], np.cumsum([len(i) for i in ids]))).astype(np.int32)
    return TokenBatch(tokens, offsets, id_offsets, id_bytes, np.arange(rows, dtype=np.int64),
                      np.zeros(rows, dtype=np.int64))


def worker(transport_name: str, seconds: float) -> None:
    """One rank of a measurement (under mpiexec -n 2): rank 0 sends, rank 1 receives."""
    if transport_name == "ucx":
        from hpcembed.transport.ucx import UcxTransport
        t = UcxTransport()
    else:
        from hpcembed.transport.mpi import MpiTransport
        t = MpiTransport()
    from hpcembed.protocol.messages import Credit
    peer = 1 - t.rank
    if transport_name == "ucx":
        t.connect([peer], {}, receives_from=[peer] if t.rank == 1 else [])
    results = {}
    for case, rows, credits in [("latency", 16, 1)] + [(f"bw{r}", r, 4) for r in SIZES]:
        batch = make_batch(rows)
        nbytes = batch.to_wire().nbytes
        t.comm.Barrier()
        if t.rank == 0:
            held, sent, start = credits, 0, time.perf_counter()
            while True:
                while held == 0:
                    held += t.recv(None).message.count
                if time.perf_counter() - start >= seconds:
                    break
                t.send_batch(1, batch)
                held -= 1
                sent += 1
            t.flush()
            while held < credits:                      # every batch consumed
                held += t.recv(None).message.count
            elapsed = time.perf_counter() - start
            t.send(1, "done")
            results[case] = {"rows": rows, "batch_bytes": nbytes, "batches": sent, "seconds": round(elapsed, 4),
                             "bytes_per_s": round(sent * nbytes / elapsed), "batches_per_s": round(sent / elapsed, 1),
                             "one_way_us": round(elapsed / sent / 2 * 1e6, 1)}
        else:
            while True:
                env = t.recv(None)
                if env.message == "done":
                    break
                t.send(0, Credit(1))
    t.comm.Barrier()
    t.close()
    if t.rank == 0:
        print("RESULT " + json.dumps(results), flush=True)


def run_pair(transport: str, seconds: float, prefix: list[str], env: dict) -> dict:
    from tests.conftest import MPIEXEC
    cmd = ["timeout", "300", MPIEXEC, *prefix, sys.executable, "-m", "bench.transport", "--worker",
           transport, "--seconds", str(seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, cwd=HERE.parent)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=3.0, help="per case")
    ap.add_argument("--rates", default="none,10gbit,1gbit", help="tc tbf limits for the namespace runs")
    ap.add_argument("--slug", default="cpu")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.seconds)

    from bench.common import record, table
    from tests.netns import VirtualHosts, netns_available
    runs = []
    for transport in ("mpi", "ucx"):
        runs.append({"placement": "loopback", "rate": None, "transport": transport,
                     "cases": run_pair(transport, args.seconds, ["-n", "2"], {})})
        print(f"loopback {transport}: done", flush=True)
    ok, why = netns_available()
    if ok:
        hosts = VirtualHosts(2, Path("/tmp") / f"hpcembed-bench-netns-{os.getpid()}").start()
        try:
            for rate in args.rates.split(","):
                hosts.limit_rate(None if rate == "none" else rate)
                for transport in ("mpi", "ucx"):
                    env = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}
                    runs.append({"placement": "2 namespaces", "rate": None if rate == "none" else rate,
                                 "transport": transport,
                                 "cases": run_pair(transport, args.seconds, hosts.mpiexec_args([1, 1]), env)})
                    print(f"namespaces {rate} {transport}: done", flush=True)
        finally:
            hosts.stop()
    else:
        print(f"namespace runs skipped: {why}")

    rows = []
    for r in runs:
        c = r["cases"]
        rows.append((r["placement"], r["rate"] or "-", r["transport"], f"{c['latency']['one_way_us']:.0f}",
                     *(f"{c[f'bw{s}']['bytes_per_s'] / 1e9:.3f}" for s in SIZES),
                     f"{c['bw1024']['batches_per_s']:,.0f}"))
    print(table(rows, ("placement", "rate", "transport", "latency µs (16 rows)",
                       *(f"GB/s {s} rows" for s in SIZES), "batches/s 1024 rows")))
    path = record("transport", args.slug, {"seconds_per_case": args.seconds, "credits": 4,
                                           "mean_tokens_per_row": MEAN_TOKENS, "baseline": "mpi", "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
