"""`hpcembed serve`: the job's model, engine and tokenizer behind an HTTP endpoint compatible with the OpenAI
embeddings API, for live queries against a corpus embedded with `hpcembed run` (same model, same numbers).

One process: aiohttp's event loop takes requests, the job's tokenizer backend (prompt included) tokenizes them
(small requests in threads, bulk ones in processes of their own on a GPU: serve/tokenizing.py), and the
scheduler (serve/scheduler.py) batches their rows onto the encoder instances in two lanes with admission
control.

- POST /v1/embeddings: `input` a string, a list of strings, or token ids (one list, or a list of lists);
  `model`; `encoding_format` float or base64; `dimensions`. With `Accept: application/octet-stream` the answer
  is the raw little-endian float32 matrix, its shape in X-Embedding-Rows and X-Embedding-Dim. A latency budget
  may come in X-Latency-Budget-Ms.
- GET /health: 200 while serving, 503 once draining or failed. GET /metrics: Prometheus.

Bad requests get a 4xx with an OpenAI-style JSON error naming the field. SIGTERM (or SIGINT) drains: new
requests get 503, accepted ones are answered, then the process exits 0. An encoder failure is answered 503 and
ends the process with exit 1.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import JobConfig
from ..errors import EXIT_FAILED
from ..launch.build import build_encoders, tokenizer_backend
from ..launch.setup import model_spec
from .metrics import Metrics
from .options import ServeOptions
from .requests import BadRequest, Limits, parse
from .scheduler import Overloaded, Scheduler, Unavailable
from .tokenizing import Tokenizing, auto_processes, request_batch

log = logging.getLogger("hpcembed")

WARM_UP_TEXT = "a short query to measure the encoder with, as long as a typical search query is"
WARM_UP_BULK_TOKENS = 65536


class _State:
    def __init__(self):
        self.draining = False
        self.failed = False
        self.in_flight = 0
        self.stop: asyncio.Event | None = None


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status, headers=headers)


def _tokenizing_said(processes: int, threads: int, backend: str) -> str:
    where = f"{processes} process{'es' if processes != 1 else ''}" if processes else f"{threads} threads"
    return f"{where}, {backend} tokenizer"


def _base64_rows(embeddings: np.ndarray) -> list[str]:
    """Each row's little-endian float32 bytes in base64. Where a row is a whole number of 3-byte groups (its
    dimension a multiple of 3, as 384 and 768 are), the matrix is encoded at once and cut at the rows: the same
    strings, from one call instead of one per row."""
    row_bytes = embeddings.shape[1] * embeddings.itemsize
    if row_bytes % 3:
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in embeddings]
    whole = base64.b64encode(embeddings.tobytes()).decode("ascii")
    step = row_bytes // 3 * 4
    return [whole[k: k + step] for k in range(0, len(whole), step)]


class Service:
    def __init__(self, cfg: JobConfig, opts: ServeOptions):
        from ..engine.build import resolve_device
        self.opts = opts
        self.spec = model_spec(cfg)
        device = resolve_device(cfg.device)
        self.encoders = build_encoders(cfg, self.spec, device)
        self.backend = tokenizer_backend(cfg, self.spec, chunking=False)
        self.metrics = Metrics()
        batch_tokens = cfg.batch_tokens_for(device)
        self.scheduler = Scheduler(self.encoders, self.spec.dim, batch_tokens, opts.interactive_max_tokens,
                                   opts.interactive_max_texts, self._warm_up(batch_tokens), self.metrics)
        names = [self.spec.name, Path(cfg.model).name if cfg.model else "", Path(self.spec.path).name]
        self.limits = Limits(tuple(dict.fromkeys(n for n in names if n)), self.spec.dim, self.spec.vocab_size,
                             self.spec.max_seq_length, opts.max_request_texts, opts.max_text_chars)
        # Small requests are tokenized by threads of their own, so a query never waits behind bulk requests'
        # texts (measured on the CPU box: 6.3 s query p50 under bulk load with one pool for both).
        processes = (opts.tokenizer_processes if opts.tokenizer_processes >= 0
                     else auto_processes(str(self.encoders[0].device_name)))
        self.tokenizing = Tokenizing(cfg, self.spec, opts.tokenizer_threads, processes)
        self.state = _State()

    def _warm_up(self, batch_tokens: int) -> dict[str, float]:
        """Each lane's first rate, tokens per second: a small batch (the interactive lane's) and one of the bulk
        budget (at most WARM_UP_BULK_TOKENS), each timed on its second run."""
        short = self.backend.encode([WARM_UP_TEXT])[0]
        rates = {}
        for lane, rows in (("interactive", 8), ("bulk", min(batch_tokens, WARM_UP_BULK_TOKENS) // len(short))):
            batch = request_batch([short] * max(rows, 1))
            self.encoders[0].encode(batch)
            start = time.perf_counter()
            self.encoders[0].encode(batch)
            rates[lane] = batch.num_tokens / max(time.perf_counter() - start, 1e-6)
        return rates

    # -- handlers ------------------------------------------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        response = await self._embeddings(request)
        self.metrics.requests.labels(str(response.status)).inc()
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        if self.state.draining or self.state.failed:
            return _error(503, "the server is shutting down" if self.state.draining else "the encoder failed")
        self.state.in_flight += 1
        try:
            try:
                parsed = parse(await request.read(), self.limits)
                budget = self._budget(request)
            except BadRequest as exc:
                return _error(exc.status, exc.message, exc.param, exc.code)
            small = parsed.count <= self.opts.interactive_max_texts
            try:
                self.scheduler.admit("interactive" if small else "bulk", budget)     # before tokenizing it
                if parsed.texts is not None:
                    tokenize = self.tokenizing.small if small else self.tokenizing.bulk
                    batch = await asyncio.wrap_future(tokenize(parsed.texts))
                else:
                    batch = request_batch(parsed.token_ids)
                embeddings = await asyncio.wrap_future(self.scheduler.submit(batch, budget))
            except Overloaded as exc:
                retry = max(1, math.ceil(exc.predicted - exc.budget))
                return _error(429, f"overloaded: {exc}; retry in {retry} s", code="overloaded",
                              headers={"Retry-After": str(retry)})
            except Unavailable as exc:
                if self.scheduler.failed:
                    self._fail()
                return _error(503, str(exc), code="unavailable")
            except BrokenProcessPool:
                self._fail("a tokenizing process died")
                return _error(503, "a tokenizing process died", code="unavailable")
            return self._answer(request, parsed, embeddings, batch.num_tokens)
        finally:
            self.state.in_flight -= 1

    def _budget(self, request: web.Request) -> float | None:
        header = request.headers.get("X-Latency-Budget-Ms")
        if header is None:
            ms = self.opts.latency_budget_ms
        else:
            try:
                ms = float(header)
            except ValueError:
                ms = -1.0
            if not ms >= 0 or math.isinf(ms):
                raise BadRequest(f"X-Latency-Budget-Ms must be a number of milliseconds >= 0, got {header!r}")
        return ms / 1e3 if ms or header is not None else None

    def _answer(self, request: web.Request, parsed, embeddings: np.ndarray, tokens: int) -> web.Response:
        if parsed.dimensions and parsed.dimensions < embeddings.shape[1]:
            embeddings = embeddings[:, : parsed.dimensions]
            if self.spec.normalize:       # cut before normalizing, as --dimensions does
                embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        embeddings = np.ascontiguousarray(embeddings, dtype="<f4")
        if "application/octet-stream" in request.headers.get("Accept", ""):
            return web.Response(body=embeddings.tobytes(), content_type="application/octet-stream",
                                headers={"X-Embedding-Rows": str(embeddings.shape[0]),
                                         "X-Embedding-Dim": str(embeddings.shape[1]),
                                         "X-Prompt-Tokens": str(tokens)})
        if parsed.encoding_format == "base64":
            # Built as text: base64 needs no escaping, and json's encoder over a list of dicts was a third of the
            # event loop's time under bulk load on the H200 box (py-spy; bench/notes/serve.md).
            items = ",".join(f'{{"object":"embedding","index":{k},"embedding":"{v}"}}'
                             for k, v in enumerate(_base64_rows(embeddings)))
            body = (f'{{"object":"list","model":{json.dumps(self.limits.model_names[0])},"data":[{items}],'
                    f'"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}')
            return web.Response(body=body.encode("ascii"), content_type="application/json")
        return web.json_response({
            "object": "list", "model": self.limits.model_names[0],
            "data": [{"object": "embedding", "index": k, "embedding": v} for k, v in enumerate(embeddings.tolist())],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def health(self, request: web.Request) -> web.Response:
        status = "failed" if self.state.failed else "draining" if self.state.draining else "ok"
        first = self.encoders[0]
        return web.json_response({"status": status, "model": self.limits.model_names[0], "dim": self.spec.dim,
                                  "engine": first.engine, "device": first.device_name, "dtype": first.dtype_name},
                                 status=200 if status == "ok" else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(self.scheduler),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _fail(self, why: str = "") -> None:
        self.state.failed = True
        log.error("%s; ending the service", why or f"the encoder failed: {self.scheduler.failed}")
        if self.state.stop is not None:
            self.state.stop.set()

    # -- running -------------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    async def run(self) -> int:
        self.state.stop = asyncio.Event()
        runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.opts.host, self.opts.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        first = self.encoders[0]
        log.info("serving %s on http://%s:%d (%s engine, %s, %s; %d instance%s; bulk requests tokenized in %s)",
                 self.limits.model_names[0], self.opts.host, port, first.engine, first.dtype_name, first.device_name,
                 len(self.encoders), "" if len(self.encoders) == 1 else "s",
                 _tokenizing_said(self.tokenizing.processes, self.opts.tokenizer_threads, self.backend.name))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.state.stop.set)
        await self.state.stop.wait()
        self.state.draining = True
        log.info("draining: %d accepted request(s) to answer", self.state.in_flight)
        while self.state.in_flight:
            await asyncio.sleep(0.01)
        await runner.cleanup()
        self.scheduler.close()
        self.tokenizing.close()
        log.info("stopped")
        return EXIT_FAILED if self.state.failed else 0


def serve(cfg: JobConfig, opts: ServeOptions) -> int:
    return asyncio.run(Service(cfg, opts).run())
