"""Chunked against truncated: the same `mpiexec hpcembed run` on the same corpus, once truncating at the model's
max_seq_length and once in token windows (--chunk-tokens, --chunk-overlap), with and without --chunk-pooling mean.

    python -m bench.chunking --model DIR [--paragraphs PATH] [--docs 500000] [--window 256] [--overlap 32]

The truncated run uses the fastest tokenizer backend (budtiktok where installed); chunked runs tokenize with HF
`tokenizers`, which gives the character offsets. Each run's kernel cache is warm (a first untimed job fills it).
Rates are steady state (encoder ranks ready to last commit, as in bench/e2e_node.py): texts/s counts input texts,
windows/s the rows a chunked job embeds. Writes bench/results/chunking-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.common import device_name, record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents, write_parquet
from bench.e2e_node import run_job, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--docs", type=int, default=500_000)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--unit-rows", type=int, default=20_000)
    ap.add_argument("--ranks", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--timeout", type=int, default=480)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="chunking-"))
    corpus = work / "corpus"
    write_parquet(build_documents(args.docs, Path(args.paragraphs)), corpus, files=args.files)
    cache = work / "kernel-cache"
    chunked = ["--chunk-tokens", str(args.window), "--chunk-overlap", str(args.overlap)]
    variants = {"truncated": ("budtiktok", []), "chunked": ("hf", chunked),
                "chunked, mean-pooled": ("hf", chunked + ["--chunk-pooling", "mean"])}
    args.extra = []
    run_job(args, corpus, work / "warm-up", "budtiktok", cache)       # fills the kernel cache
    runs = {}
    for name, (backend, extra) in variants.items():
        args.extra = extra
        manifest, wall, launched, _ = run_job(args, corpus, work / "out", backend, cache)
        run = summarize(manifest, wall, launched, args.docs, args.ranks)
        run.update(texts_truncated=manifest.get("texts_truncated", 0), output_rows=manifest["output_rows"],
                   windows_per_s=round(manifest.get("chunks", 0) / manifest["steady_seconds"], 1) or None,
                   options=extra, backend=backend)
        runs[name] = run
        print(f"{name}: {run['texts_per_s']:,.0f} texts/s, {run['output_rows']:,} rows", flush=True)
    base = runs["truncated"]["texts_per_s"]
    print(table([(name, f"{r['texts_per_s']:,.0f}", f"{r['texts_per_s'] / base:.1%}", r["windows_per_s"] or "",
                  f"{r['tokens_per_s'] / 1e6:.2f}M", f"{r['output_rows']:,}", f"{r['texts_truncated']:,}",
                  f"{r['gpu_busy']:.1%}", f"{r['tokenizer_busy_mean']:.1%}") for name, r in runs.items()],
                ("run", "texts/s", "of truncated", "windows/s", "tokens/s", "rows out", "truncated", "gpu busy",
                 "tokenizer busy")))
    path = record("chunking", device_name().replace(" ", "_"), {
        "docs": args.docs, "window": args.window, "overlap": args.overlap, "ranks": args.ranks,
        "baseline": "the same job truncating at max_seq_length (budtiktok), same corpus, same run",
        "baseline_texts_per_s": base, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
