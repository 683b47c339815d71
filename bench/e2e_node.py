"""One node end to end: `mpiexec hpcembed run` from Parquet files to Parquet files, against sentence-transformers.

    python -m bench.e2e_node --model DIR --paragraphs PATH [--docs 2000000] [--ranks 16]
                             [--backends budtiktok hf] [--reference reference-fp32.npy]

Builds the benchmark corpus (bench/corpus.py) as Parquet files, runs the whole job under mpiexec once per
tokenizer backend (1 conductor, 1 encoder rank per GPU with 2 instances, the conductor's plan for tokenizer ranks),
then times sentence-transformers fp16 `encode` (batch 256) on the same GPU as the baseline, and checks rows of
the output against sentence-transformers fp32.

Rates: `texts_per_s` is files to files in steady state, from the moment the encoder ranks were ready (model loaded,
compiled, CUDA graphs captured) to the last commit; `texts_per_s_with_startup` divides by the whole mpiexec wall
time instead. `gpu_busy` is the fraction of the steady-state time the encoder rank had a batch on the GPU. Writes
bench/results/e2e_node-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import device_name, record, table
from hpcembed.manifest import ranks_by_role
from hpcembed.world import mpiexec_command
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents, write_parquet

REPO = Path(__file__).resolve().parents[1]


def run_job(args, corpus: Path, out: Path, backend: str) -> tuple[dict, float, str]:
    cmd = mpiexec_command(args.ranks) + [sys.executable, "-m", "hpcembed", "run", "--input", str(corpus),
                                         "--output", str(out), "--model", args.model, "--progress", "log",
                                         "--progress-interval", "5", "--unit-rows", str(args.unit_rows),
                                         "--tokenizer-backend", backend, "--overwrite"] + args.extra
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HPCEMBED_MPI": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n")
        raise SystemExit(f"hpcembed failed with exit {proc.returncode}")
    return json.loads((out / "_manifest.json").read_text()), wall, proc.stderr


def summarize(manifest: dict, wall: float, docs: int, world: int) -> dict:
    ranks = manifest["ranks"]
    roles: dict[str, int] = {}
    for r in ranks:
        roles[r["role"]] = roles.get(r["role"], 0) + 1
    if world > len(ranks):
        roles["idle"] = world - len(ranks)        # ranks the conductor's plan did not need report nothing
    steady = manifest["steady_seconds"]
    by_role = ranks_by_role(manifest)
    tok, gpu = by_role.get("tokenizer", []), by_role.get("encoder", [])
    return {
        "texts_per_s": manifest["steady_texts_per_s"], "tokens_per_s": manifest["steady_tokens_per_s"],
        "texts_per_s_with_startup": round(docs / wall, 1), "wall_seconds": round(wall, 2),
        "steady_seconds": steady, "startup_seconds": round(wall - steady, 2),
        "gpu_busy": manifest["gpu_busy"], "ranks": world,
        "roles": roles, "tokens": manifest["tokens"],
        # Where time goes: each role's busy time as a fraction of the steady-state window.
        "tokenizer_busy_mean": round(sum(r["busy_seconds"] for r in tok) / len(tok) / steady, 3) if tok else None,
        "tokenizer_tokens_per_s_per_rank": round(sum(r["tokens"] for r in tok) / steady / len(tok), 1) if tok
        else None,
        "gpu_instance_busy": [round(r["busy_seconds"] / steady / r.get("instances", 1), 3) for r in gpu],
        "gpu_loop_seconds": [r.get("loop_seconds") for r in gpu],
        "tokenizer_backend": tok[0].get("tokenizer_backend") if tok else None,
        "hf_fallback_rows": sum(r.get("rows_hf_fallback", 0) for r in tok),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--reference", help="sentence-transformers fp32 embeddings of the first documents on the "
                                        "original fp32 weights (bench/device_prep.py)")
    ap.add_argument("--docs", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--unit-rows", type=int, default=20_000)
    ap.add_argument("--ranks", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--backends", nargs="+", default=["budtiktok", "hf"])
    ap.add_argument("--baseline-docs", type=int, default=20_000)
    ap.add_argument("--check-docs", type=int, default=50_000, help="rows checked against sentence-transformers fp32")
    ap.add_argument("--timeout", type=int, default=480)
    ap.add_argument("--workdir", default="")
    ap.add_argument("extra", nargs="*", help="more `hpcembed run` options, after --")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="e2e_node-"))
    start = time.perf_counter()
    stamp = work / "corpus" / f".built-{args.docs}-{args.files}"
    if stamp.exists():          # a warm machine keeps the corpus of an earlier run with the same shape
        docs = build_documents(max(args.baseline_docs, args.check_docs, 512), Path(args.paragraphs))
    else:
        shutil.rmtree(work / "corpus", ignore_errors=True)
        docs = build_documents(args.docs, Path(args.paragraphs))
        write_parquet(docs, work / "corpus", files=args.files)
        stamp.touch()
    print(f"corpus: {args.docs:,} documents in {args.files} Parquet files ({time.perf_counter() - start:.1f} s)",
          flush=True)

    runs = {}
    for backend in args.backends:
        out = work / f"out-{backend}"
        manifest, wall, log = run_job(args, work / "corpus", out, backend)
        print("\n".join(line for line in log.splitlines() if "plan:" in line or "role map" in line
                        or "complete:" in line), flush=True)
        runs[backend] = {**summarize(manifest, wall, args.docs, args.ranks), "out": out}
        print(f"{backend}: {json.dumps({k: v for k, v in runs[backend].items() if k != 'out'})}", flush=True)

    import torch
    from sentence_transformers import SentenceTransformer

    # The baseline, on the same GPU after the jobs: sentence-transformers fp16, batch 256, encode only.
    device = "cuda" if torch.cuda.is_available() else "cpu"      # cpu: only to try the script out
    st16 = SentenceTransformer(args.model, device=device)
    st16 = st16.half() if device == "cuda" else st16
    st16.encode(docs[:512], batch_size=256)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    st16.encode(docs[: args.baseline_docs], batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    sync()
    baseline = args.baseline_docs / (time.perf_counter() - t0)
    del st16

    # Correctness: the first check-docs rows of every run against sentence-transformers fp32 (these weights),
    # and the first rows against fp32 on the original weights.
    import pyarrow.dataset as ds
    import pyarrow.compute as pc
    st32 = SentenceTransformer(args.model, device=device)
    check = docs[: args.check_docs]
    ref = st32.encode(check, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    original = np.load(args.reference) if args.reference else None
    wanted = [f"doc-{k:09d}" for k in range(len(check))]
    for backend, run in runs.items():
        table_ = ds.dataset(str(run.pop("out")), format="parquet").to_table(
            filter=pc.field("id").isin(wanted))
        got = dict(zip(table_["id"].to_pylist(),
                       table_["embedding"].combine_chunks().flatten().to_numpy().reshape(table_.num_rows, -1)))
        emb = np.stack([got[i] for i in wanted])
        cos = np.sum(emb * ref, axis=1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
        run["min_cosine"] = float(cos.min())
        run["rows_checked"] = len(wanted)
        if original is not None:
            run["min_cosine_vs_original_fp32"] = float(np.sum(emb[: len(original)] * original, axis=1).min())
        run["speedup_vs_baseline"] = round(run["texts_per_s"] / baseline, 2)

    rows = [(b, f"{r['texts_per_s']:,.0f}", f"{r['tokens_per_s'] / 1e6:.2f}M", f"{r['texts_per_s_with_startup']:,.0f}",
             f"{r['gpu_busy']:.1%}", r["roles"].get("tokenizer", 0), r["speedup_vs_baseline"],
             f"{r['min_cosine']:.5f}") for b, r in runs.items()]
    rows.append(("sentence-transformers fp16 bs256", f"{baseline:,.0f}", "", "", "", "", 1.0, ""))
    print(table(rows, ("tokenizer backend", "texts/s", "tokens/s", "texts/s incl. start-up", "gpu busy",
                       "tokenizer ranks", "x ST fp16", "min cos")))
    main_run = runs[args.backends[0]]
    slug = device_name().replace(" ", "_")
    path = record("e2e_node", slug, {
        "docs": args.docs, "files": args.files, "unit_rows": args.unit_rows,
        "texts_per_s": main_run["texts_per_s"], "tokens_per_s": main_run["tokens_per_s"],
        "texts_per_s_with_startup": main_run["texts_per_s_with_startup"],
        "baseline_texts_per_s": round(baseline, 1), "baseline": "sentence-transformers fp16 encode, batch 256, "
        f"{args.baseline_docs} documents, same GPU, same run",
        "speedup_vs_baseline": main_run["speedup_vs_baseline"],
        "gpu_busy": main_run["gpu_busy"], "min_cosine": main_run["min_cosine"],
        "ranks": args.ranks, "roles": main_run["roles"], "tokenizer_backend": args.backends[0],
        "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
