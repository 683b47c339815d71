"""The garbage collector in long-running ranks: its pauses, measured, and the start-up heap kept out of them.

A process that has imported torch, transformers and pyarrow and built a model holds some 200,000 objects.
CPython's full (generation 2) collection walks all of them: 55 ms on the CPU box (`python -m bench.gc_pause`), and
it stops the process's threads for its length, so a query's answer waits behind it. How often one comes depends on
how many objects outlive two younger collections (a server's requests in flight do; 3,000 single queries in a row
made none in that benchmark): /metrics counts the frontend's, and each serve rank logs its own at exit. The objects
made at start-up (the modules, the model, the tokenizer) live as long as the process, so `settle()` moves them out
of the collector's reach once start-up is done (gc.freeze) and later full collections walk only what came after.
HPCEMBED_GC_FREEZE=0 leaves them in reach, for measuring the difference (bench/serve.py's A/B). The scaling
simulation, which holds millions of live objects, runs under `collector_for_a_large_heap`.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass, field

YOUNG_COLLECTION_ALLOCATIONS = 1_000_000   # between young collections while a simulation runs (Python's: 700)


def settle() -> int:
    """Freeze every object the collector tracks now (the start-up heap) out of later collections. Call when a
    rank's start-up is done. No collection first: one would cost a start-up the full walk this saves, for the
    little start-up garbage it would free. Returns the number of objects frozen."""
    if os.environ.get("HPCEMBED_GC_FREEZE", "1") != "0":
        gc.freeze()
    return gc.get_freeze_count()


@dataclass
class GcPauses:
    """Every collection's length in this process, by generation, from the collector's own callbacks."""
    seconds: dict[int, list[float]] = field(default_factory=lambda: {0: [], 1: [], 2: []})
    _started: float = 0.0
    listener: object = None         # called with (generation, seconds) after each collection, if set

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        generation = info.get("generation", 2)
        self.seconds.setdefault(generation, []).append(took)
        if self.listener is not None:
            self.listener(generation, took)

    def start(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def said(self) -> str:
        """The full collections in a line, for a rank's log at its end."""
        full = self.seconds.get(2, [])
        if not full:
            return "no full garbage collection"
        return (f"{len(full)} full garbage collection{'s' if len(full) != 1 else ''}, longest "
                f"{max(full) * 1e3:.1f} ms, {sum(full) * 1e3:.1f} ms in all")

    def summary(self) -> dict:
        """Per generation: collections, total and longest milliseconds."""
        return {f"gen{g}": {"collections": len(v), "total_ms": round(sum(v) * 1e3, 2),
                            "longest_ms": round(max(v, default=0.0) * 1e3, 2)} for g, v in sorted(self.seconds.items())}


@contextlib.contextmanager
def collector_for_a_large_heap():
    """Python's cycle collector, tuned for a run that holds millions of live objects: the built world is frozen out
    of it and young collections are rarer. With the defaults every full collection walked the whole simulated
    cluster, and a run's time per event grew with its size (bench/notes/scale_out.md, session 19)."""
    freeze = not gc.get_freeze_count()       # a caller's own frozen objects are left as they are
    if freeze:
        gc.collect()
        gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_ALLOCATIONS, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if freeze:
            gc.unfreeze()
