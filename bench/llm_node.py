"""One node end to end on an LLM-based embedder: `mpiexec hpcembed run` from Parquet files to Parquet files on a
Qwen3-Embedding shape, beside the decoder's GPU stage alone on the same texts in the same run (issue 20's second goal:
the whole job at >= 90% of the stage).

    python -m bench.llm_node --tokenizer-model bench/work/s/all-MiniLM-L6-v2-fp16 \
        --paragraphs bench/work/s/paragraphs-head.txt.gz --size 0.6B --docs 80000

The model is the published configuration with random weights (bench/llm_stage.py's make_model), and, as there is no
Qwen tokenizer on the GPU box, the MiniLM WordPiece tokenizer is copied into its directory: the job, the stage and
the corpus's lengths (mean ~180 tokens at 512) all use it, so ids stay below Qwen's vocabulary and the last token of
each text is WordPiece's [SEP], which last-token pooling takes. Speed does not depend on which ids these are.

Runs: bf16 cold (empty kernel cache) and warm, then FP8 warm with the fidelity bound lowered (random-weight deep
stacks fail the 0.999 bound, bench/notes/llm_stage.md; the figure is recorded, not checked). The stage is the job's
engine configuration on the job's token budget (one instance, Triton ops, CUDA graphs), batches cut as the job's
tokenizer ranks cut them. The job's first rows are compared with the stage's embeddings of the same texts. Writes
bench/results/llm_node-<size>.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench.common import record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents, write_parquet
from bench.e2e_node import run_job, summarize
from bench.gpu_stage import assembled_batches, run_config
from bench.llm_stage import QWEN3, make_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def decoder_dir(size: str, scratch: Path, tokenizer_model: str, max_seq_length: int) -> Path:
    import torch
    path, model, _ = make_model(size, scratch, max_seq_length)
    del model
    torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_model) / name).exists():
            shutil.copy(Path(tokenizer_model) / name, path / name)
    return path


def job_rows(out: Path, n: int) -> np.ndarray:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    wanted = [f"doc-{k:09d}" for k in range(n)]
    found = ds.dataset(str(out), format="parquet").to_table(filter=pc.field("id").isin(wanted))
    got = dict(zip(found["id"].to_pylist(),
                   found["embedding"].combine_chunks().flatten().to_numpy().reshape(found.num_rows, -1)))
    return np.stack([got[i] for i in wanted])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-model", required=True, help="a BERT-family model dir whose tokenizer the job uses")
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--size", default="0.6B", choices=sorted(QWEN3))
    ap.add_argument("--docs", type=int, default=80_000)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--unit-rows", type=int, default=5_000)
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--stage-docs", type=int, default=20_000)
    ap.add_argument("--check-docs", type=int, default=2_000)
    ap.add_argument("--runs", nargs="+", default=["bf16:cold", "bf16:warm", "fp8:warm"])
    ap.add_argument("--timeout", type=int, default=200)
    ap.add_argument("--scratch", default="/dev/shm/hpcembed-llm-node")
    args = ap.parse_args()
    import torch
    from hpcembed.config import default_batch_tokens
    from hpcembed.engine import ModelSpec
    from hpcembed.tokenize import HFTokenizer

    scratch = Path(args.scratch)
    work = Path(tempfile.mkdtemp(prefix="llm_node-", dir=scratch.parent if scratch.parent.exists() else None))
    began = time.perf_counter()
    model = decoder_dir(args.size, scratch, args.tokenizer_model, args.max_seq_length)
    docs = build_documents(args.docs, Path(args.paragraphs))
    write_parquet(docs, work / "corpus", files=args.files)
    print(f"model {model}, corpus {args.docs:,} docs ({time.perf_counter() - began:.1f} s)", flush=True)

    spec = ModelSpec.load(str(model))
    budget = default_batch_tokens("cuda")
    token_lists = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase).encode(
        docs[: args.stage_docs])
    n_tokens = sum(len(t) for t in token_lists)
    batches = assembled_batches(token_lists, budget, args.unit_rows)
    stage = {}
    for dtype in sorted({r.split(":")[0] for r in args.runs}):
        emb, seconds, warmup, busy, graphed = run_config(spec, batches, len(token_lists), "varlen", dtype, 1,
                                                         {"fused", "graphs"}, budget)
        stage[dtype] = {"texts_per_s": round(len(token_lists) / seconds, 1),
                        "tokens_per_s": round(n_tokens / seconds, 1), "build_and_warmup_seconds": round(warmup, 2),
                        "graph_batch_fraction": round(graphed, 3), "embeddings": emb[: args.check_docs]}
        print(f"stage {dtype}: {n_tokens / seconds / 1e6:.3f}M tokens/s", flush=True)
    torch.cuda.empty_cache()

    runs, cache = {}, work / "kernel-cache"
    for name in args.runs:
        dtype, start = name.split(":")
        if start == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        extra = ["--dtype", dtype] + (["--fp8-min-cosine", "0.5"] if dtype == "fp8" else [])
        job = SimpleNamespace(ranks=args.ranks, model=str(model), unit_rows=args.unit_rows, timeout=args.timeout,
                              extra=extra)
        out = work / f"out-{dtype}"
        manifest, wall, launched, log = run_job(job, work / "corpus", out, "auto", cache)
        print("\n".join(line for line in log.splitlines() if "role map" in line or "complete:" in line
                        or "minimum cosine" in line), flush=True)
        run = summarize(manifest, wall, launched, args.docs, args.ranks)
        got = job_rows(out, args.check_docs)
        run.update(dtype=dtype, start=start, fraction_of_stage=round(run["tokens_per_s"] /
                                                                      stage[dtype]["tokens_per_s"], 3),
                   min_cosine_vs_stage=float(np.sum(got * stage[dtype]["embeddings"], axis=1).min()),
                   fp8_min_cosine=[r.get("fp8_min_cosine") for r in manifest["ranks"] if r["role"] == "encoder"])
        runs[name] = run
        print(f"{name}: {json.dumps(run)}", flush=True)
    for s in stage.values():
        s.pop("embeddings")

    rows = [(name, f"{r['tokens_per_s'] / 1e6:.3f}M", f"{r['texts_per_s']:,.0f}", f"{r['fraction_of_stage']:.1%}",
             f"{r['gpu_busy']:.1%}", r["roles"].get("tokenizer", 0), f"{r['startup_seconds']:.1f}",
             f"{r['texts_per_s_with_startup']:,.0f}", f"{r['min_cosine_vs_stage']:.5f}") for name, r in runs.items()]
    rows += [(f"GPU stage alone, {d}", f"{s['tokens_per_s'] / 1e6:.3f}M", f"{s['texts_per_s']:,.0f}", "", "", "", "",
              "", "") for d, s in stage.items()]
    print(table(rows, ("run", "tokens/s", "texts/s", "of stage", "gpu busy", "tokenizer ranks", "start-up s",
                       "texts/s incl. start-up", "min cos vs stage")))
    main_run = runs.get("bf16:warm") or next(iter(runs.values()))
    path = record("llm_node", args.size, {
        "model": f"Qwen3-Embedding-{args.size}", "weights": "random (published configuration)",
        "tokenizer": "MiniLM WordPiece in the model directory", "docs": args.docs, "files": args.files,
        "unit_rows": args.unit_rows, "ranks": args.ranks, "budget_tokens": budget,
        "mean_tokens": round(main_run["tokens"] / args.docs, 1),
        "tokens_per_s": main_run["tokens_per_s"], "fraction_of_stage": main_run["fraction_of_stage"],
        "baseline": "the decoder's GPU stage alone (one instance, Triton ops, CUDA graphs), same texts' first "
                    f"{args.stage_docs} documents, same run",
        "stage": stage, "runs": runs})
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
