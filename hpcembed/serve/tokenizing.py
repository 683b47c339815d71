"""Where the server's requests are tokenized: threads for small requests, processes for bulk ones.

One Python process tokenizes at about one core's rate whatever its thread count: the backends' per-text work
(BudTikTok's fallback checks and truncation, HF's list building) holds the GIL. On the H200 box the server's bulk
load got 7.4k texts/s with 4 tokenizing threads and 15.9k with 12 (HF tokenizer; bench/notes/serve.md), against
the GPU's 100k. So bulk requests go to processes of their own, each with its own backend, and come back as the
token batch the scheduler takes (pickled numpy arrays: small beside the texts). Small requests stay in the
server's process: a query never pays the round trip to another process, and never waits behind bulk texts. A
short one is tokenized at once on the event loop (`small_now`; about 0.1 ms for a one-text query on the 2-core CPU
box): handing it to a thread cost a wait for the GIL and a turn of a loop that bulk requests keep busy; a long one
goes to a thread, so that no request's text holds the loop.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from ..config import JobConfig
from ..engine import ModelSpec
from ..tokenize.batch import TokenBatch

SMALL_THREADS = 2
INLINE_CHARS = 8192         # a small request of at most this many characters is tokenized on the event loop
AUTO_SPARE_CORES = 4        # the event loop, the scheduler and the encoder instances' threads
AUTO_MAX_PROCESSES = 12     # about 12M tokens/s of BudTikTok: past what one H200 encodes


def request_batch(token_lists: list) -> TokenBatch:
    """One request's rows as a TokenBatch (no ids: the answer is in request order)."""
    return TokenBatch.build(token_lists, [""] * len(token_lists), np.arange(len(token_lists)), 0)


def auto_processes(device: str, cores: int | None = None) -> int:
    """--tokenizer-processes -1: on CUDA one per core left after AUTO_SPARE_CORES, at most AUTO_MAX_PROCESSES; on
    CPU none, since the encoder's own threads take the cores."""
    if not device.startswith("cuda"):
        return 0
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(AUTO_MAX_PROCESSES, cores - AUTO_SPARE_CORES))


# --- in each tokenizing process ------------------------------------------------------------------------------
_backend = None


def _start(cfg: JobConfig, spec: ModelSpec) -> None:
    global _backend
    from ..launch.build import tokenizer_backend
    _backend = tokenizer_backend(cfg, spec, chunking=False)


def _ready() -> int:
    return os.getpid()


def _tokenize(texts: list[str]) -> TokenBatch:
    return request_batch(_backend.encode(texts))


class Tokenizing:
    """The server's tokenizers: `small(texts)` and `bulk(texts)` each return a concurrent Future of a TokenBatch;
    `tokenize_small(texts)` awaits a small request's batch, tokenized at once where it is short."""

    def __init__(self, cfg: JobConfig, spec: ModelSpec, threads: int, processes: int):
        from ..launch.build import tokenizer_backend
        self._make_backend = lambda: tokenizer_backend(cfg, spec, chunking=False)
        # One backend per thread: a backend is not safe to share between threads (HF's long-text path switches
        # truncation off and on around a call).
        self._per_thread = threading.local()
        self._per_thread.backend = self._make_backend()    # this thread's, the event loop's: built before a query
        self.threads_small = ThreadPoolExecutor(SMALL_THREADS, thread_name_prefix="tokenize-small")
        self.threads_bulk = ThreadPoolExecutor(max(1, threads), thread_name_prefix="tokenize")
        self.processes = processes
        self.pool = None
        if processes:
            # spawn, not fork: the server has threads (and a CUDA context) that a forked child must not inherit.
            self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start, initargs=(cfg, spec))
            # Started now, so a broken backend fails the start and not the first bulk request.
            for future in [self.pool.submit(_ready) for _ in range(processes)]:
                future.result()

    def _in_thread(self, texts: list[str]) -> TokenBatch:
        backend = getattr(self._per_thread, "backend", None)
        if backend is None:
            backend = self._per_thread.backend = self._make_backend()
        return request_batch(backend.encode(texts))

    def small(self, texts: list[str]):
        return self.threads_small.submit(self._in_thread, texts)

    def small_now(self, texts: list[str]) -> TokenBatch | None:
        """The batch of a request of at most INLINE_CHARS characters, tokenized in the calling thread (the event
        loop's); None for a longer one, which goes to small()."""
        if sum(len(t) for t in texts) > INLINE_CHARS:
            return None
        return self._in_thread(texts)

    async def tokenize_small(self, texts: list[str]) -> TokenBatch:
        batch = self.small_now(texts)
        return batch if batch is not None else await asyncio.wrap_future(self.small(texts))

    def bulk(self, texts: list[str]):
        if self.pool is not None:
            return self.pool.submit(_tokenize, texts)
        return self.threads_bulk.submit(self._in_thread, texts)

    def close(self) -> None:
        self.threads_small.shutdown()
        self.threads_bulk.shutdown()
        if self.pool is not None:
            self.pool.shutdown()
