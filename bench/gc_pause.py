"""The garbage collector's pauses in a process built as an encoder rank builds itself (hpcembed/heap.py).

    python -m bench.gc_pause [--model DIR] [--paragraphs PATH] [--device auto|cpu|cuda] [--requests 3000]
                             [--slug NAME]

Builds the model's instances and tokenizer as a server's encoder rank does, then: a full collection timed (best of
3) with the start-up heap in the collector's reach, and again after `heap.settle()`; and the same serving-like
churn (a query's tokenizing, its batch encoded, the answer kept a while, as a server holds requests in flight)
run twice, before and after settle(), with every collection's length recorded by the collector's callbacks.
JSON: bench/results/gc_pause-<slug>.json.
"""
from __future__ import annotations

import argparse
import gc
import time
from collections import deque
from pathlib import Path

from bench.common import record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_queries
from hpcembed.config import JobConfig
from hpcembed.heap import GcPauses, settle
from hpcembed.launch.build import build_encoders, tokenizer_backend
from hpcembed.launch.setup import model_spec
from hpcembed.serve.tokenizing import request_batch


def full_collection_ms(repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 3)


def churn(encoder, backend, queries: list[str], requests: int, in_flight: int) -> dict:
    """`requests` one-query requests, each tokenized and encoded; the last `in_flight` answers (with a dict of
    request fields each) kept alive, as a server keeps requests it has not answered yet."""
    kept: deque = deque(maxlen=in_flight)
    pauses = GcPauses().start()
    start = time.perf_counter()
    try:
        for k in range(requests):
            text = queries[k % len(queries)]
            batch = request_batch(backend.encode([text]))
            kept.append({"text": text, "embedding": encoder.encode(batch),
                         "headers": {"content-type": "application/json", "n": str(k)}})
    finally:
        pauses.stop()
    return {"seconds": round(time.perf_counter() - start, 3), **pauses.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="")
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--in-flight", type=int, default=2000)
    ap.add_argument("--slug", default="cpu")
    args = ap.parse_args()
    cfg = JobConfig(model=args.model, device=args.device)
    spec = model_spec(cfg)
    from hpcembed.engine.build import resolve_device
    encoders = build_encoders(cfg, spec, resolve_device(args.device))
    backend = tokenizer_backend(cfg, spec, chunking=False)
    queries = build_queries(2000, Path(args.paragraphs))
    churn(encoders[0], backend, queries, 50, 10)        # first calls: lazy imports and allocations
    gc.collect()
    objects = len(gc.get_objects())
    before = full_collection_ms()
    unsettled = churn(encoders[0], backend, queries, args.requests, args.in_flight)
    frozen = settle()
    after = full_collection_ms()
    settled = churn(encoders[0], backend, queries, args.requests, args.in_flight)
    rows = [("start-up heap in reach", objects, before, unsettled["gen2"]["collections"],
             unsettled["gen2"]["longest_ms"], unsettled["gen2"]["total_ms"], unsettled["seconds"]),
            ("after settle()", len(gc.get_objects()), after, settled["gen2"]["collections"],
             settled["gen2"]["longest_ms"], settled["gen2"]["total_ms"], settled["seconds"])]
    print(table(rows, ("heap", "objects tracked", "full collection ms", "gen2 collections in churn",
                       "longest ms", "total ms", "churn s")))
    out = record("gc_pause", args.slug, {
        "model": spec.name, "device_used": str(encoders[0].device_name), "requests": args.requests,
        "in_flight": args.in_flight, "objects_tracked": objects, "objects_frozen": frozen,
        "full_collection_ms_before": before, "full_collection_ms_after": after,
        "churn_before_settle": unsettled, "churn_after_settle": settled})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
