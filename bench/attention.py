"""The attention kernel alone, on the benchmark corpus's text lengths: flash attention's varlen kernel (what the
padding-free encoder used first) against the Triton kernel (hpcembed/engine/triton_attention.py) in several tile
shapes, per layer and batch of --batch-tokens tokens, MiniLM's 12 heads of 32.

    python -m bench.attention --model bench/work/carry/all-MiniLM-L6-v2-fp16 \
        --paragraphs bench/work/carry/paragraphs.txt.gz

Q, K and V are random (N(0,1)), in the fused projection's layout [tokens, 3, heads, 32]; each text's attention
is also computed in fp32 (SDPA per text) for the error of each kernel. Timing: CUDA events around --reps calls
after warm-up, the median of 5 repeats. Writes bench/results/attention-<dtype>.json (the device is in it).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--batch-tokens", type=int, default=262_144)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--tiles", nargs="*", default=TILES,
                    help="BLOCK_M:BLOCK_N:warps:stages[:p] (p: two heads per program)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention.varlen import varlen_attn

    from hpcembed.engine import ModelSpec
    from hpcembed.engine import triton_attention as ta
    from hpcembed.tokenize import HFTokenizer

    spec = ModelSpec.load(args.model)
    tok = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)
    lengths = [len(t) for t in tok.encode(build_documents(args.docs, Path(args.paragraphs)))]
    # One batch as the encoder rank cuts them: texts in input order up to the token budget.
    batch = np.array(lengths[: int(np.searchsorted(np.cumsum(lengths), args.batch_tokens, side="right"))])
    tokens, max_len = int(batch.sum()), int(batch.max())
    heads, head_dim = 12, 32
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn((tokens, 3, heads, head_dim), device="cuda", dtype=dtype, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(batch)]), device="cuda", dtype=torch.int32)
    print(f"{len(batch):,} texts, {tokens:,} tokens (mean {tokens / len(batch):.1f}, longest {max_len}); "
          f"{int((batch.astype(np.int64) ** 2).sum()) * heads / 1e6:.0f}M scores per layer", flush=True)

    # fp32 reference, text by text (a sample of texts, to bound its time).
    sample = np.linspace(0, len(batch) - 1, 200).astype(int)
    starts = np.concatenate([[0], np.cumsum(batch)])

    def errors(out) -> float:
        worst = 0.0
        for i in sample:
            a, b = int(starts[i]), int(starts[i + 1])
            q, k, v = (qkv[a:b, j].float().transpose(0, 1)[None] for j in range(3))
            ref = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)
            worst = max(worst, float((out[a:b].float() - ref).abs().max()))
        return worst

    def flash():
        return varlen_attn(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max_len, max_len)

    results = [{"kernel": "flash varlen_attn", "us": _time(flash, args.reps), "max_abs_error": errors(flash())}]
    baseline = results[0]["us"]
    for tile in args.tiles:
        fields = tile.split(":")
        bm, bn, warps, stages = (int(x) for x in fields[:4])
        pair = fields[4:] == ["p"]

        def run(bm=bm, bn=bn, warps=warps, stages=stages, pair=pair):
            out = torch.empty((tokens, heads, head_dim), dtype=dtype, device="cuda")
            ta._varlen_forward[(len(batch), triton.cdiv(max_len, bm), heads // 2 if pair else heads)](
                qkv, out, cu, qkv.stride(0), out.stride(0), 1.4426950408889634 / head_dim ** 0.5, HEADS=heads,
                HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, PAIR=pair, num_warps=warps, num_stages=stages)
            return out
        try:
            results.append({"kernel": f"triton {tile}", "us": _time(run, args.reps), "max_abs_error": errors(run())})
        except Exception as exc:  # noqa: BLE001 - a tile shape that does not compile is a result, not the end
            results.append({"kernel": f"triton {tile}", "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(results[-1], flush=True)
    rows = [(r["kernel"], f"{r['us']:.1f}", f"{baseline / r['us']:.2f}x", f"{r['max_abs_error']:.2e}")
            for r in results if "us" in r]
    print(table(rows, ("kernel", "µs per layer", "vs flash", "max |err| vs fp32")))
    path = record("attention", args.dtype, {
        "batch_tokens": tokens, "texts": len(batch), "longest": max_len, "heads": heads, "head_dim": head_dim,
        "dtype": args.dtype, "baseline": "flash attention varlen_attn, same batch, same run", "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
