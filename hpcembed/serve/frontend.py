"""The server's backend on rank 0 of an mpiexec or srun world (serve/ranks.py): requests go out over the
transport and their embeddings come back from the encoder ranks; this process only parses and answers.

- A bulk request is cut into pieces of at most PIECE_TEXTS texts. Each goes to the tokenizer rank with the fewest
  texts outstanding, which sends its token batch to the encoder rank named in the message: the one with the
  fewest (estimated) tokens outstanding. The frontend knows everything in flight, so its counts are the encoder
  ranks' free credit without a credit message.
- A small request (and token-id input) is tokenized here, in a thread, and goes straight to an encoder rank: a
  query does not pay a tokenizer rank's round trip. The encoder rank's scheduler takes it first (two lanes).
- Admission control predicts a request's wait from the tokens outstanding in each lane (texts not yet tokenized
  estimated from their UTF-8 length, at the bytes per token measured so far) over the encoder ranks' measured
  rates, which every answer updates.

Threads: the event loop (serve/server.py) calls admit() and embed(); the process's main thread runs pump(), the
only caller of the transport. They share the tables under one lock; answers reach the loop through
call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..protocol.messages import Failure, ServeEmbedded, ServeReady, ServeStop, ServeTexts
from ..tokenize.batch import TokenBatch
from ..transport.base import Transport
from .requests import EmbeddingsRequest
from .scheduler import LANES, Overloaded, Unavailable

PIECE_TEXTS = 32            # a bulk request's texts per tokenizer-rank message: one request spreads over ranks
PUMP_IDLE_SECONDS = 0.0005  # the main thread's wait for work to send when nothing came in (a sleep: no spinning)
FIRST_BYTES_PER_TOKEN = 4.0


@dataclass
class _Piece:
    encoder: int
    tokenizer: int | None
    texts: int
    estimated: float            # tokens, as counted outstanding
    nbytes: int


@dataclass
class _Pending:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    lane: str
    embeddings: np.ndarray
    remaining: int
    accepted_at: float
    tokens: int = 0
    pieces: dict[int, _Piece] = field(default_factory=dict)    # first row -> piece


def _pieces(count: int) -> list[tuple[int, int]]:
    """[first, stop) of a bulk request's pieces, as even as can be."""
    n = -(-count // PIECE_TEXTS)
    bounds = [count * k // n for k in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _settle(future: asyncio.Future, value=None, error: Exception | None = None) -> None:
    if not future.done():           # a client that went away has its handler cancelled
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class FrontendBackend:
    def __init__(self, transport: Transport, tokenizers: list[int], ready: dict[int, ServeReady], dim: int,
                 max_tokens: int, batch_tokens: int, small_tokenizing, metrics, tokenizer_name: str):
        self.transport, self.tokenizers, self.dim = transport, tokenizers, dim
        self.max_tokens, self.batch_tokens = max_tokens, batch_tokens
        self.small_tokenizing, self.metrics, self.tokenizer_name = small_tokenizing, metrics, tokenizer_name
        self.ready = ready
        self.rates = {e: dict(r.rates) for e, r in ready.items()}
        self.busy = {e: 0.0 for e in ready}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._outbox: deque = deque()
        self._pending: dict[int, _Pending] = {}
        self._keys = itertools.count(1)
        self._encoder_tokens = {e: 0.0 for e in ready}
        self._tokenizer_texts = {t: 0 for t in tokenizers}
        self.lane_tokens = {lane: 0.0 for lane in LANES}
        self.lane_requests = {lane: 0 for lane in LANES}
        self._bytes_per_token = FIRST_BYTES_PER_TOKEN
        self.failed: str | None = None
        self.closing = False

    # -- the event loop's side -----------------------------------------------------------------------------------

    def capacity(self, lane: str) -> float:
        """Tokens per second all encoder ranks give `lane`: each one's measured rate times its instances."""
        return sum(self.rates[e][lane] * self.ready[e].instances for e in self.ready)

    def predicted_wait(self, lane: str) -> float:
        """As the one-process scheduler predicts it (serve/scheduler.py), over what this frontend has outstanding:
        for a small request its lane's tokens and one bulk batch; for a bulk one, everything."""
        if lane == "interactive":
            running = min(self.lane_tokens["bulk"], self.batch_tokens)
            bulk_rate = min(self.rates[e]["bulk"] for e in self.ready)
            return self.lane_tokens["interactive"] / self.capacity("interactive") + running / bulk_rate
        return sum(self.lane_tokens[name] / self.capacity(name) for name in LANES)

    def admit(self, lane: str, budget: float | None) -> None:
        with self._lock:
            self._admit(lane, budget)

    def _admit(self, lane: str, budget: float | None) -> None:
        if self.failed or self.closing:
            raise Unavailable(self.failed or "the server is shutting down")
        if budget is not None:
            predicted = self.predicted_wait(lane)
            if predicted > budget:
                raise Overloaded(predicted, budget)

    async def embed(self, parsed: EmbeddingsRequest, lane: str, budget: float | None) -> tuple[np.ndarray, int]:
        batch = None
        if parsed.token_ids is not None:
            batch = TokenBatch.build(parsed.token_ids, [""] * parsed.count, np.arange(parsed.count), 0)
        elif lane == "interactive":
            batch = await asyncio.wrap_future(self.small_tokenizing.small(parsed.texts))
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), loop, lane, np.empty((parsed.count, self.dim), np.float32),
                           parsed.count, time.perf_counter())
        with self._lock:
            self._admit(lane, budget)
            key = next(self._keys)
            self._pending[key] = pending
            self.lane_requests[lane] += 1
            if batch is not None:
                batch.units[:] = key
                self._send_batch(pending, batch)
            else:
                for first, stop in _pieces(parsed.count):
                    self._send_texts(pending, key, first, parsed.texts[first:stop])
        self._wake.set()
        return await pending.future

    def _least_loaded_encoder(self) -> int:
        return min(self._encoder_tokens, key=self._encoder_tokens.__getitem__)

    def _send_batch(self, pending: _Pending, batch: TokenBatch) -> None:
        encoder = self._least_loaded_encoder()
        piece = _Piece(encoder, None, batch.num_rows, float(batch.num_tokens), 0)
        self._count(pending, 0, piece, +1)
        self._outbox.append((True, encoder, batch))

    def _send_texts(self, pending: _Pending, key: int, first: int, texts: list[str]) -> None:
        encoder = self._least_loaded_encoder()
        tokenizer = min(self._tokenizer_texts, key=self._tokenizer_texts.__getitem__)
        sizes = [len(t.encode("utf-8")) for t in texts]
        per_text = [min(n / self._bytes_per_token + 2, self.max_tokens) for n in sizes]
        piece = _Piece(encoder, tokenizer, len(texts), sum(per_text), sum(sizes))
        self._count(pending, first, piece, +1)
        self._outbox.append((False, tokenizer, ServeTexts(key, first, texts, encoder)))

    def _count(self, pending: _Pending, first: int, piece: _Piece, sign: int) -> None:
        if sign > 0:
            pending.pieces[first] = piece
        self._encoder_tokens[piece.encoder] += sign * piece.estimated
        self.lane_tokens[pending.lane] += sign * piece.estimated
        if piece.tokenizer is not None:
            self._tokenizer_texts[piece.tokenizer] += sign * piece.texts

    def describe(self) -> dict:
        first = next(iter(self.ready.values()))
        ranks = len(self.tokenizers)
        return {**first.about, "instances": sum(r.instances for r in self.ready.values()),
                "tokenizing": f"{ranks} tokenizer rank{'s' if ranks != 1 else ''}, {self.tokenizer_name} tokenizer"}

    def gauges(self) -> tuple[dict[str, tuple[int, int]], dict[str, float], float]:
        with self._lock:
            depth = {lane: (self.lane_requests[lane], int(self.lane_tokens[lane])) for lane in LANES}
            rates = {lane: self.capacity(lane) for lane in LANES}
            return depth, rates, sum(self.busy.values()) / len(self.busy)

    def close(self) -> None:
        with self._lock:
            self.closing = True
        self.small_tokenizing.close()

    # -- the main thread's side ----------------------------------------------------------------------------------

    def pump(self, until) -> None:
        """Send what the loop queued and take what comes back, until `until()` is true. The only caller of the
        transport in this process."""
        while not until():
            sent = self._send_queued()
            envelope = self.transport.recv(0)
            if envelope is not None:
                self.handle(envelope.source, envelope.message)
            elif not sent:
                self._wake.wait(PUMP_IDLE_SECONDS)
                self._wake.clear()

    def _send_queued(self) -> bool:
        sent = False
        while self._outbox:
            is_batch, dest, message = self._outbox.popleft()
            if is_batch:
                self.transport.send_batch(dest, message)
            else:
                self.transport.send(dest, message)
            sent = True
        return sent

    def handle(self, source: int, message) -> None:
        if isinstance(message, ServeEmbedded):
            self._embedded(source, message)
        elif isinstance(message, Failure):
            self.fail(f"rank {message.rank} ({message.role}) failed: {message.message}")

    def _embedded(self, source: int, msg: ServeEmbedded) -> None:
        self.rates[source], self.busy[source] = msg.rates, msg.busy
        for lane, rows, tokens in msg.batches:
            self.metrics.batch(lane, rows, tokens)
        with self._lock:
            pending = self._pending.get(msg.key)
            if pending is None:             # failed meanwhile
                return
            piece = pending.pieces.pop(msg.first)
            self._count(pending, msg.first, piece, -1)
            if piece.nbytes:                # learn the bytes per token from what the tokenizers made
                self._bytes_per_token = 0.9 * self._bytes_per_token + 0.1 * piece.nbytes / max(msg.tokens, 1)
            pending.embeddings[msg.first: msg.first + piece.texts] = msg.embeddings
            pending.remaining -= piece.texts
            pending.tokens += msg.tokens
            if pending.remaining:
                return
            del self._pending[msg.key]
            self.lane_requests[pending.lane] -= 1
        self.metrics.answered(pending.lane, time.perf_counter() - pending.accepted_at)
        pending.loop.call_soon_threadsafe(_settle, pending.future, (pending.embeddings, pending.tokens))

    def fail(self, reason: str) -> None:
        """A rank failed: every pending request is answered 503 (Unavailable), and no more are taken."""
        with self._lock:
            self.failed = self.failed or reason
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            p.loop.call_soon_threadsafe(_settle, p.future, None, Unavailable(reason))

    def stop_ranks(self, ranks: list[int]) -> None:
        for rank in ranks:
            self.transport.send(rank, ServeStop())
        self.transport.flush()
