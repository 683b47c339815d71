"""The GPU stage alone: pre-tokenized batches of the benchmark corpus through the encoder, on one GPU.

    python -m bench.device_prep                      # here: stage fp16 weights, paragraphs, fp32 reference
    python -m bench.gpu_stage --model bench/work/carry/all-MiniLM-L6-v2-fp16 \
        --paragraphs bench/work/carry/paragraphs.txt.gz --reference bench/work/carry/reference-fp32.npy

Each configuration (engine, dtype, token budget, instances, fused ops) encodes every row through the same
InstancePool the encoder rank uses, with batches cut as a job cuts them: for the padding-free engine as the
tokenizer ranks cut them (batching.BatchAssembler: each 20,000-row unit's rows in order, up to the token budget),
for the padded one by the encoder rank's TokenBudgetBatcher (longest-first). Timing starts after a warm-up of each
instance and ends when the last embedding is on the host. sentence-transformers fp16 (bs 256) is
timed in the same run as the baseline; every row is compared with sentence-transformers fp32.
Writes bench/results/gpu_stage-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench.common import record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents


def make_batches(token_lists, budget: int, cost, window_batches: int = 8, chunk_rows: int = 1024):
    """Batches re-batched longest-first: tokenizer chunks arrive, the encoder rank's batcher cuts by budget
    whenever the window is full (how every batch was formed before batches came encoder-ready, and still how a
    padding engine's are)."""
    from hpcembed.batching import TokenBudgetBatcher
    from hpcembed.tokenize.batch import TokenBatch
    batcher = TokenBudgetBatcher(budget, cost)
    out = []
    for start in range(0, len(token_lists), chunk_rows):
        part = token_lists[start: start + chunk_rows]
        batcher.add(TokenBatch.build(part, [f"doc-{start + k:09d}" for k in range(len(part))],
                                     np.arange(start, start + len(part)), 0))
        while batcher.tokens >= budget * window_batches:
            out.append(batcher.pop())
    while batcher.rows:
        out.append(batcher.pop())
    return out


def assembled_batches(token_lists, budget: int, unit_rows: int = 20_000, chunk_rows: int = 1024):
    """Batches as a job's tokenizer ranks send them and a non-padding encoder rank encodes them: each unit's rows
    in input order, cut to the token budget (batching.BatchAssembler), one smaller batch at each unit's end."""
    from hpcembed.batching import BatchAssembler
    from hpcembed.tokenize.batch import TokenBatch
    out = []
    for unit_start in range(0, len(token_lists), unit_rows):
        assembler = BatchAssembler(budget)
        for start in range(unit_start, min(unit_start + unit_rows, len(token_lists)), chunk_rows):
            part = token_lists[start: min(start + chunk_rows, unit_start + unit_rows)]
            out += assembler.add(TokenBatch.build(part, [f"doc-{start + k:09d}" for k in range(len(part))],
                                                  np.arange(start, start + len(part)), unit_start // unit_rows))
        rest = assembler.flush()
        if rest is not None:
            out.append(rest)
    return out


def run_config(spec, batches, n_rows: int, engine: str, dtype: str, instances: int, flags: set[str],
               budget: int, passes: int = 1):
    import torch
    from hpcembed.engine import build_encoder
    from hpcembed.engine.instances import InstancePool
    from hpcembed.engine.varlen import VarlenEncoder
    t0 = time.perf_counter()             # start-up counts compiling and graph capture
    if engine == "varlen":
        fused_ops = "compile" if "compile" in flags else "triton" if "fused" in flags else "eager"
        encoders = [VarlenEncoder(spec, "cuda", dtype, fused_ops=fused_ops, gelu_epilogue="epilogue" in flags,
                                  graph_tokens=budget if "graphs" in flags else 0,
                                  attention=next((a for a in ("triton", "flash") if a in flags), "auto"))
                    for _ in range(instances)]
    else:
        encoders = [build_encoder(spec, "cuda", dtype, engine) for _ in range(instances)]
    for enc in encoders:                  # warm-up one at a time (compilation happens here)
        for b in batches[:3]:
            enc.encode(b)
    warmup = time.perf_counter() - t0
    torch.cuda.synchronize()
    enc_out = np.empty((n_rows, spec.dim), dtype=np.float32)
    pool = InstancePool(encoders)
    busy0 = pool.busy_seconds
    graphed0 = sum(getattr(e, "graph_batches", 0) for e in encoders)
    start = time.perf_counter()
    pending = list(reversed(batches)) * passes
    done = 0
    try:
        while done < len(batches) * passes:
            while pending and pool.capacity > 0:
                pool.submit(pending.pop())
            for batch, emb in pool.completed(wait=0.001):
                enc_out[batch.rows] = emb
                done += 1
        seconds = time.perf_counter() - start
    finally:
        pool.close()
    busy = pool.busy_seconds - busy0
    graphed = sum(getattr(e, "graph_batches", 0) for e in encoders) - graphed0
    del encoders, pool
    torch.cuda.empty_cache()
    return enc_out, seconds, warmup, busy, graphed / (len(batches) * passes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--reference", help="sentence-transformers fp32 embeddings of the first documents, made with "
                                        "the original fp32 weights (bench/device_prep.py)")
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--st-docs", type=int, default=20_000, help="documents for the sentence-transformers fp16 timing")
    ap.add_argument("--configs", nargs="*", default=[
        "torch:fp16:65536:1", "torch:fp16:65536:2",
        "varlen:fp16:16384:1", "varlen:fp16:65536:1", "varlen:fp16:262144:1",
        "varlen:fp16:65536:2", "varlen:fp16:262144:2", "varlen:bf16:65536:2",
        "varlen:fp16:262144:2:epilogue", "varlen:fp16:262144:2:compile", "varlen:fp16:262144:2:compile+epilogue"],
        help="engine:dtype:budget:instances[:flag+flag], flags: fused (hpcembed's Triton kernels between the "
             "matmuls) or compile (torch.compile's), epilogue (GELU in the "
             "matmul epilogue), graphs (CUDA graphs over token/row buckets), triton or flash (the attention kernel; "
             "default: the engine's choice)")
    ap.add_argument("--passes", type=int, default=1, help="timed passes over the corpus per configuration")
    ap.add_argument("--slug", default="")
    ap.add_argument("--profile", action="store_true", help="print where GPU time goes for one eager config first")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from hpcembed.engine import ModelSpec, build_encoder
    from hpcembed.tokenize import HFTokenizer

    spec = ModelSpec.load(args.model)
    docs = build_documents(args.docs, Path(args.paragraphs))
    tok = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)
    t0 = time.perf_counter()
    token_lists = tok.encode(docs)
    tok_seconds = time.perf_counter() - t0
    n_tokens = sum(len(t) for t in token_lists)
    print(f"{len(docs):,} docs, {n_tokens:,} tokens (mean {n_tokens / len(docs):.1f}); HF tokenizers "
          f"{len(docs) / tok_seconds:,.0f} texts/s on {os.cpu_count()} cores", flush=True)

    # References: sentence-transformers fp32 on every row (these weights), and fp16 bs 256 timed as the baseline.
    st32 = SentenceTransformer(spec.path, device="cuda")
    ref = st32.encode(docs, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    del st32
    st16 = SentenceTransformer(spec.path, device="cuda").half()
    st16.encode(docs[:512], batch_size=256)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    st16.encode(docs[: args.st_docs], batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    torch.cuda.synchronize()
    st_seconds = time.perf_counter() - t0
    st_rate = args.st_docs / st_seconds
    st_tokens_rate = sum(len(t) for t in token_lists[: args.st_docs]) / st_seconds
    del st16
    print(f"sentence-transformers fp16 bs256: {st_rate:,.0f} texts/s", flush=True)
    original = np.load(args.reference) if args.reference else None

    rows, table_rows, batch_sets = [], [], {}
    profiled = profile(spec, token_lists) if args.profile else None
    if profiled:
        print(f"kernels alone: {profiled['kernel_tokens_per_s'] / 1e6:.2f}M tokens/s", flush=True)
    for config in args.configs:
        parts = config.split(":")
        engine, dtype, budget, instances = parts[0], parts[1], int(parts[2]), int(parts[3])
        flags = set(parts[4].split("+")) if len(parts) > 4 else set()
        if (engine, budget) not in batch_sets:
            probe = build_encoder(spec, "cuda", dtype, engine)
            # A padding-free engine gets batches as a job's tokenizer ranks cut them; a padding one re-batches
            # longest-first, as its encoder rank does.
            batch_sets[(engine, budget)] = ((make_batches(token_lists, budget, probe.batch_cost), "longest-first")
                                            if probe.pads else
                                            (assembled_batches(token_lists, budget), "as tokenizers cut"))
            del probe
        batches, batching = batch_sets[(engine, budget)]
        try:
            emb, seconds, warmup, busy, graphed = run_config(spec, batches, len(docs), engine, dtype, instances, flags,
                                                    budget, args.passes)
            seconds, busy = seconds / args.passes, busy / args.passes
        except Exception as exc:  # noqa: BLE001 - a failing variant is a result to report, not the end of the run
            print(f"{config}: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append({"config": config, "error": f"{type(exc).__name__}: {exc}"})
            continue
        cos = np.sum(emb * ref, axis=1)
        entry = {"config": config, "engine": engine, "dtype": dtype, "max_batch_tokens": budget,
                 "instances": instances, "compile": "compile" in flags, "fused": "fused" in flags,
                 "gelu_epilogue": "epilogue" in flags,
                 "cuda_graphs": "graphs" in flags,
                 "attention": next((a for a in ("triton", "flash") if a in flags), "auto"),
                 "passes": args.passes,
                 "graph_batch_fraction": round(graphed, 3),
                 "batches": len(batches), "batching": batching,
                 "texts_per_s": round(len(docs) / seconds, 1), "tokens_per_s": round(n_tokens / seconds, 1),
                 "seconds": round(seconds, 3), "warmup_seconds": round(warmup, 2),
                 "instance_busy_fraction": round(busy / (seconds * instances), 3),
                 "speedup_vs_baseline": round(len(docs) / seconds / st_rate, 2),
                 "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        if original is not None:
            entry["min_cosine_vs_original_fp32"] = float(np.sum(emb[: len(original)] * original, axis=1).min())
        rows.append(entry)
        table_rows.append((config, f"{entry['texts_per_s']:,.0f}", f"{entry['tokens_per_s'] / 1e6:.2f}M",
                           entry["speedup_vs_baseline"], f"{entry['min_cosine']:.5f}", entry["warmup_seconds"]))
        print(table_rows[-1], flush=True)
        save(args, rows, st_rate, st_tokens_rate, docs, n_tokens, tok_seconds, profiled)
    table_rows.append(("sentence-transformers fp16 bs256", f"{st_rate:,.0f}", f"{st_tokens_rate / 1e6:.2f}M", 1.0,
                       "", ""))
    print(table(table_rows, ("config", "texts/s", "tokens/s", "x ST fp16", "min cos", "warm-up s")))
    print(f"wrote {save(args, rows, st_rate, st_tokens_rate, docs, n_tokens, tok_seconds, profiled)}")


def profile(spec, token_lists, budget: int = 262144) -> dict:
    """Where the GPU time of the job's configuration (its fused ops, GELU epilogue, its attention) goes, by kernel;
    returns the kernel-only rate and the largest kernels for the JSON."""
    import torch
    from torch.profiler import ProfilerActivity
    from hpcembed.engine.varlen import VarlenEncoder
    enc = VarlenEncoder(spec, "cuda", "fp16", fused_ops="auto", gelu_epilogue=True)
    batches = assembled_batches(token_lists[:20000], budget)
    for b in batches[:2]:
        enc.encode(b)
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for b in batches[2:6]:
            enc.encode(b)
    tokens = sum(b.num_tokens for b in batches[2:6])
    print(f"profile ({enc.fused_ops} fused ops, epilogue, {enc.attention_name} attention): {tokens:,} tokens in 4 "
          f"batches of budget {budget}")
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    kernels = sorted(((e.key, e.self_device_time_total) for e in events if e.self_device_time_total > 0),
                     key=lambda kv: -kv[1])
    kernel_us = sum(us for _, us in kernels)
    return {"attention": enc.attention_name, "fused_ops": enc.fused_ops, "tokens": tokens,
            "kernel_seconds": round(kernel_us / 1e6, 6),
            "kernel_tokens_per_s": round(tokens / (kernel_us / 1e6)),
            "top_kernels": [{"name": name[:120], "share": round(us / kernel_us, 4)} for name, us in kernels[:10]]}


def save(args, rows, st_rate, st_tokens_rate, docs, n_tokens, tok_seconds, profiled=None):
    """Written after every configuration, so a run cut short still leaves its figures."""
    import torch
    ok = [r for r in rows if "error" not in r]
    best = max(ok, key=lambda r: r["tokens_per_s"])
    device = torch.cuda.get_device_name(0)
    return record("gpu_stage", args.slug or device.replace(" ", "_"), {
        "torch": torch.__version__, "docs": len(docs), "tokens": n_tokens,
        "mean_tokens": round(n_tokens / len(docs), 1),
        "texts_per_s": best["texts_per_s"], "tokens_per_s": best["tokens_per_s"],
        "min_cosine": best["min_cosine"], "config": best["config"],
        "baseline": "sentence-transformers encode fp16 bs256", "baseline_texts_per_s": round(st_rate, 1),
        "baseline_tokens_per_s": round(st_tokens_rate, 1), "baseline_docs": args.st_docs,
        "speedup_vs_baseline": best["speedup_vs_baseline"],
        "reference": "sentence-transformers fp32 on the carried fp16-rounded weights, every row; "
                     "min_cosine_vs_original_fp32 compares the first rows with the original fp32 weights",
        "tokenizer_texts_per_s": round(len(docs) / tok_seconds, 1), "configs": rows,
        **({"kernel_tokens_per_s": profiled["kernel_tokens_per_s"], "profile": profiled} if profiled else {})})


if __name__ == "__main__":
    main()
