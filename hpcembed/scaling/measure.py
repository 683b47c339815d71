"""`hpcembed scaling measure`: throughput of real runs at several scales, as rows of STUDY/measured.json.

Three sources, each row labelled `source: "measured"` with where it ran:
  - runs it starts itself: `mpiexec -n 1+N*R hpcembed run ...` per scale N. With --virtual-nodes the ranks of
    one machine are split into N pretend nodes (HPCEMBED_VIRTUAL_NODES, world.virtual_host), so roles, links
    and routing are those of N nodes while the hardware is one box's;
  - manifests of `slurm/scaling-sweep.sh` (SWEEP/manifests/nodes-N.json);
  - a benchmark JSON of bench/e2e_node.py (one H100 node).
Each row also carries what the simulation needs to replay the run (`sim`): the node's roles, the job's rows and
settings, and the per-rank busy rates the run itself measured (rates while busy are component costs; the
throughput is never an input to the simulation).

E(N) = X(N) / (N * X(1)) within a series, X being the manifest's steady rate (texts/s from the encoder ranks being
ready to the last commit), as the simulation computes it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import read_json
from ..config import default_batch_tokens
from ..errors import ConfigError
from ..manifest import ranks_by_role
from ..world import mpiexec_command


def row_from_manifest(manifest: dict, series: str, nodes: int, where: str, network: str) -> dict:
    ranks = manifest["ranks"]
    by_role = ranks_by_role(manifest)
    gpus, tokenizers = by_role.get("encoder", []), by_role.get("tokenizer", [])
    hosts = sorted({r["host"] for r in ranks})
    x = manifest.get("steady_texts_per_s") or manifest["texts_per_s"]
    tokens_per_s = manifest.get("steady_tokens_per_s") or manifest["tokens_per_s"]
    # A tokenizer rank's time per token: tokenizing, and reading its rows (the simulation has no separate read).
    tok_seconds = sum(r["busy_seconds"] + r.get("other_seconds", {}).get("read", 0.0) for r in tokenizers)
    tok_rate = sum(r["tokens"] for r in tokenizers) / max(tok_seconds, 1e-9)
    gpu_busy = sum(r.get("stage_busy_seconds", r["busy_seconds"]) for r in gpus)
    gpu_rate = sum(r["tokens"] for r in gpus) / max(gpu_busy, 1e-9)
    per_host = max(sum(1 for r in ranks if r["host"] == h) for h in hosts)
    settings = manifest.get("settings", {})
    # When each rank could start, in seconds after the first encoder rank was ready (where the steady window, and
    # the simulation's clock, begin). Ranks of one job start seconds apart (model load, CUDA init, the
    # tokenizer's probe); in a short run that skew decides who gets the first batches.
    t0 = min((r["ready_at"] for r in gpus if "ready_at" in r), default=None)
    starts = {}
    if t0 is not None:
        starts = {"encoder": [round(r["ready_at"] - t0, 3) for r in gpus if "ready_at" in r],
                  "tokenizer": [round(r["started_at"] - t0, 3) for r in tokenizers if "started_at" in r]}
    return {
        "series": series, "nodes": nodes, "ranks": len(ranks), "gpus": len(gpus), "tokenizers": len(tokenizers),
        "throughput_texts_per_s": x, "tokens_per_s": tokens_per_s,
        "texts_per_s_with_startup": manifest["texts_per_s"], "rows": manifest["rows_written_this_run"],
        "gpu_busy": manifest.get("gpu_busy"), "device": manifest.get("device"), "where": where,
        "source": "measured", **_control(by_role),
        "sim": {
            "node": {"cores": per_host, "gpus": max(1, len(gpus) // max(nodes, 1)),
                     "gpu_name": "from the run", "tokenizers": -(-len(tokenizers) // max(nodes, 1)),
                     "subconductors": "per-node" if by_role.get("subconductor") else "off"},
            "rows": manifest["rows_written_this_run"], "unit_rows": settings.get("unit_rows", 50_000),
            "unit_sizes": settings.get("unit_sizes"),
            "chunk_rows": settings.get("chunk_rows", 1024), "credits": settings.get("credits", 4),
            # The encoder rank's token-budget window: it takes batches in only while the window has room.
            "max_batch_tokens": settings.get("max_batch_tokens") or default_batch_tokens(gpus[0].get("device", "")
                                                                                        if gpus else "cuda"),
            "window_batches": settings.get("window_batches", 8),
            "tokenizer_batch_tokens": settings.get("tokenizer_batch_tokens", 0),     # 0: a run from before 0.3
            "steal_rows": settings.get("steal_rows", 0),                              # 0: a run from before 0.4
            "read_ahead_batches": settings.get("read_ahead_batches", 0),              # 0: before session 20
            "instances": gpus[0].get("instances", 2) if gpus else 2,
            "network": network, "start_offsets_s": starts,
            "gpu_rows": [r["rows"] for r in gpus],
            "rates": {"tokenizer_tokens_per_s": round(tok_rate, 1), "gpu_tokens_per_s": round(gpu_rate, 1),
                      "tokens_per_text": manifest["tokens"] / max(manifest["rows_written_this_run"], 1)},
        },
    }


def _control(by_role: dict[str, list[dict]]) -> dict:
    """The conductor's messages and its time handling them, per message (manifests that record them)."""
    conductor = (by_role.get("conductor") or [{}])[0]
    if not conductor.get("messages_handled"):
        return {}
    n, seconds = conductor["messages_handled"], conductor["handling_seconds"]
    subs = [r for r in by_role.get("subconductor", []) if r.get("messages_handled")]
    busiest = max(subs, key=lambda r: r["handling_seconds"], default=None)
    return {"conductor": {"messages_handled": n, "handling_seconds": seconds,
                          "handling_us_per_message": round(1e6 * seconds / n, 2),
                          "handling_cpu_us_per_message": round(1e6 * conductor.get("handling_cpu_seconds", 0) / n, 2)},
            **({"busiest_subconductor": {
                "messages_handled": busiest["messages_handled"], "handling_seconds": busiest["handling_seconds"],
                "handling_us_per_message": round(1e6 * busiest["handling_seconds"] / busiest["messages_handled"],
                                                 2)}} if busiest else {})}


def with_efficiency(rows: list[dict]) -> list[dict]:
    by_series: dict[str, list[dict]] = {}
    for r in rows:
        by_series.setdefault(r["series"], []).append(r)
    for series in by_series.values():
        base = min(series, key=lambda r: r["nodes"])
        x1 = base["throughput_texts_per_s"] / base["nodes"]
        for r in series:
            r["efficiency"] = round(r["throughput_texts_per_s"] / (r["nodes"] * x1), 4)
    return rows


def measure_local(series: str, scales: list[int], ranks_per_node: int, run_args: list[str], study: Path,
                  virtual: bool, tokenizers_per_node: int = 0, timeout: float = 3600, log=print) -> list[dict]:
    rows = []
    (study / "runs").mkdir(parents=True, exist_ok=True)
    for n in scales:
        out = study / "runs" / f"{series}-n{n}"
        args = [a.replace("{nodes}", str(n)) for a in run_args]
        if tokenizers_per_node:
            args += ["--tokenizer-ranks", str(n * tokenizers_per_node)]
        cmd = mpiexec_command(1 + n * ranks_per_node) + [sys.executable, "-m", "hpcembed", "run", *args,
                                                  "--output", str(out), "--overwrite", "--progress", "log"]
        env = {**os.environ, "HPCEMBED_MPI": "1"}
        if virtual:
            env["HPCEMBED_VIRTUAL_NODES"] = str(n)
        log(f"measure {series} at {n} node(s): {' '.join(cmd)}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        wall = time.perf_counter() - start
        (study / "runs" / f"{series}-n{n}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise ConfigError(f"the {n}-node run of {series} failed (exit {proc.returncode}); its log is in "
                              f"{study / 'runs' / f'{series}-n{n}.log'}: {proc.stderr.strip()[-500:]}")
        manifest = read_json(out / "_manifest.json", "manifest")
        where = f"mpiexec on {os.uname().nodename}" + (f", {n} virtual node(s)" if virtual else "")
        row = row_from_manifest(manifest, series, n, where, "same-machine" if virtual else "measured-tcp")
        row["wall_seconds"] = round(wall, 1)
        rows.append(row)
        log(f"  {row['throughput_texts_per_s']:,.0f} texts/s steady, {row['gpus']} gpu / {row['tokenizers']} "
            f"tokenizer ranks, {wall:.0f} s")
        # Keep the manifest; the embeddings themselves are not the point of a scaling run.
        shutil.copy(out / "_manifest.json", study / "runs" / f"{series}-n{n}.manifest.json")
        shutil.rmtree(out, ignore_errors=True)
    return rows


def from_manifests(series: str, directory: Path, network: str) -> list[dict]:
    rows = []
    for path in sorted(Path(directory).glob("*.json")):
        manifest = read_json(path, "sweep manifest")
        nodes = manifest.get("sweep", {}).get("nodes") or len({r["host"] for r in manifest["ranks"]})
        rows.append(row_from_manifest(manifest, series, nodes, f"Slurm sweep manifest {path}", network))
    if not rows:
        raise ConfigError(f"no manifests (*.json) in {directory}")
    return rows


def from_e2e_bench(series: str, path: Path) -> list[dict]:
    data = read_json(path, "e2e_node benchmark result")
    run = data["runs"][data.get("tokenizer_backend", "budtiktok")] if "runs" in data else data
    encoders = run["roles"].get("encoder", run["roles"].get("gpu"))      # "gpu": results before 0.2
    return [{
        "series": series, "nodes": 1, "ranks": run["ranks"], "gpus": encoders,
        "tokenizers": run["roles"]["tokenizer"], "throughput_texts_per_s": run["texts_per_s"],
        "tokens_per_s": run["tokens_per_s"], "texts_per_s_with_startup": run["texts_per_s_with_startup"],
        "rows": data["docs"], "gpu_busy": run["gpu_busy"], "device": data["device"],
        "where": f"bench/e2e_node.py on {data['device']} ({data['date']})", "source": "measured",
        # Replayed with the calibration's own rates: this run is the node the projection is built on.
        "sim": {"node": {"cores": run["ranks"], "gpus": encoders, "gpu_name": data["device"],
                         "tokenizers": run["roles"]["tokenizer"]},
                "rows": data["docs"], "unit_rows": data["unit_rows"], "chunk_rows": 1024, "credits": 4,
                "max_batch_tokens": default_batch_tokens("cuda"), "window_batches": 8, "instances": 2,
                "network": "measured-tcp", "rates": {}},
    }]


def save(study: Path, rows: list[dict]) -> Path:
    """Merge into STUDY/measured.json: a row replaces an earlier one of the same series and node count."""
    path = study / "measured.json"
    old = read_json(path, "measurements")["rows"] if path.exists() else []
    keep = {(r["series"], r["nodes"]): r for r in old}
    keep.update({(r["series"], r["nodes"]): r for r in rows})
    merged = with_efficiency(sorted(keep.values(), key=lambda r: (r["series"], r["nodes"])))
    study.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "hpcembed scaling measurements", "rows": merged}, indent=2) + "\n")
    return path
