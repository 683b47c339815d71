"""The attention kernel alone, on the benchmark corpus's text lengths: flash attention's varlen kernel (what the
padding-free engine uses) against the Triton kernels (hpcembed/engine/triton_attention.py) in several tile shapes
and, with --cudnn, cuDNN's ragged attention, per layer and batch of --batch-tokens tokens.

    python -m bench.attention --model bench/work/carry/all-MiniLM-L6-v2-fp16 \
        --paragraphs bench/work/carry/paragraphs.txt.gz [--shape qwen3-0.6b]

--shape minilm (the default): MiniLM's 12 heads of 32, bidirectional, texts cut at the model's limit.
--shape qwen3-0.6b / qwen3-4b: Qwen3-Embedding's 16 (32) query heads and 8 key/value heads of 128, causal, texts
cut at 512 tokens by --model's tokenizer (as bench/llm_stage.py does); the grouped Triton kernel in
--decoder-tiles shapes.

Q, K and V are random (N(0,1)), in the fused projection's layout [tokens, heads + 2 * kv_heads, head_dim]; a
sample of texts is also computed in fp32 (SDPA per text) for each kernel's error. Timing: CUDA events around
--reps calls after warm-up, the median of 5 repeats. Writes bench/results/attention-<dtype>[-<shape>].json.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from bench.common import record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents

TILES = ["128:64:4:3", "128:64:4:2", "128:32:4:3", "64:64:4:3", "64:32:4:3", "64:64:4:4", "128:64:4:4", "64:64:2:3",
         "128:32:8:3", "128:128:4:3", "64:128:4:3"]


def _time(fn, reps: int) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return statistics.median(times)


DECODER_TILES = ["128:64:8:2", "128:64:4:2", "128:32:4:3", "128:64:8:3", "64:64:4:2", "256:64:8:2", "128:128:8:2"]
SHAPES = {  # heads, kv_heads, head_dim, causal, text limit (None: the model's), batch tokens
    "minilm": (12, 12, 32, False, None, 262_144),
    "qwen3-0.6b": (16, 8, 128, True, 512, 65_536),
    "qwen3-4b": (32, 8, 128, True, 512, 65_536),
}


def _batch_lengths(args, limit):
    from hpcembed.engine import ModelSpec
    from hpcembed.tokenize import HFTokenizer
    spec = ModelSpec.load(args.model)
    tok = HFTokenizer.from_model_dir(spec.path, limit or spec.max_seq_length, spec.lowercase)
    lengths = [len(t) for t in tok.encode(build_documents(args.docs, Path(args.paragraphs)))]
    # One batch as the encoder rank cuts them: texts in input order up to the token budget.
    return np.array(lengths[: int(np.searchsorted(np.cumsum(lengths), args.batch_tokens, side="right"))])


def _kernels(args, qkv, cu, batch, shape):
    """(name, callable giving [tokens, heads, head_dim]) for each kernel that applies to the shape."""
    import torch
    import triton

    from hpcembed.engine import triton_attention as ta
    from hpcembed.engine.decoder import attention_flash
    heads, kv_heads, head_dim, causal = shape[:4]
    tokens, max_len = qkv.shape[0], int(batch.max())
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    group = heads // kv_heads

    def cudnn(repeat: bool, contiguous: bool):
        def run():
            kk, vv = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)) if repeat else (k, v)
            qq, kk, vv = (t.contiguous() for t in (q, kk, vv)) if contiguous else (q, kk, vv)
            return torch.ops.aten._cudnn_attention_forward(qq, kk, vv, None, cu, cu, max_len, max_len, False, 0.0,
                                                           causal)[0]
        return run
    kernels = [("flash varlen_attn", lambda: attention_flash(q, k, v, cu, max_len, causal))]
    if args.cudnn:
        kernels += [("cudnn ragged", cudnn(False, False)), ("cudnn ragged, Q/K/V contiguous", cudnn(False, True))]
        if group > 1:
            kernels.append(("cudnn ragged, K/V repeated", cudnn(True, True)))
    if causal or kv_heads != heads:
        for tile in args.decoder_tiles:
            rows, block_n, warps, stages = (int(x) for x in tile.split(":"))
            kernels.append((f"triton grouped {tile}", lambda rows=rows, block_n=block_n, warps=warps, stages=stages:
                            ta.grouped_attention(q, k, v, cu, max_len, causal, rows, block_n, warps, stages)))
        return kernels
    if not ta.supported(head_dim):
        return kernels
    for tile in args.tiles:
        fields = tile.split(":")
        bm, bn, warps, stages = (int(x) for x in fields[:4])
        pair = fields[4:] == ["p"]

        def run(bm=bm, bn=bn, warps=warps, stages=stages, pair=pair):
            out = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device="cuda")
            ta._varlen_forward[(len(batch), triton.cdiv(max_len, bm), heads // 2 if pair else heads)](
                qkv, out, cu, qkv.stride(0), out.stride(0), 1.4426950408889634 / head_dim ** 0.5, HEADS=heads,
                HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, PAIR=pair, num_warps=warps, num_stages=stages)
            return out
        kernels.append((f"triton {tile}", run))
    return kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the model directory whose tokenizer cuts the texts")
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--shape", default="minilm", choices=sorted(SHAPES))
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--batch-tokens", type=int, help="default: 262,144 (minilm), 65,536 (qwen3 shapes)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--slug", default="", help="appended to the JSON's name")
    ap.add_argument("--cudnn", action="store_true", help="also cuDNN's ragged attention (about 28 ms a call on the "
                    "H200 box, bench/notes/llm_stage.md)")
    ap.add_argument("--decoder-tiles", nargs="*", default=DECODER_TILES,
                    help="qwen3 shapes: rows (all heads of a group):BLOCK_N:warps:stages of the grouped kernel")
    ap.add_argument("--tiles", nargs="*", default=TILES,
                    help="BLOCK_M:BLOCK_N:warps:stages[:p] (p: two heads per program)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch.nn.functional as F

    shape = SHAPES[args.shape]
    heads, kv_heads, head_dim, causal, limit, default_budget = shape
    args.batch_tokens = args.batch_tokens or default_budget
    batch = _batch_lengths(args, limit)
    tokens, max_len = int(batch.sum()), int(batch.max())
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn((tokens, heads + 2 * kv_heads, head_dim), device="cuda", dtype=dtype, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(batch)]), device="cuda", dtype=torch.int32)
    print(f"{args.shape}: {len(batch):,} texts, {tokens:,} tokens (mean {tokens / len(batch):.1f}, longest "
          f"{max_len}); {int((batch.astype(np.int64) ** 2).sum()) * heads / 1e6:.0f}M scores per layer", flush=True)

    # fp32 reference, text by text (a sample of texts, to bound its time).
    sample = np.linspace(0, len(batch) - 1, 200).astype(int)
    starts = np.concatenate([[0], np.cumsum(batch)])

    def errors(out) -> float:
        worst = 0.0
        for i in sample:
            a, b = int(starts[i]), int(starts[i + 1])
            q, k, v = (qkv[a:b, sl].float().transpose(0, 1)[None] for sl in (
                slice(0, heads), slice(heads, heads + kv_heads), slice(heads + kv_heads, None)))
            k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)[0].transpose(0, 1)
            worst = max(worst, float((out[a:b].float() - ref).abs().max()))
        return worst

    results = []
    for name, run in _kernels(args, qkv, cu, batch, shape):
        try:
            results.append({"kernel": name, "us": _time(run, args.reps), "max_abs_error": errors(run())})
        except Exception as exc:  # noqa: BLE001 - a kernel that does not run on this build is a result
            results.append({"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(results[-1], flush=True)
    baseline = results[0]["us"]
    rows = [(r["kernel"], f"{r['us']:.1f}", f"{baseline / r['us']:.2f}x", f"{r['max_abs_error']:.2e}")
            for r in results if "us" in r]
    print(table(rows, ("kernel", "µs per layer", "vs flash", "max |err| vs fp32")))
    slug = "-".join(part for part in (args.dtype, args.shape if args.shape != "minilm" else "", args.slug) if part)
    path = record("attention", slug, {
        "shape": args.shape, "batch_tokens": tokens, "texts": len(batch), "longest": max_len, "heads": heads,
        "kv_heads": kv_heads, "head_dim": head_dim, "causal": causal, "dtype": args.dtype,
        "baseline": "flash attention varlen_attn, same batch, same run", "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
