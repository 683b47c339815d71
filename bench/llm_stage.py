"""The GPU stage for LLM-based embedders: Qwen3-Embedding-0.6B and -4B shapes on the padding-free decoder path.

    python -m bench.llm_stage --tokenizer-model bench/work/carry/all-MiniLM-L6-v2-fp16 \
        --paragraphs bench/work/carry/paragraphs.txt.gz --models 0.6B

There is no model hub on the GPU box, so each model is its published configuration with random weights (speed does
not depend on weight values), written once in sentence-transformers layout (last-token pooling, Normalize) to a
scratch directory. Qwen's own tokenizer is not at hand either: the benchmark corpus is tokenized by the MiniLM
WordPiece tokenizer, cut at 512 tokens, its ids used as Qwen ids and each text's last id replaced by Qwen's
end-of-text token (the token Qwen3-Embedding pools), which gives the corpus's real length distribution.

Baseline in the same run: transformers' Qwen3Model in bf16 with SDPA, length-sorted padded batches of about the
same token budget, last-token pooled and normalized, on the same texts. Then hpcembed's varlen engine in bf16 and
FP8 (Triton ops between the matmuls, CUDA graphs), 1 and 2 instances, through the encoder rank's InstancePool
(bench/gpu_stage.py's run_config). MFU counts the matmul FLOPs of every token (2 per weight) and causal attention's
(2 * n^2 * heads * head_dim per layer and text) against 989 TFLOP/s dense bf16. Writes
bench/results/llm_stage-<model>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.common import record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents
from bench.gpu_stage import assembled_batches, run_config

PEAK_BF16 = 989e12          # H100/H200 SXM dense bf16
# The published configurations (config.json of each), random weights here: Qwen3-Embedding (causal, last-token
# pooling) and EmbeddingGemma-300M (Gemma 3, bidirectional, local layers of a 512-token window, mean pooling; its
# two Dense layers after pooling are left out, a few rows' worth of work).
QWEN3_COMMON = dict(vocab_size=151669, head_dim=128, max_position_embeddings=32768, rope_theta=1_000_000.0,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
MODELS = {
    "0.6B": ("Qwen3-Embedding-0.6B", "lasttoken", dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        intermediate_size=3072, **QWEN3_COMMON)),
    "4B": ("Qwen3-Embedding-4B", "lasttoken", dict(
        hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=9728, **QWEN3_COMMON)),
    "embeddinggemma": ("EmbeddingGemma-300M", "mean", dict(
        vocab_size=262144, hidden_size=768, num_hidden_layers=24, num_attention_heads=3, num_key_value_heads=1,
        head_dim=256, intermediate_size=1152, max_position_embeddings=2048, sliding_window=512,
        use_bidirectional_attention=True, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
        layer_types=["full_attention" if (k + 1) % 6 == 0 else "sliding_attention" for k in range(24)])),
}
QWEN_EOS, GEMMA_BOS, GEMMA_EOS = 151643, 2, 1


def as_model_ids(size: str, ids: list[int]) -> list[int]:
    """A MiniLM-tokenized text as the model's ids: its last id the end-of-text token Qwen3-Embedding pools, or
    Gemma's <bos> first and <eos> last, as their tokenizers' templates add them."""
    if size in ("0.6B", "4B"):
        return ids[:-1] + [QWEN_EOS]
    return [GEMMA_BOS] + ids[1:-1] + [GEMMA_EOS]


def make_model(size: str, root: Path, max_seq_length: int):
    """(model directory in sentence-transformers layout, the transformers model on the GPU in bf16, its config)."""
    import torch
    import transformers
    name, pooling, shape = MODELS[size]
    gemma = "sliding_window" in shape
    config = (transformers.Gemma3TextConfig if gemma else transformers.Qwen3Config)(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = (transformers.Gemma3TextModel if gemma else transformers.Qwen3Model)(config).to(torch.bfloat16).eval()
    # .to(bfloat16) rounds the rotary frequencies (a buffer) to bf16 too, which sentence-transformers' loading does
    # not: it made every transformers figure here drift from ours with position (min cosine 0.9948 at 4B on
    # 512-token texts). Exact fp32 frequencies, as a loaded model has them.
    d = config.head_dim
    if gemma:
        for kind in set(config.layer_types):
            setattr(model.rotary_emb, f"{kind}_inv_freq", 1.0 / (config.rope_parameters[kind]["rope_theta"] ** (
                torch.arange(0, d, 2, dtype=torch.int64, device="cuda").float() / d)))
    else:
        model.rotary_emb.inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (
            torch.arange(0, d, 2, dtype=torch.int64, device="cuda").float() / d))
    path = root / f"{name}-random"
    if not (path / "config.json").exists():
        model.save_pretrained(path, safe_serialization=True)
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": config.hidden_size,
             {"lasttoken": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens"}[pooling]: True}))
        (path / "2_Normalize").mkdir()
    return path, model, config


def flops(lengths: np.ndarray, config) -> float:
    """Matmul FLOPs of the whole corpus: 2 per weight per token, plus causal attention's QK^T and PV."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_token = 2 * layers * (h * (q + 2 * kv) + q * h + 3 * h * inter)
    attention = layers * 2 * q * float(np.sum(lengths.astype(np.float64) ** 2))
    return per_token * float(lengths.sum()) + attention


def transformers_padded(model, token_lists, budget: int, pooling: str = "lasttoken") -> tuple[np.ndarray, float]:
    """(normalized last-token or mean embeddings in input order, seconds): length-sorted, right-padded batches
    whose padded size stays within `budget`, SDPA."""
    import torch
    order = np.argsort([-len(t) for t in token_lists], kind="stable")
    out = np.empty((len(token_lists), model.config.hidden_size), dtype=np.float32)
    batches, start = [], 0
    while start < len(order):
        width = len(token_lists[order[start]])
        rows = max(1, budget // width)
        batches.append(order[start: start + rows])
        start += rows
    torch.cuda.synchronize()
    began = time.perf_counter()
    with torch.inference_mode():
        for rows in batches:
            width = len(token_lists[rows[0]])
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for k, r in enumerate(rows):
                ids[k, : len(token_lists[r])] = token_lists[r]
                mask[k, : len(token_lists[r])] = 1
            mask_t = torch.from_numpy(mask).cuda(non_blocking=True)
            states = model(input_ids=torch.from_numpy(ids).cuda(non_blocking=True),
                           attention_mask=mask_t).last_hidden_state
            if pooling == "mean":
                m = mask_t[:, :, None].to(states.dtype)
                pooled = ((states * m).sum(1) / m.sum(1)).float()
            else:
                pooled = states[torch.arange(len(rows), device="cuda"), mask_t.sum(1) - 1].float()
            out[rows] = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
    torch.cuda.synchronize()
    return out, time.perf_counter() - began


def profile(spec, batches, dtype: str, top: int = 25) -> dict:
    """Where GPU time goes in a few eager batches (no CUDA graph, one instance): the top kernels by total time."""
    import torch
    from torch.profiler import ProfilerActivity
    from hpcembed.engine.varlen import VarlenEncoder
    encoder = VarlenEncoder(spec, "cuda", dtype, fused_ops="triton")
    for b in batches[:2]:
        encoder.encode(b)
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for b in batches[2:6]:
            encoder.encode(b)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    events.sort(key=lambda e: -e.device_time_total)
    tokens = sum(b.num_tokens for b in batches[2:6])
    print(f"profile ({dtype}, eager, {tokens:,} tokens): {total / 1e3:.1f} ms of kernels, "
          f"{tokens / (total / 1e6) / 1e6:.3f}M tokens/s on kernels alone", flush=True)
    kernels = []
    for e in events[:top]:
        kernels.append({"kernel": e.key[:90], "share": round(e.device_time_total / total, 4),
                        "calls": e.count, "us_per_call": round(e.device_time_total / e.count, 1)})
        print(f"  {kernels[-1]['share']:6.1%} {e.count:5d} x {kernels[-1]['us_per_call']:9.1f} us  {e.key[:90]}")
    del encoder
    torch.cuda.empty_cache()
    return {"dtype": dtype, "kernel_tokens_per_s": round(tokens / (total / 1e6), 1), "top_kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-model", required=True, help="a BERT-family model dir whose tokenizer cuts texts")
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--models", nargs="+", default=["0.6B"], choices=sorted(MODELS))
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--budget", type=int, default=65536, help="tokens per batch (padded tokens for the baseline)")
    ap.add_argument("--configs", nargs="*", default=["bf16:1", "bf16:2", "fp8:1", "fp8:2"],
                    help="dtype:instances[:triton|flash] of the varlen engine (Triton ops, CUDA graphs; the "
                         "attention kernel, by default the engine's)")
    ap.add_argument("--reference-docs", type=int, default=2000, help="documents also embedded by transformers fp32")
    ap.add_argument("--scratch", default="/dev/shm/hpcembed-llm-stage")
    ap.add_argument("--slug", default="")
    ap.add_argument("--profile", action="store_true", help="print where GPU time goes (eager bf16 and FP8) first")
    ap.add_argument("--skip-baseline", action="store_true", help="with --profile only: no timed runs")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from hpcembed.engine import ModelSpec
    from hpcembed.tokenize import HFTokenizer

    docs = build_documents(args.docs, Path(args.paragraphs))
    tok = HFTokenizer.from_model_dir(args.tokenizer_model, args.max_seq_length)
    minilm_ids = tok.encode(docs)
    for size in args.models:
        token_lists = [as_model_ids(size, t) for t in minilm_ids]
        lengths = np.array([len(t) for t in token_lists])
        print(f"{len(docs):,} docs, {lengths.sum():,} tokens (mean {lengths.mean():.1f}, max {lengths.max()})",
              flush=True)
        name, pooling, _ = MODELS[size]
        path, model, config = make_model(size, Path(args.scratch), args.max_seq_length)
        if args.profile:
            profiles = [profile(ModelSpec.load(str(path)), assembled_batches(token_lists, args.budget), dtype)
                        for dtype in ("bf16", "fp8")]
            if args.skip_baseline:
                continue
        total_flops = flops(lengths, config)
        transformers_padded(model, token_lists[:256], args.budget, pooling)                # warm-up
        baseline, base_seconds = transformers_padded(model, token_lists, args.budget, pooling)
        # fp32 on the first documents: what bf16 itself costs on these (random) weights, ours and transformers'.
        reference = transformers_padded(model.float(), token_lists[: args.reference_docs], args.budget // 4,
                                        pooling)[0]
        base_vs_fp32 = float(np.sum(baseline[: len(reference)] * reference, axis=1).min())
        del model
        torch.cuda.empty_cache()
        base_rate = lengths.sum() / base_seconds
        print(f"{name}: transformers bf16 padded sdpa {base_rate / 1e6:.3f}M tokens/s "
              f"(MFU {total_flops / base_seconds / PEAK_BF16:.1%})", flush=True)
        spec = ModelSpec.load(str(path))
        batches = assembled_batches(token_lists, args.budget)
        results, rows, bf16_out = [], [], None
        for config_name in args.configs:
            dtype, count, *attention = config_name.split(":")
            instances = int(count)
            try:
                emb, seconds, warmup, busy, graphed = run_config(spec, batches, len(docs), "varlen", dtype,
                                                                 instances, {"fused", "graphs", *attention},
                                                                 args.budget)
            except Exception as exc:  # noqa: BLE001 - a failing variant is a result to report
                print(f"{config_name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                results.append({"config": config_name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if dtype == "bf16" and bf16_out is None:
                bf16_out = emb
            rate = lengths.sum() / seconds
            entry = {"config": config_name, "dtype": dtype, "instances": instances,
                     "tokens_per_s": round(rate, 1), "texts_per_s": round(len(docs) / seconds, 1),
                     "mfu": round(total_flops / seconds / PEAK_BF16, 4), "speedup_vs_baseline": round(
                         rate / base_rate, 2), "warmup_seconds": round(warmup, 2),
                     "instance_busy_fraction": round(busy / (seconds * instances), 3),
                     "graph_batch_fraction": round(graphed, 3),
                     "min_cosine_vs_transformers_bf16": float(np.sum(emb * baseline, axis=1).min()),
                     "min_cosine_vs_transformers_fp32": float(np.sum(emb[: len(reference)] * reference, axis=1).min())}
            if dtype == "fp8" and bf16_out is not None:
                entry["min_cosine_vs_bf16"] = float(np.sum(emb * bf16_out, axis=1).min())
            results.append(entry)
            rows.append((config_name, f"{rate / 1e6:.3f}M", f"{entry['mfu']:.1%}", entry["speedup_vs_baseline"],
                         f"{entry['min_cosine_vs_transformers_bf16']:.5f}",
                         f"{entry['min_cosine_vs_transformers_fp32']:.5f}", entry["warmup_seconds"]))
            print(rows[-1], flush=True)
        print(table(rows, ("config", "tokens/s", "MFU", "x transformers", "cos bf16 ref", "cos fp32 ref", "warm-up s")))
        print(f"transformers bf16 against fp32 on {len(reference):,} docs: min cosine {base_vs_fp32:.5f}")
        ok = [r for r in results if "error" not in r]
        bf16 = max((r for r in ok if r["dtype"] == "bf16"), key=lambda r: r["tokens_per_s"], default=None)
        fp8 = max((r for r in ok if r["dtype"] == "fp8"), key=lambda r: r["tokens_per_s"], default=None)
        out = record("llm_stage", args.slug or size, {
            "model": name, "weights": "random (published configuration)",
            "docs": len(docs), "tokens": int(lengths.sum()), "mean_tokens": round(float(lengths.mean()), 1),
            "max_seq_length": args.max_seq_length, "budget_tokens": args.budget,
            "corpus_tokenizer": "MiniLM WordPiece ids as the model's ids, its special tokens at the ends",
            "baseline": f"transformers {type(config).__name__[:-6]}Model bf16 sdpa, padded, length-sorted",
            "baseline_tokens_per_s": round(base_rate, 1),
            "baseline_mfu": round(total_flops / base_seconds / PEAK_BF16, 4),
            "reference_docs": len(reference), "baseline_min_cosine_vs_fp32": base_vs_fp32,
            "tokens_per_s": bf16["tokens_per_s"] if bf16 else None, "mfu": bf16["mfu"] if bf16 else None,
            "min_cosine_vs_transformers_bf16": bf16["min_cosine_vs_transformers_bf16"] if bf16 else None,
            "min_cosine_vs_transformers_fp32": bf16["min_cosine_vs_transformers_fp32"] if bf16 else None,
            "fp8_tokens_per_s": fp8["tokens_per_s"] if fp8 else None,
            "fp8_speedup_vs_bf16": round(fp8["tokens_per_s"] / bf16["tokens_per_s"], 3) if fp8 and bf16 else None,
            "fp8_min_cosine": fp8.get("min_cosine_vs_bf16") if fp8 else None,
            "fp8_min_cosine_vs_fp32": fp8["min_cosine_vs_transformers_fp32"] if fp8 else None,
            "flops_per_token": round(total_flops / lengths.sum()), "configs": results,
            **({"profiles": profiles} if args.profile else {})})
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
