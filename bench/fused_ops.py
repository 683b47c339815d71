"""The pieces between the encoder's matmuls alone: eager torch, torch.compile's fused kernels (what the encoder
used), and hpcembed's Triton kernels (hpcembed/engine/triton_fused.py) in several block shapes, on one batch of
--batch-tokens tokens cut from the benchmark corpus as the encoder rank cuts them, MiniLM's hidden size.

    python -m bench.fused_ops --model bench/work/carry/all-MiniLM-L6-v2-fp16 \
        --paragraphs bench/work/carry/paragraphs.txt.gz

Per op: the residual add + LayerNorm ([tokens, 384]), the embedding sum + LayerNorm, and mean pooling. Timing: CUDA
events around --reps calls after warm-up, the median of 5 repeats; each op's first call is timed too (tracing and
compiling for torch.compile, JIT compiling or loading from Triton's cache for Triton). Max |error| against the
eager op computed in fp32. Writes bench/results/fused_ops-<dtype>.json (the device is in it).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench.attention import _time
from bench.common import record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents

LN_SHAPES = ["4:4", "8:4", "16:4", "16:8", "32:8"]          # rows per program : warps
POOL_SHAPES = ["16:4", "32:4", "64:4", "64:8"]              # tokens per step : warps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--batch-tokens", type=int, default=262_144)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import triton

    from hpcembed.engine import ModelSpec
    from hpcembed.engine import triton_fused as tf
    from hpcembed.engine import varlen
    from hpcembed.engine.bert import BertWeights
    from hpcembed.tokenize import HFTokenizer

    spec = ModelSpec.load(args.model)
    tok = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)
    token_lists = tok.encode(build_documents(args.docs, Path(args.paragraphs)))
    lengths = np.array([len(t) for t in token_lists])
    n = int(np.searchsorted(np.cumsum(lengths), args.batch_tokens, side="right"))
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    w = BertWeights(spec.path, dtype, torch.device("cuda"))
    ids = torch.tensor(np.concatenate(token_lists[:n]), dtype=torch.int32, device="cuda")
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths[:n])]), dtype=torch.int32, device="cuda")
    tokens, hidden = ids.shape[0], w.hidden
    seg, positions = varlen.token_layout(ids, cu, n, w.position_offset, w.position.shape[0])
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((tokens, hidden), device="cuda", dtype=dtype, generator=gen)
    residual = torch.randn((tokens, hidden), device="cuda", dtype=dtype, generator=gen)
    layer = w.layers[0]
    print(f"{n:,} texts, {tokens:,} tokens, hidden {hidden}, {args.dtype}", flush=True)

    ops = {
        "add_layer_norm": (lambda o: o.add_layer_norm(x, residual, layer.ln1_w, layer.ln1_b, w.eps),
                           lambda: varlen.add_layer_norm(x.float(), residual.float(), layer.ln1_w.float(),
                                                         layer.ln1_b.float(), w.eps)),
        "embed": (lambda o: o.embed(w.word, w.position, w.type_row, ids, positions, *w.emb_ln, w.eps),
                  lambda: varlen.embed(w.word.float(), w.position.float(), w.type_row.float(), ids, positions,
                                       w.emb_ln[0].float(), w.emb_ln[1].float(), w.eps)),
        "mean_pool": (lambda o: o.mean_pool(x, seg, cu, 0, None),
                      lambda: varlen.mean_pool(x.float(), seg, cu, 0, None)),
    }
    # Bytes each op must move at least: read its inputs once, write its output once.
    moved = {"add_layer_norm": 3 * tokens * hidden * x.element_size(),
             "embed": 3 * tokens * hidden * x.element_size() + 8 * tokens,
             "mean_pool": tokens * hidden * x.element_size() + n * hidden * 4}
    results = []

    def measure(op: str, name: str, fn) -> None:
        started = time.perf_counter()
        try:
            out = fn()
            torch.cuda.synchronize()
            first = time.perf_counter() - started
            us = _time(fn, args.reps)
        except Exception as exc:  # noqa: BLE001 - a shape that does not compile is a result, not the end of the run
            results.append({"op": op, "kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(results[-1], flush=True)
            return
        err = float((out.float() - want[op]).abs().max())
        results.append({"op": op, "kernel": name, "us": round(us, 2), "first_call_seconds": round(first, 3),
                        "tb_per_s": round(moved[op] / us / 1e6, 2), "max_abs_error": err})
        print(results[-1], flush=True)

    want = {op: ref() for op, (_, ref) in ops.items()}
    compiled = varlen.FUSED_OPS["compile"]()
    for op, (call, _) in ops.items():
        measure(op, "eager", lambda call=call: call(varlen._Ops))
        measure(op, "torch.compile", lambda call=call: call(compiled))
    for shape in LN_SHAPES:
        rows, warps = (int(v) for v in shape.split(":"))
        tf.LN_BLOCK_ROWS, tf.LN_WARPS = rows, warps
        for op in ("add_layer_norm", "embed"):
            measure(op, f"triton {shape}", lambda op=op: ops[op][0](tf))
    for shape in POOL_SHAPES:
        block, warps = (int(v) for v in shape.split(":"))
        tf.POOL_BLOCK_TOKENS, tf.POOL_WARPS = block, warps
        measure("mean_pool", f"triton {shape}", lambda: ops["mean_pool"][0](tf))

    baseline = {r["op"]: r["us"] for r in results if r["kernel"] == "torch.compile" and "us" in r}
    rows = [(r["op"], r["kernel"], f"{r['us']:.1f}", f"{baseline.get(r['op'], float('nan')) / r['us']:.2f}x",
             f"{r['tb_per_s']:.2f}", f"{r['first_call_seconds']:.2f}", f"{r['max_abs_error']:.1e}")
            for r in results if "us" in r]
    print(table(rows, ("op", "kernel", "µs", "vs compile", "TB/s", "first call s", "max |err|")))
    path = record("fused_ops", args.dtype, {
        "batch_tokens": tokens, "texts": n, "hidden": hidden, "dtype": args.dtype, "triton": triton.__version__,
        "baseline": "torch.compile of the same eager functions (the encoder's fused ops before), same batch, same run",
        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
