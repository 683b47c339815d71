"""A matmul with the residual add and LayerNorm in its epilogue (bench/gemm_layer_norm_kernel.py) against what the
encoder does: cuBLAS's matmul (F.linear) and then hpcembed's Triton add+LayerNorm, at the two shapes a
BERT layer has, the attention output (K = hidden) and the FFN down projection (K = 4 * hidden), with the model's
own weights of layer 0 and random activations.

    python -m bench.gemm_layer_norm --model bench/work/carry/all-MiniLM-L6-v2-fp16 --tokens 262144

Timing: CUDA events around --reps calls after a warm-up, the median of 5 repeats (bench/attention.py). Each tile
shape (BLOCK_M:BLOCK_K:warps:stages) is a separate compile. Max |error| against the same product in fp32. Writes
bench/results/gemm_layer_norm-[<slug>-]<dtype>.json (the device is in it); prints the best tile per shape.

On an H100 the fused kernel lost at both shapes and the encoder does not use it (bench/notes/gpu_stage.md,
session 29: gemm_layer_norm-h100-fp16.json and -bf16.json).
"""
from __future__ import annotations

import argparse

from bench.attention import _time
from bench.common import record, table

TILES = ["64:64:8:3", "64:64:8:4", "64:32:8:4", "64:32:8:5", "64:128:8:2", "64:64:4:3", "64:32:4:4",
         "128:64:8:3", "128:32:8:3", "128:32:8:4", "32:64:4:3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--tiles", nargs="+", default=TILES)
    ap.add_argument("--slug", default="", help="put in the JSON's name before the dtype (e.g. the GPU)")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    import triton

    from bench import gemm_layer_norm_kernel as triton_gemm_ln
    from hpcembed.engine import ModelSpec, triton_fused
    from hpcembed.engine.bert import BertWeights

    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    spec = ModelSpec.load(args.model)
    w = BertWeights(spec.path, dtype, torch.device("cuda"))
    layer, hidden, tokens = w.layers[0], w.hidden, args.tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    residual = torch.randn((tokens, hidden), device="cuda", dtype=dtype, generator=gen)
    shapes = {"attention output": (layer.out_w, layer.out_b, layer.ln1_w, layer.ln1_b),
              "ffn down": (layer.down_w, layer.down_b, layer.ln2_w, layer.ln2_b)}
    results, best = [], {}
    for shape, (weight, bias, ln_w, ln_b) in shapes.items():
        k = weight.shape[1]
        a = torch.randn((tokens, k), device="cuda", dtype=dtype, generator=gen)
        want = F.layer_norm(F.linear(a.float(), weight.float(), bias.float()) + residual.float(), (hidden,),
                            ln_w.float(), ln_b.float(), w.eps)
        # Bytes at least: a, the weight and the residual read once, the result written once (the matmul alone
        # reads no residual).
        moved = (tokens * k + hidden * k + 2 * tokens * hidden) * a.element_size()
        matmul_moved = moved - tokens * hidden * a.element_size()
        flops = 2 * tokens * k * hidden

        def measure(name: str, fn, check: bool = True, moved: int = moved) -> None:
            try:
                out = fn()
                us = _time(fn, args.reps)
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a result, not the end
                results.append({"shape": shape, "k": k, "kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(results[-1], flush=True)
                return
            entry = {"shape": shape, "k": k, "kernel": name, "us": round(us, 2),
                     "tflop_per_s": round(flops / us / 1e6, 1), "tb_per_s": round(moved / us / 1e6, 2)}
            if check:
                entry["max_abs_error"] = float((out.float() - want).abs().max())
            results.append(entry)
            print(entry, flush=True)

        measure("cuBLAS matmul alone", lambda: F.linear(a, weight, bias), check=False, moved=matmul_moved)
        measure("cuBLAS matmul + Triton add+LayerNorm",
                lambda: triton_fused.add_layer_norm(F.linear(a, weight, bias), residual, ln_w, ln_b, w.eps))
        for tile in args.tiles:
            shape_tile = tuple(int(v) for v in tile.split(":"))
            measure(f"fused {tile}", lambda t=shape_tile: triton_gemm_ln.linear_add_layer_norm(
                a, weight, bias, residual, ln_w, ln_b, w.eps, tile=t))
        fused = [r for r in results if r["shape"] == shape and r["kernel"].startswith("fused") and "us" in r]
        if fused:
            best[shape] = min(fused, key=lambda r: r["us"])["kernel"].split()[1]
    baseline = {r["shape"]: r["us"] for r in results if r["kernel"].startswith("cuBLAS matmul +") and "us" in r}
    rows = [(r["shape"], r["kernel"], f"{r['us']:.1f}", f"{baseline[r['shape']] / r['us']:.2f}x",
             f"{r['tflop_per_s']:.0f}", f"{r['tb_per_s']:.2f}", f"{r.get('max_abs_error', float('nan')):.1e}")
            for r in results if "us" in r]
    print(table(rows, ("shape", "kernel", "µs", "vs two kernels", "TFLOP/s", "TB/s", "max |err|")))
    print("best tiles:", best)
    path = record("gemm_layer_norm", f"{args.slug}-{args.dtype}" if args.slug else args.dtype, {
        "tokens": tokens, "hidden": hidden, "dtype": args.dtype, "triton": triton.__version__,
        "baseline": "cuBLAS matmul (F.linear) then hpcembed's Triton add+LayerNorm, same inputs, same run",
        "best_tiles": best, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
