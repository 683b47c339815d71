"""What a row's content digest costs a tokenizer rank: io/digest.py text_digests (xxh3-128 of the text, what text
rows carry) and row_digests (of the token ids: token directories, chunked windows) against tokenizing the same
rows, on one core, on the benchmark corpus and on short queries.

    python -m bench.digest [--docs 50000]

Both are timed over the same rows in batches of 1,024 (a tokenizer rank's chunk), best of 3. The baseline is the
tokenizer the job would use (budtiktok where installed, else HF), measured in the same run.
Writes bench/results/digest-cpu.json.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.common import record, table
from bench.corpus import build_documents


def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50_000)
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")      # one core, as one tokenizer rank has
    from hpcembed.engine.model import ModelSpec, default_model_dir
    from hpcembed.io.digest import row_digests, text_digests
    from hpcembed.tokenize import make_tokenizer
    from hpcembed.tokenize.batch import TokenBatch

    spec = ModelSpec.load(default_model_dir())
    backend = make_tokenizer(spec.path, spec.max_seq_length, spec.lowercase)
    docs = build_documents(args.docs)
    corpora = {"standard": docs, "short queries": [" ".join(d.split()[:12]) for d in docs]}
    rows = []
    for name, texts in corpora.items():
        chunks = [texts[k: k + 1024] for k in range(0, len(texts), 1024)]
        batches = [TokenBatch.build(backend.encode(c), [str(k) for k in range(len(c))], np.arange(len(c)), 0)
                   for c in chunks]
        tokenize = _best(lambda: [backend.encode(c) for c in chunks])
        digest = _best(lambda: [row_digests(b.token_ids, b.offsets, 12345) for b in batches])
        by_text = _best(lambda: [text_digests(c, 12345) for c in chunks])
        tokens = sum(b.num_tokens for b in batches)
        rows.append({"corpus": name, "rows": len(texts), "mean_tokens": round(tokens / len(texts), 1),
                     "tokenize_us_per_row": round(1e6 * tokenize / len(texts), 3),
                     "digest_us_per_row": round(1e6 * digest / len(texts), 3),
                     "digest_share_of_tokenizing": round(digest / tokenize, 4),
                     "text_digest_us_per_row": round(1e6 * by_text / len(texts), 3),
                     "text_digest_share_of_tokenizing": round(by_text / tokenize, 4)})
        print(rows[-1], flush=True)
    print(table([(r["corpus"], f"{r['rows']:,}", r["mean_tokens"], r["tokenize_us_per_row"], r["digest_us_per_row"],
                  r["text_digest_us_per_row"], f"{r['text_digest_share_of_tokenizing']:.2%}") for r in rows],
                ("corpus", "rows", "mean tokens", "tokenize µs/row", "ids digest µs/row", "text digest µs/row",
                 "text digest / tokenize")))
    path = record("digest", "cpu", {"tokenizer_backend": backend.name, "batch_rows": 1024,
                                     "baseline": "tokenizing the same rows with the job's backend, same run",
                                     "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
