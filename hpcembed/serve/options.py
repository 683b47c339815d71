"""`hpcembed serve`'s own options (beside the model and engine options it shares with `hpcembed run`). Kept apart
from the server so that the CLI can list them without importing the HTTP stack."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import _opt
from ..errors import ConfigError

# The options of `hpcembed run` that `hpcembed serve` takes too: the model, its prompt, and the engine.
SERVE_FIELDS = ("model", "pooling", "normalize", "max_seq_length", "prompt", "prompt_name", "device", "dtype",
                "engine", "fused_ops", "cuda_graphs", "cache_dir", "attention", "exact_gelu", "tokenizer_backend",
                "max_batch_tokens", "instances_per_gpu", "tokenizer_ranks")


@dataclass
class ServeOptions:
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = _opt(8000, "port to listen on (0: any free port, printed at start)")
    latency_budget_ms: float = _opt(10_000.0, "a request's latency budget unless its X-Latency-Budget-Ms header "
                                              "gives one: when the predicted wait (tokens queued ahead over the "
                                              "measured rate) is over it, the answer is 429 with Retry-After at "
                                              "once; 0 turns admission control off")
    max_request_texts: int = _opt(2048, "most texts one request may hold")
    max_text_chars: int = _opt(1_000_000, "longest text, in characters, a request may hold (texts are truncated "
                                          "at the model's max_seq_length tokens, as `hpcembed run` does)")
    interactive_max_texts: int = _opt(16, "requests of at most this many texts (and --interactive-max-tokens) "
                                          "take the low-latency lane, which is never queued behind bulk work")
    interactive_max_tokens: int = _opt(4096, "... and of at most this many tokens; also the size of the "
                                             "low-latency lane's batches")
    interactive_instances: int = _opt(1, "on a GPU, model instances of the low-latency lane's own, beside "
                                         "--instances-per-gpu: they share the weights, run on a stream of the "
                                         "highest priority, and take no bulk work, so a query waits for no bulk "
                                         "batch (0: both lanes share the instances)")
    bulk_piece_texts: int = _opt(256, "under mpiexec: a bulk request goes to the tokenizer ranks in pieces of at "
                                      "most this many texts, so that a large request is tokenized by several ranks "
                                      "(smaller pieces cost the frontend more messages: 64 served 28-30% fewer "
                                      "texts/s than 256 on the H200 box)")
    tokenizer_threads: int = _opt(4, "threads tokenizing requests (bulk ones only where there are no tokenizing "
                                     "processes)")
    tokenizer_processes: int = _opt(-1, "processes tokenizing bulk requests (a process tokenizes at about one "
                                        "core's rate, whatever its threads); -1: on CUDA one per core beyond 4, at "
                                        "most 12; on CPU none, the encoder's threads take the cores")


    def __post_init__(self):
        for name in ("max_request_texts", "max_text_chars", "interactive_max_texts", "interactive_max_tokens",
                     "bulk_piece_texts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.interactive_instances < 0:
            raise ConfigError(f"--interactive-instances must be 0 or more, got {self.interactive_instances}")


SERVE_OPTIONS = {f.name: f for f in dataclasses.fields(ServeOptions)}
