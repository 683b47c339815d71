"""A rehearsal (`hpcembed run --rehearse TOKENIZER,ENCODER`): the whole job, every rank in its real role over the
real transport, with the two compute stages replaced by stand-ins that take the time the given rates say and do
nothing else. The conductor, sub-conductors, credits, routing, reading, digests, shard writing, the ledger and the
manifest are the real ones; so a rehearsal measures the control plane at a fan-in no GPU box here has (hundreds of
ranks on CPU cores, bench/fanin.py), and `hpcembed scaling measure` can replay it in the simulation.

- A tokenizer rank's stand-in gives each text `2 + len(text) // 4` tokens (capped at max_seq_length), all id 0,
  and sleeps until its batch has taken tokens / TOKENIZER seconds: a core tokenizing at that rate, but idle.
- An encoder rank's stand-in is one server at ENCODER tokens/s, as a GPU is: a batch launched while another
  runs finishes after it, and nothing holds a core meanwhile. Embeddings are zeros.

Rehearsal output is not embeddings: its fingerprint says it is a rehearsal (a real job never resumes it, --reuse
never takes it), its manifest says so, and it gets no _SUCCESS marker.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from .engine.base import Encoder, Pending
from .errors import ConfigError
from .tokenize.batch import TokenBatch


def parse_rates(text: str) -> tuple[float, float]:
    """'TOKENIZER,ENCODER' tokens/s, both positive; ConfigError naming the option otherwise."""
    parts = text.replace(" ", "").split(",")
    try:
        rates = [float(p) for p in parts]
    except ValueError:
        rates = []
    if len(rates) != 2 or not all(r > 0 and np.isfinite(r) for r in rates):
        raise ConfigError(f"--rehearse takes TOKENIZER,ENCODER: tokens/s of one tokenizer rank and of one encoder "
                          f"rank, both positive (e.g. 1e6,1.2e7); got {text!r}")
    return rates[0], rates[1]


class StandInTokenizer:
    """What a tokenizer rank tokenizes with in a rehearsal (the backend interface: encode, describe)."""

    name = "rehearsal"

    def __init__(self, max_seq_length: int, tokens_per_s: float):
        self.max_seq_length, self.tokens_per_s = max_seq_length, tokens_per_s
        self._zeros = np.zeros(max(max_seq_length, 2), dtype=np.int32)

    def lengths(self, texts: list[str]) -> np.ndarray:
        chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        return np.minimum(2 + chars // 4, self.max_seq_length)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        start = time.perf_counter()
        lengths = self.lengths(texts)
        ids = [self._zeros[:n] for n in lengths.tolist()]
        left = int(lengths.sum()) / self.tokens_per_s - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        return ids

    def fingerprint(self) -> str:
        return f"rehearsal:{self.tokens_per_s:g}"

    def describe(self) -> dict:
        return {"tokenizer_backend": self.name}


class _Due(Pending):
    def __init__(self, due: float, rows: int, dim: int):
        super().__init__()
        self.due, self.rows, self.dim = due, rows, dim

    def result(self) -> np.ndarray:
        left = self.due - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return np.zeros((self.rows, self.dim), dtype=np.float32)


class StandInEncoder(Encoder):
    """An encoder rank's one instance in a rehearsal: a single server at `tokens_per_s` (InstancePool's thread
    launches ahead, so batches queue on it as they would on a GPU stream)."""

    engine, pads, dtype_name, device_name = "rehearsal", False, "none", "rehearsal"
    launch_ahead = 2

    def __init__(self, spec, tokens_per_s: float):
        self.spec, self.tokens_per_s = spec, tokens_per_s
        self.build_seconds = {}
        self._free_at = 0.0
        self._lock = threading.Lock()

    def launch(self, batch: TokenBatch) -> Pending:
        with self._lock:
            self._free_at = max(self._free_at, time.perf_counter()) + batch.num_tokens / self.tokens_per_s
            return _Due(self._free_at, batch.num_rows, self.spec.dim)

    def encode(self, batch: TokenBatch) -> np.ndarray:
        return self.launch(batch).result()
