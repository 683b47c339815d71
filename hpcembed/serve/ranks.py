"""`hpcembed serve` launched by mpiexec or srun: the job's roles serve live requests.

- Rank 0 is the frontend: the HTTP server (serve/server.py) with serve/frontend.py's backend. Nothing else runs
  there: no encoder and no bulk tokenizing share its interpreter, so parsing and answering do not wait on them.
- Encoder ranks (one per GPU, as `hpcembed run` places them): the one-process scheduler (serve/scheduler.py,
  two lanes) over the rank's encoder instances; answers go back to the frontend.
- The other ranks tokenize bulk requests' pieces and send the token batches to the encoder rank the frontend
  named. Token batches travel over MPI (not UCX) in this release.

Stopping: SIGTERM or SIGINT to the frontend (Slurm's scancel signals every task; the others ignore it) drains:
new requests get 503, accepted ones are answered, then every rank is told to leave and the world exits 0. A rank
that fails is answered 503 on every pending request and ends the world (exit 1). A rank killed outright is
MPI's to handle: the launcher ends the world, and requests in flight lose their connection.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections import deque

import numpy as np

from ..config import JobConfig
from ..errors import EXIT_FAILED, HpcEmbedError
from ..heap import GcPauses, settle
from ..launch.build import tokenizer_backend
from ..launch.setup import model_spec
from ..protocol.messages import Failure, ServeEmbedded, ServeReady, ServeStop, ServeTexts
from ..roles.common import run_role
from ..signals import STOP
from ..tokenize.batch import TokenBatch
from ..topology import device_for, plan_roles
from ..world import gather_ranks, quiet_barrier
from .options import ServeOptions

log = logging.getLogger("hpcembed")

ENCODER_IDLE_SECONDS = 0.0005   # an encoder rank's wait for an answer to send when nothing came in (a sleep)
FRONTEND = 0
SETTLE_SECONDS = 30             # the longest the frontend waits, once drained, for answers no client waits for


def serve_mpi(cfg: JobConfig, opts: ServeOptions) -> int:
    from ..transport.mpi import MpiTransport
    transport = MpiTransport()
    # A query's batch and its answer overtake bulk work queued in MPI, where a message otherwise waits for every
    # one sent before it on the same tag: the bulk answers an encoder rank sent before a query's.
    transport.urgent_first = True
    rank = transport.rank
    ranks = gather_ranks(transport.comm)
    STOP.install(announce=False)
    try:
        roles = plan_roles(ranks, cfg.tokenizer_ranks or None)
        spec = model_spec(cfg)
    except HpcEmbedError as exc:
        if rank == FRONTEND:
            raise
        return exc.exit_code        # rank 0 reports it, once
    role = roles.role_of(rank)
    if role == "conductor":
        return _frontend(cfg, opts, transport, roles, ranks, spec)
    if role == "encoder":
        device = device_for(rank, roles, ranks) if cfg.device == "auto" else cfg.device
        run_role(role, transport, FRONTEND, lambda: _encoder(cfg, opts, transport, spec, device))
    elif role == "tokenizer":
        os.environ.setdefault("RAYON_NUM_THREADS", "1")      # one core per tokenizer rank
        run_role(role, transport, FRONTEND, lambda: _tokenizer(cfg, transport, spec))
    STOP.ignore_from_now()
    transport.flush()
    quiet_barrier(transport.comm)
    transport.close()
    return 0


def _tokenizer(cfg: JobConfig, transport, spec) -> None:
    backend = tokenizer_backend(cfg, spec, chunking=False)
    settle()
    pauses = GcPauses().start()
    while True:
        message = transport.recv(None).message
        if isinstance(message, ServeStop):
            log.info("rank %d (tokenizer): %s", transport.rank, pauses.said())
            return
        if isinstance(message, ServeTexts):
            count = len(message.texts)
            batch = TokenBatch.build(backend.encode(message.texts), [""] * count,
                                     np.arange(message.first, message.first + count), message.key)
            transport.send_batch(message.encoder, batch)


class _BatchLog:
    """The scheduler's metrics on an encoder rank: its engine batches, passed on to the frontend's /metrics."""

    def __init__(self):
        self.batches: list[tuple[str, int, int]] = []

    def batch(self, lane: str, rows: int, tokens: int) -> None:
        self.batches.append((lane, rows, tokens))

    def answered(self, lane: str, seconds: float) -> None:
        pass                        # the frontend times requests whole

    def take(self) -> list:
        taken, self.batches = self.batches, []
        return taken


def _encoder(cfg: JobConfig, opts: ServeOptions, transport, spec, device: str) -> None:
    from .local import start_scheduler
    batch_log = _BatchLog()
    scheduler = start_scheduler(cfg, spec, opts, device, batch_log)
    encoders = scheduler.pool.encoders
    first = encoders[0]
    about = {"engine": first.engine, "device": first.device_name, "dtype": first.dtype_name,
             "batch_tokens": scheduler.batch_tokens}
    settle()
    pauses = GcPauses().start()
    transport.send(FRONTEND, ServeReady(dict(scheduler.rates), len(encoders), about, scheduler.pool.reserved))
    finished: deque = deque()
    wake = threading.Event()
    started = time.perf_counter()

    def on_done(future, batch, received, urgent):
        finished.append((batch, future, received, urgent))
        wake.set()

    def answer() -> None:
        while finished:
            batch, future, received, urgent = finished.popleft()
            error = future.exception()
            if error is not None:
                raise HpcEmbedError(str(error))
            busy = scheduler.pool.stage_busy_seconds / max(time.perf_counter() - started, 1e-9)
            transport.send(FRONTEND, ServeEmbedded(int(batch.units[0]), int(batch.rows[0]), future.result(),
                                                   batch.num_tokens, dict(scheduler.rates), busy,
                                                   time.perf_counter() - received, batch_log.take()),
                           urgent=urgent)

    while True:
        answer()            # every turn: under bulk load there is always another batch to take
        envelope = transport.recv(0)
        if envelope is None:
            if not finished:
                wake.wait(ENCODER_IDLE_SECONDS)
                wake.clear()
            continue
        if isinstance(envelope.message, ServeStop):
            break
        if isinstance(envelope.message, TokenBatch):
            batch = envelope.message
            # Batches from tokenizer ranks are pieces of bulk requests; the frontend's own, small requests or
            # token ids, go by their size.
            lane = scheduler.lane_of(batch) if envelope.source == FRONTEND else "bulk"
            received, urgent = time.perf_counter(), lane == "interactive"
            scheduler.submit(batch, lane=lane).add_done_callback(
                lambda f, b=batch, t=received, u=urgent: on_done(f, b, t, u))
    scheduler.close()
    answer()
    log.info("rank %d (encoder): %s", transport.rank, pauses.said())


def _frontend(cfg: JobConfig, opts: ServeOptions, transport, roles, ranks, spec) -> int:
    from .frontend import FrontendBackend
    from .server import Service
    from .tokenizing import Tokenizing
    for r in range(transport.size):
        log.info("rank %d on %s (pid %d): %s", r, ranks[r].host, ranks[r].pid,
                 "frontend" if r == FRONTEND else roles.role_of(r))
    log.info("role map: 1 frontend, %d tokenizer, %d encoder ranks", len(roles.tokenizers), len(roles.encoders))
    ready: dict[int, ServeReady] = {}
    while len(ready) < len(roles.encoders):         # every encoder rank built and warmed up, or one failed
        envelope = transport.recv(None)
        if isinstance(envelope.message, ServeReady):
            ready[envelope.source] = envelope.message
        elif isinstance(envelope.message, Failure):
            return _abort(transport, f"rank {envelope.message.rank} ({envelope.message.role}) failed: "
                          f"{envelope.message.message}", envelope.message.exit_code)
    batch_tokens = max(r.about["batch_tokens"] for r in ready.values())
    small = Tokenizing(cfg, spec, opts.tokenizer_threads, 0)
    tokenizer_name = tokenizer_backend(cfg, spec, chunking=False).name
    made: list[FrontendBackend] = []

    def make_backend(spec_, metrics):
        made.append(FrontendBackend(transport, roles.tokenizers, ready, spec.dim, spec.max_seq_length, batch_tokens,
                                    opts.bulk_piece_texts, small, metrics, tokenizer_name))
        return made[0]
    exit_code = asyncio.run(Service(cfg, opts, make_backend).run())
    STOP.ignore_from_now()
    if made[0].failed or exit_code:
        return _abort(transport, made[0].failed or "the HTTP server failed", EXIT_FAILED)
    made[0].settle(SETTLE_SECONDS)
    made[0].stop_ranks(roles.tokenizers + roles.encoders)
    quiet_barrier(transport.comm)
    transport.close()
    return 0


def _abort(transport, reason: str, exit_code: int) -> int:
    print(f"hpcembed: error: {reason}", file=sys.stderr, flush=True)
    transport.abort(reason, exit_code)
    return exit_code
