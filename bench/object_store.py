"""The same job reading its input from local disk and from an S3-compatible server on this machine (moto in server
mode on loopback, tests/s3_server.py), side by side.

    python -m bench.object_store [--docs 200000] [--embed-docs 2000]

For Parquet and JSONL inputs: `hpcembed tokenize` (reading and tokenizing only, so reading weighs the most) on
--docs documents, and `hpcembed run` (the bundled model on CPU) on --embed-docs of them. Rates are the manifest's
texts/s (planning excluded) and whole-command wall time (planning included: a JSONL input is scanned for line
starts, through the network for s3://). moto is a Python server, far slower than a real object store, so the
s3:// figures are a floor. Writes bench/results/object_store-cpu.json.
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

from bench.common import record, table
from bench.corpus import build_documents, write_parquet
from tests.s3_server import S3Server

REPO = Path(__file__).resolve().parents[1]


def _job(command: str, source: str, out: Path, env: dict, extra: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hpcembed", command, "--input", source, "--output", str(out),
                           "--progress", "off", "--overwrite", *extra], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{command} {source} failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"texts_per_s": manifest["texts_per_s"], "wall_seconds": round(wall, 2), "rows": manifest["rows_written"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--embed-docs", type=int, default=2_000)
    ap.add_argument("--files", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="object-store-"))
    docs = build_documents(args.docs)
    for name, rows in (("tokenize", docs), ("embed", docs[: args.embed_docs])):
        write_parquet(rows, work / "local" / name / "parquet", files=args.files)
        jsonl = work / "local" / name / "jsonl"
        jsonl.mkdir(parents=True)
        per = -(-len(rows) // args.files)
        for f in range(args.files):
            with open(jsonl / f"part-{f}.jsonl", "w") as fh:
                fh.writelines(json.dumps({"id": f"doc-{f * per + k}", "text": t}) + "\n"
                              for k, t in enumerate(rows[f * per: (f + 1) * per]))
    server = S3Server(work / "moto.log")
    try:
        server.upload(work / "local", "bench", "corpus")
        runs = []
        for fmt in ("parquet", "jsonl"):
            for command, name in (("tokenize", "tokenize"), ("run", "embed")):
                local = _job(command, str(work / "local" / name / fmt), work / "out", {}, [])
                remote = _job(command, f"s3://bench/corpus/{name}/{fmt}/", work / "out", server.env, [])
                runs.append({"format": fmt, "command": command, "rows": local["rows"], "local": local,
                             "s3": remote, "s3_fraction": round(remote["texts_per_s"] / local["texts_per_s"], 3)})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        server.stop()
    print(table([(r["format"], r["command"], f"{r['rows']:,}", f"{r['local']['texts_per_s']:,.0f}",
                  f"{r['s3']['texts_per_s']:,.0f}", f"{r['s3_fraction']:.1%}", r["local"]["wall_seconds"],
                  r["s3"]["wall_seconds"]) for r in runs],
                ("format", "job", "rows", "local texts/s", "s3 texts/s", "s3 of local", "local wall s", "s3 wall s")))
    path = record("object_store", "cpu", {
        "docs": args.docs, "embed_docs": args.embed_docs, "files": args.files,
        "server": "moto (Python, loopback): a floor for a real object store",
        "baseline": "the same job on the same files from local disk, same run", "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
