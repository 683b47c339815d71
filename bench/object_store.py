"""The same job reading its input from, and writing its output to, local disk and an S3-compatible server on this
machine (moto in server mode on loopback, tests/s3_server.py), side by side.

    python -m bench.object_store [--docs 200000] [--embed-docs 2000] [--shards 40]

For Parquet and JSONL inputs: `hpcembed tokenize` (reading and tokenizing only, so reading weighs the most) on
--docs documents, and `hpcembed run` (the bundled model on CPU) on --embed-docs of them. Then outputs: the
`hpcembed run` job from local Parquet to a local directory and to s3://, and the writer alone (OutputDir.write_shard
of --shards shards of 4,096 rows of 384 float32, what an encoder rank writes per unit, and the ledger's commits). Rates are the manifest's
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


def _job(command: str, source: str, out: str, env: dict, extra: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hpcembed", command, "--input", source, "--output", out,
                           "--progress", "off", "--overwrite", *extra], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{command} {source} failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads(_read(out, "_manifest.json", env))
    return {"texts_per_s": manifest["texts_per_s"], "wall_seconds": round(wall, 2), "rows": manifest["rows_written"]}


def _read(directory: str, name: str, env: dict) -> bytes:
    os.environ.update(env)              # where the store is, for pyarrow in this process
    from hpcembed.io.store import open_dir
    return open_dir(directory).read(name)


def _writer(directory: str, shards: int, env: dict) -> dict:
    """OutputDir.write_shard and the ledger's commits alone, as an encoder rank and the conductor do them."""
    import numpy as np
    import pyarrow as pa
    from hpcembed.io.ledger import CommittedUnit
    from hpcembed.io.writer import OutputDir
    os.environ.update(env)
    out = OutputDir(directory)
    out.open({"benchmark": "object_store"}, [], overwrite=True)
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((4096, 384)).astype(np.float32)
    ids = pa.array([f"doc-{k}" for k in range(4096)])
    ledger = out.ledger()
    start = time.perf_counter()
    for unit in range(shards):
        shard = out.write_shard(f"part-{unit:08d}-r00001.parquet", ids, embeddings)
        ledger.commit_unit(CommittedUnit(unit, {f"part-{unit:08d}-r00001.parquet": 4096}, 0, files={
            f"part-{unit:08d}-r00001.parquet": shard.record}))
    ledger.close()
    seconds = time.perf_counter() - start
    out.lock.release()
    assert len(out.ledger().load().units) == shards
    return {"shards": shards, "seconds": round(seconds, 3), "rows_per_s": round(shards * 4096 / seconds),
            "mb_per_s": round(shards * shard.size / seconds / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--embed-docs", type=int, default=2_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--shards", type=int, default=40)
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
                local = _job(command, str(work / "local" / name / fmt), str(work / "out"), {}, [])
                remote = _job(command, f"s3://bench/corpus/{name}/{fmt}/", str(work / "out"), server.env, [])
                runs.append({"format": fmt, "command": command, "rows": local["rows"], "local": local,
                             "s3": remote, "s3_fraction": round(remote["texts_per_s"] / local["texts_per_s"], 3)})
                print(json.dumps(runs[-1]), flush=True)
        # Outputs: the embed job from local Parquet, written locally and to the store.
        source = str(work / "local" / "embed" / "parquet")
        local = _job("run", source, str(work / "out"), {}, [])
        remote = _job("run", source, "s3://bench/embedded", server.env, [])
        runs.append({"format": "parquet", "command": "run, output", "rows": local["rows"], "local": local,
                     "s3": remote, "s3_fraction": round(remote["texts_per_s"] / local["texts_per_s"], 3)})
        writer = {"local": _writer(str(work / "writer"), args.shards, {}),
                  "s3": _writer("s3://bench/writer", args.shards, server.env)}
        print(json.dumps(writer), flush=True)
    finally:
        server.stop()
    print(table([(r["format"], r["command"], f"{r['rows']:,}", f"{r['local']['texts_per_s']:,.0f}",
                  f"{r['s3']['texts_per_s']:,.0f}", f"{r['s3_fraction']:.1%}", r["local"]["wall_seconds"],
                  r["s3"]["wall_seconds"]) for r in runs],
                ("format", "job", "rows", "local texts/s", "s3 texts/s", "s3 of local", "local wall s", "s3 wall s")))
    print(table([(where, w["shards"], w["seconds"], f"{w['rows_per_s']:,}", w["mb_per_s"])
                 for where, w in writer.items()], ("writer", "shards", "seconds", "rows/s", "MB/s")))
    path = record("object_store", "cpu", {
        "docs": args.docs, "embed_docs": args.embed_docs, "files": args.files,
        "server": "moto (Python, loopback): a floor for a real object store",
        "baseline": "the same job on the same files from local disk, same run", "runs": runs,
        "writer": {**writer, "shard_rows": 4096, "dim": 384}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
