"""The server's backend in one process (`hpcembed serve` without mpiexec): the job's tokenizer backend in this
process's threads and processes (serve/tokenizing.py), and the scheduler (serve/scheduler.py) over this process's
encoder instances."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from ..config import JobConfig
from ..engine import ModelSpec
from ..launch.build import build_encoders, tokenizer_backend
from .metrics import Metrics
from .options import ServeOptions
from .requests import EmbeddingsRequest
from .scheduler import Scheduler, Unavailable
from .tokenizing import Tokenizing, auto_processes, request_batch

WARM_UP_TEXT = "a short query to measure the encoder with, as long as a typical search query is"
WARM_UP_BULK_TOKENS = 65536


def warm_up_rates(encoders, backend, batch_tokens: int) -> dict[str, float]:
    """Each lane's first rate, tokens per second: a small batch (the interactive lane's, on the last of
    `encoders`, which is the lane's own where it has one) and one of the bulk budget (at most WARM_UP_BULK_TOKENS,
    on the first), each timed on its second run."""
    short = backend.encode([WARM_UP_TEXT])[0]
    rates = {}
    for lane, rows, encoder in (("interactive", 8, encoders[-1]),
                                ("bulk", min(batch_tokens, WARM_UP_BULK_TOKENS) // len(short), encoders[0])):
        batch = request_batch([short] * max(rows, 1))
        encoder.encode(batch)
        start = time.perf_counter()
        encoder.encode(batch)
        rates[lane] = batch.num_tokens / max(time.perf_counter() - start, 1e-6)
    return rates


def start_scheduler(cfg: JobConfig, spec: ModelSpec, opts: ServeOptions, device: str, metrics) -> Scheduler:
    """The model's instances, built, with `opts.interactive_instances` of their own for the interactive lane
    where the engine can (the padding-free one on CUDA), under a scheduler whose first rates are measured."""
    batch_tokens = cfg.batch_tokens_for(device)
    encoders = build_encoders(cfg, spec, device, (opts.interactive_instances, opts.interactive_max_tokens))
    reserved = sum(bool(getattr(e, "low_latency", False)) for e in encoders)
    rates = warm_up_rates(encoders, tokenizer_backend(cfg, spec, chunking=False), batch_tokens)
    return Scheduler(encoders, spec.dim, batch_tokens, opts.interactive_max_tokens, opts.interactive_max_texts,
                     rates, metrics, reserved)


def tokenizing_said(processes: int, threads: int, backend: str) -> str:
    where = f"{processes} process{'es' if processes != 1 else ''}" if processes else f"{threads} threads"
    return f"{where}, {backend} tokenizer"


class LocalBackend:
    """Tokenizing and encoding in this process. `failed`: why it takes no more requests, once it does not."""

    def __init__(self, cfg: JobConfig, spec: ModelSpec, opts: ServeOptions, metrics: Metrics):
        from ..engine.build import resolve_device
        device = resolve_device(cfg.device)
        self.scheduler = start_scheduler(cfg, spec, opts, device, metrics)
        self.encoders = self.scheduler.pool.encoders
        self.backend = tokenizer_backend(cfg, spec, chunking=False)
        # Small requests are tokenized by threads of their own, so a query never waits behind bulk requests'
        # texts (measured on the CPU box: 6.3 s query p50 under bulk load with one pool for both).
        processes = (opts.tokenizer_processes if opts.tokenizer_processes >= 0
                     else auto_processes(str(self.encoders[0].device_name)))
        self.tokenizing = Tokenizing(cfg, spec, opts.tokenizer_threads, processes)
        self.threads = opts.tokenizer_threads
        self._failed: str | None = None
        self.started = time.perf_counter()

    @property
    def failed(self) -> str | None:
        return self._failed or self.scheduler.failed

    def admit(self, lane: str, budget: float | None) -> None:
        self.scheduler.admit(lane, budget)

    async def embed(self, parsed: EmbeddingsRequest, lane: str, budget: float | None) -> tuple[np.ndarray, int]:
        """The request's embeddings [rows, dim] and its token count."""
        try:
            if parsed.texts is not None:
                if lane == "interactive":
                    batch = await self.tokenizing.tokenize_small(parsed.texts)
                else:
                    batch = await asyncio.wrap_future(self.tokenizing.bulk(parsed.texts))
            else:
                batch = request_batch(parsed.token_ids)
        except BrokenProcessPool:
            self._failed = "a tokenizing process died"
            raise Unavailable(self._failed) from None
        return await asyncio.wrap_future(self.scheduler.submit(batch, budget)), batch.num_tokens

    def start(self, on_failure) -> None:
        """Nothing to start: an encoder failure reaches the service through the request that met it."""

    def describe(self) -> dict:
        first = self.encoders[0]
        return {"engine": first.engine, "device": first.device_name, "dtype": first.dtype_name,
                "instances": len(self.encoders), "reserved": self.scheduler.pool.reserved,
                "tokenizing": tokenizing_said(self.tokenizing.processes, self.threads, self.backend.name)}

    def gauges(self) -> tuple[dict[str, tuple[int, int]], dict[str, float], float]:
        """Per lane (requests, tokens) waiting; per lane the rate waits are predicted with; the encoders' busy
        fraction since start."""
        busy = self.scheduler.pool.stage_busy_seconds / max(time.perf_counter() - self.started, 1e-9)
        return self.scheduler.queue_depth(), dict(self.scheduler.rates), busy

    def close(self) -> None:
        self.scheduler.close()
        self.tokenizing.close()
