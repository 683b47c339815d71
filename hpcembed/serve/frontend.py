"""The server's backend on rank 0 of an mpiexec or srun world (serve/ranks.py): requests go out over the
transport and their embeddings come back from the encoder ranks; this process only parses and answers.

- A bulk request is cut into pieces of at most --bulk-piece-texts texts. Each goes to the tokenizer rank with the
  fewest texts outstanding, which sends its token batch to the encoder rank named in the message: the one with
  the fewest (estimated) tokens outstanding. The frontend knows everything in flight, so its counts are the
  encoder ranks' free credit without a credit message.
- A small request (and token-id input) is tokenized here (serve/tokenizing.py) and goes straight to an encoder rank: a
  query does not pay a tokenizer rank's round trip. Its batch and its answer are urgent messages, which the
  transport hands over before bulk work waiting in it, and the encoder rank's scheduler takes it first.
- Admission control predicts a request's wait from the tokens outstanding in each lane (texts not yet tokenized
  estimated from their UTF-8 length, at the bytes per token measured so far) over the encoder ranks' measured
  rates, which every answer updates.

One thread: the event loop both serves HTTP and talks to the transport (a task takes every message that has come,
then yields; it sleeps PUMP_IDLE_SECONDS when none had). A second thread for the transport made the two convoy on
the GIL: on the H200 box every answer waited behind the bulk answers queued before it (query p50 under bulk load
427 ms, bench/notes/serve.md).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from ..protocol.messages import Failure, ServeEmbedded, ServeReady, ServeStop, ServeTexts
from ..tokenize.batch import TokenBatch
from ..transport.base import Transport
from .requests import EmbeddingsRequest
from .scheduler import LANES, Unavailable, admit_or_refuse

PUMP_IDLE_SECONDS = 0.0005  # the transport task's sleep when nothing came in
FIRST_BYTES_PER_TOKEN = 4.0


@dataclass
class _Piece:
    encoder: int
    tokenizer: int | None
    texts: int
    estimated: float            # tokens, as counted outstanding
    nbytes: int
    sent_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Pending:
    future: asyncio.Future
    lane: str
    embeddings: np.ndarray
    remaining: int
    accepted_at: float
    tokens: int = 0
    pieces: dict[int, _Piece] = field(default_factory=dict)    # first row -> piece


def pieces(count: int, most: int) -> list[tuple[int, int]]:
    """[first, stop) of a bulk request's pieces of at most `most` texts, as even as can be."""
    n = -(-count // most)
    bounds = [count * k // n for k in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class FrontendBackend:
    def __init__(self, transport: Transport, tokenizers: list[int], ready: dict[int, ServeReady], dim: int,
                 max_tokens: int, batch_tokens: int, piece_texts: int, small_tokenizing, metrics,
                 tokenizer_name: str):
        self.transport, self.tokenizers, self.dim = transport, tokenizers, dim
        self.max_tokens, self.batch_tokens, self.piece_texts = max_tokens, batch_tokens, piece_texts
        self.small_tokenizing, self.metrics, self.tokenizer_name = small_tokenizing, metrics, tokenizer_name
        self.ready = ready
        self.rates = {e: dict(r.rates) for e, r in ready.items()}
        self.busy = {e: 0.0 for e in ready}
        self._pending: dict[int, _Pending] = {}
        self._keys = itertools.count(1)
        self._encoder_tokens = {e: 0.0 for e in ready}
        self._tokenizer_texts = {t: 0 for t in tokenizers}
        self.lane_tokens = {lane: 0.0 for lane in LANES}
        self.lane_requests = {lane: 0 for lane in LANES}
        self._bytes_per_token = FIRST_BYTES_PER_TOKEN
        self.failed: str | None = None
        self.closing = False
        self._task: asyncio.Task | None = None
        self._on_failure = None

    # -- requests ------------------------------------------------------------------------------------------------

    def capacity(self, lane: str) -> float:
        """Tokens per second all encoder ranks give `lane`: each one's measured rate times the instances that take
        the lane (those reserved for the interactive lane, where a rank has any, take only it)."""
        def instances(r: ServeReady) -> int:
            if lane == "bulk":
                return r.instances - r.reserved
            return r.reserved or r.instances
        return sum(self.rates[e][lane] * instances(r) for e, r in self.ready.items())

    def predicted_wait(self, lane: str) -> float:
        """As the one-process scheduler predicts it (serve/scheduler.py), over what this frontend has outstanding:
        for a small request its lane's tokens and, unless every encoder rank has instances for the lane, one bulk
        batch; for a bulk one, everything on the bulk instances."""
        own = all(r.reserved for r in self.ready.values())
        if lane == "interactive":
            running = 0 if own else min(self.lane_tokens["bulk"], self.batch_tokens)
            bulk_rate = min(self.rates[e]["bulk"] for e in self.ready)
            return self.lane_tokens["interactive"] / self.capacity("interactive") + running / bulk_rate
        return sum(self.lane_tokens[name] / self.capacity(name) for name in (("bulk",) if own else LANES))

    def admit(self, lane: str, budget: float | None) -> None:
        admit_or_refuse(self.failed or ("the server is shutting down" if self.closing else None), budget,
                        lambda: self.predicted_wait(lane))

    async def embed(self, parsed: EmbeddingsRequest, lane: str, budget: float | None) -> tuple[np.ndarray, int]:
        batch = None
        if parsed.token_ids is not None:
            batch = TokenBatch.build(parsed.token_ids, [""] * parsed.count, np.arange(parsed.count), 0)
        elif lane == "interactive":
            batch = await self.small_tokenizing.tokenize_small(parsed.texts)
        self.admit(lane, budget)
        pending = _Pending(asyncio.get_running_loop().create_future(), lane,
                           np.empty((parsed.count, self.dim), np.float32), parsed.count, time.perf_counter())
        key = next(self._keys)
        self._pending[key] = pending
        self.lane_requests[lane] += 1
        if batch is not None:
            batch.units[:] = key
            self._send_batch(pending, batch)
        else:
            for first, stop in pieces(parsed.count, self.piece_texts):
                self._send_texts(pending, key, first, parsed.texts[first:stop])
        return await pending.future

    def _least_loaded_encoder(self) -> int:
        return min(self._encoder_tokens, key=self._encoder_tokens.__getitem__)

    def _send_batch(self, pending: _Pending, batch: TokenBatch) -> None:
        encoder = self._least_loaded_encoder()
        self._count(pending, 0, _Piece(encoder, None, batch.num_rows, float(batch.num_tokens), 0), +1)
        self.transport.send_batch(encoder, batch, urgent=pending.lane == "interactive")

    def _send_texts(self, pending: _Pending, key: int, first: int, texts: list[str]) -> None:
        encoder = self._least_loaded_encoder()
        tokenizer = min(self._tokenizer_texts, key=self._tokenizer_texts.__getitem__)
        sizes = [len(t.encode("utf-8")) for t in texts]
        estimated = sum(min(n / self._bytes_per_token + 2, self.max_tokens) for n in sizes)
        self._count(pending, first, _Piece(encoder, tokenizer, len(texts), estimated, sum(sizes)), +1)
        self.transport.send(tokenizer, ServeTexts(key, first, texts, encoder))

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
                "reserved": sum(r.reserved for r in self.ready.values()),
                "tokenizing": f"{ranks} tokenizer rank{'s' if ranks != 1 else ''}, {self.tokenizer_name} tokenizer"}

    def gauges(self) -> tuple[dict[str, tuple[int, int]], dict[str, float], float]:
        depth = {lane: (self.lane_requests[lane], int(self.lane_tokens[lane])) for lane in LANES}
        return depth, {lane: self.capacity(lane) for lane in LANES}, sum(self.busy.values()) / len(self.busy)

    # -- the transport -------------------------------------------------------------------------------------------

    def start(self, on_failure) -> None:
        """Start taking messages (in the running event loop); `on_failure()` is called once a rank fails."""
        self._on_failure = on_failure
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        while not self.closing:
            # Every message that has come, at each turn: one a turn fell behind the encoder ranks under bulk load
            # (a turn of the loop parses and answers many requests), and a query's answer, which comes from the
            # same encoder rank in order, then waited behind every bulk answer queued before it (H200 box: 199 ms
            # p50 under bulk load; bench/notes/serve.md).
            taken = 0
            while (envelope := self.transport.recv(0)) is not None:
                self.handle(envelope.source, envelope.message)
                taken += 1
            await asyncio.sleep(0 if taken else PUMP_IDLE_SECONDS)

    def handle(self, source: int, message) -> None:
        if isinstance(message, ServeEmbedded):
            self._embedded(source, message)
        elif isinstance(message, Failure):
            self.fail(f"rank {message.rank} ({message.role}) failed: {message.message}")

    def _embedded(self, source: int, msg: ServeEmbedded) -> None:
        self.rates[source], self.busy[source] = msg.rates, msg.busy
        for lane, rows, tokens in msg.batches:
            self.metrics.batch(lane, rows, tokens)
        pending = self._pending.get(msg.key)
        if pending is None:                 # failed meanwhile
            return
        piece = pending.pieces.pop(msg.first)
        self._count(pending, msg.first, piece, -1)
        self.metrics.timed(pending.lane, "encoder", msg.seconds)
        self.metrics.timed(pending.lane, "elsewhere", time.perf_counter() - piece.sent_at - msg.seconds)
        if piece.nbytes:                    # learn the bytes per token from what the tokenizers made
            self._bytes_per_token = 0.9 * self._bytes_per_token + 0.1 * piece.nbytes / max(msg.tokens, 1)
        pending.embeddings[msg.first: msg.first + piece.texts] = msg.embeddings
        pending.remaining -= piece.texts
        pending.tokens += msg.tokens
        if pending.remaining:
            return
        del self._pending[msg.key]
        self.lane_requests[pending.lane] -= 1
        self.metrics.answered(pending.lane, time.perf_counter() - pending.accepted_at)
        if not pending.future.done():       # a client that went away has its handler cancelled
            pending.future.set_result((pending.embeddings, pending.tokens))

    def fail(self, reason: str) -> None:
        """A rank failed: every pending request is answered 503 (Unavailable), and no more are taken."""
        self.failed = self.failed or reason
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(Unavailable(reason))
        self._pending.clear()
        if self._on_failure is not None:
            self._on_failure()

    def close(self) -> None:
        """Every accepted request is answered: stop taking messages."""
        self.closing = True
        self.small_tokenizing.close()

    def settle(self, timeout: float) -> None:
        """After the event loop: take the answers still due (requests whose clients went away before them), so
        that no encoder rank is left with a send nobody takes."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            envelope = self.transport.recv(0.01)
            if envelope is not None:
                self.handle(envelope.source, envelope.message)

    def stop_ranks(self, ranks: list[int]) -> None:
        for rank in ranks:
            self.transport.send(rank, ServeStop())
        self.transport.flush()
