"""`hpcembed serve`: the job's model, engine and tokenizer behind an HTTP endpoint compatible with the OpenAI
embeddings API, for live queries against a corpus embedded with `hpcembed run` (same model, same numbers).

aiohttp's event loop takes requests; a backend tokenizes them with the job's tokenizer backend (prompt included)
and encodes them in two lanes with admission control: in one process (serve/local.py), or, launched by mpiexec
or srun, over the job's roles (serve/ranks.py: this process is then rank 0, the frontend).

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
from pathlib import Path

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import JobConfig
from ..errors import EXIT_FAILED
from ..heap import GcPauses, settle
from ..launch.setup import model_spec
from .metrics import Metrics
from .options import ServeOptions
from .requests import BadRequest, Limits, parse
from .scheduler import Overloaded, Unavailable
from .turns import BulkTurns

log = logging.getLogger("hpcembed")
BULK_BODY_BYTES = 16384     # a body this large is parsed in a bulk turn (serve/turns.py): a query's is ~200 bytes


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
    """The HTTP side. `make_backend(spec, metrics)` builds what tokenizes and encodes (serve/local.py, or
    serve/frontend.py under mpiexec): admit(lane, budget), async embed(request, lane, budget), failed, describe(),
    gauges(), start(on_failure) in the running loop, close()."""

    def __init__(self, cfg: JobConfig, opts: ServeOptions, make_backend=None):
        self.opts = opts
        self.spec = model_spec(cfg)
        self.metrics = Metrics()
        if make_backend is None:
            from .local import LocalBackend
            make_backend = lambda spec, metrics: LocalBackend(cfg, spec, opts, metrics)   # noqa: E731
        self.backend = make_backend(self.spec, self.metrics)
        names = [self.spec.name, Path(cfg.model).name if cfg.model else "", Path(self.spec.path).name]
        self.limits = Limits(tuple(dict.fromkeys(n for n in names if n)), self.spec.dim, self.spec.vocab_size,
                             self.spec.max_seq_length, opts.max_request_texts, opts.max_text_chars)
        self.state = _State()
        self.turns = BulkTurns()

    # -- handlers ------------------------------------------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        response = await self._embeddings(request)
        self.metrics.requests.labels(str(response.status)).inc()
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        if self.state.draining or self.state.failed:
            return _error(503, "the server is shutting down" if self.state.draining else "the encoder failed")
        self.state.in_flight += 1
        started = time.perf_counter()
        try:
            try:
                body = await request.read()
                if len(body) > BULK_BODY_BYTES:
                    await self.turns.turn()
                parsed = parse(body, self.limits)
                budget = self._budget(request)
            except BadRequest as exc:
                return _error(exc.status, exc.message, exc.param, exc.code)
            lane = "interactive" if parsed.count <= self.opts.interactive_max_texts else "bulk"
            parsed_at = time.perf_counter()
            try:
                if lane == "bulk":
                    await self.turns.turn()
                self.backend.admit(lane, budget)        # before tokenizing it
                embeddings, tokens = await self.backend.embed(parsed, lane, budget)
            except Overloaded as exc:
                retry = max(1, math.ceil(exc.predicted - exc.budget))
                return _error(429, f"overloaded: {exc}; retry in {retry} s", code="overloaded",
                              headers={"Retry-After": str(retry)})
            except Unavailable as exc:
                if self.backend.failed:
                    self._fail(self.backend.failed)
                return _error(503, str(exc), code="unavailable")
            embedded_at = time.perf_counter()
            if lane == "bulk":
                await self.turns.turn()
            response = self._answer(request, parsed, embeddings, tokens)
            stages = (("read+parse", parsed_at - started), ("embed", embedded_at - parsed_at),
                      ("answer", time.perf_counter() - embedded_at))
            for stage, seconds in stages:
                self.metrics.timed(lane, stage, seconds)
            # The W3C Server-Timing header: the same stages and their sum, milliseconds, for the client to see.
            response.headers["Server-Timing"] = ", ".join(
                [f"{name.replace('+', '-')};dur={seconds * 1e3:.3f}" for name, seconds in stages]
                + [f"total;dur={(time.perf_counter() - started) * 1e3:.3f}"])
            return response
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
        about = self.backend.describe()
        return web.json_response({"status": status, "model": self.limits.model_names[0], "dim": self.spec.dim,
                                  "engine": about["engine"], "device": about["device"], "dtype": about["dtype"]},
                                 status=200 if status == "ok" else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(self.backend.gauges()),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _watch_loop(self, period: float = 0.005) -> None:
        """How late the event loop wakes from a short sleep, into /metrics: a loop held up by other work holds up
        every request that arrives meanwhile, before any handler's timing starts."""
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(period)
            self.metrics.loop_lag.observe(max(0.0, time.perf_counter() - asked - period))

    def _fail(self, why: str) -> None:
        self.state.failed = True
        log.error("%s; ending the service", why)
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
        """Serve until SIGTERM, SIGINT or a failure; drain; return the exit code."""
        self.state.stop = asyncio.Event()
        runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.opts.host, self.opts.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        about = self.backend.describe()
        instances = f"{about['instances']} instance{'' if about['instances'] == 1 else 's'}"
        if about["reserved"]:
            instances += f", {about['reserved']} of them the low-latency lane's"
        log.info("serving %s on http://%s:%d (%s engine, %s, %s; %s; bulk requests tokenized in %s)",
                 self.limits.model_names[0], self.opts.host, port, about["engine"], about["dtype"],
                 about["device"], instances, about["tokenizing"])
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, self.state.stop.set)
        self.backend.start(lambda: self._fail(self.backend.failed))
        settle()
        pauses = GcPauses(listener=lambda generation, seconds: self.metrics.gc_pause.labels(str(generation))
                          .observe(seconds)).start()
        lag = asyncio.create_task(self._watch_loop())
        await self.state.stop.wait()
        lag.cancel()
        pauses.stop()
        log.info("frontend: %s", pauses.said())
        self.state.draining = True
        log.info("draining: %d accepted request(s) to answer", self.state.in_flight)
        while self.state.in_flight:
            await asyncio.sleep(0.01)
        await runner.cleanup()
        self.backend.close()
        log.info("stopped")
        return EXIT_FAILED if self.state.failed else 0

