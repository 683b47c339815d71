"""The server's Prometheus metrics (GET /metrics), in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hpcembed_requests", "HTTP requests to /v1/embeddings by status code", ["code"],
                                registry=r)
        self.latency = Histogram("hpcembed_request_seconds", "time from acceptance to the embeddings, by lane",
                                 ["lane"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("hpcembed_stage_seconds", "where a request's time goes, by lane: read+parse, "
                               "embed, answer (HTTP side); under mpiexec also, per piece, encoder (on the encoder "
                               "rank, from receipt to its answer sent) and elsewhere (the rest of the round trip "
                               "from the frontend: tokenizing, the transport)", ["lane", "stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("hpcembed_batch_rows", "texts per engine batch, by lane", ["lane"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384), registry=r)
        self.batch_tokens = Histogram("hpcembed_batch_tokens", "tokens per engine batch, by lane", ["lane"],
                                      buckets=tuple(2 ** k for k in range(4, 20)), registry=r)
        self.queue_requests = Gauge("hpcembed_queue_requests", "requests waiting, by lane", ["lane"], registry=r)
        self.queue_tokens = Gauge("hpcembed_queue_tokens", "tokens waiting, by lane", ["lane"], registry=r)
        self.rate = Gauge("hpcembed_tokens_per_second", "each lane's measured rate, which admission control "
                          "predicts waits with", ["lane"], registry=r)
        self.gc_pause = Histogram("hpcembed_gc_pause_seconds", "the frontend process's garbage collections, by "
                                  "generation (a full one, 2, stops every thread of the process)", ["generation"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.loop_lag = Histogram("hpcembed_event_loop_lag_seconds", "how late the HTTP event loop woke from a "
                                  "short sleep: the wait any request arriving then had before it was read",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.gpu_busy = Gauge("hpcembed_encoder_busy_fraction", "fraction of the time since start-up that an "
                              "encoder instance was running a batch (GPU busy on CUDA)", registry=r)

    def batch(self, lane: str, rows: int, tokens: int) -> None:
        self.batch_rows.labels(lane).observe(rows)
        self.batch_tokens.labels(lane).observe(tokens)

    def timed(self, lane: str, stage: str, seconds: float) -> None:
        self.stage.labels(lane, stage).observe(seconds)

    def answered(self, lane: str, seconds: float) -> None:
        self.latency.labels(lane).observe(seconds)

    def render(self, gauges: tuple[dict, dict, float]) -> bytes:
        """The exposition text, with the gauges set from a backend's gauges(): per lane (requests, tokens)
        waiting, per lane the rate, and the encoders' busy fraction."""
        depth, rates, busy = gauges
        for lane, (requests, tokens) in depth.items():
            self.queue_requests.labels(lane).set(requests)
            self.queue_tokens.labels(lane).set(tokens)
        for lane, rate in rates.items():
            self.rate.labels(lane).set(rate)
        self.gpu_busy.set(busy)
        return generate_latest(self.registry)
